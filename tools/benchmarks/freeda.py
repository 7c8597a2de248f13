"""FreeDA's test time, stage by stage (preset ``freeda``).

FreeDA segments the VOC sample (375x500, read at a short side of 448: two 448 windows) with the 150
ADE20K classes, in reference mode (``FREEDA.PIPELINE window``) and with our whole-image pipeline
(``whole``). Each configuration is its own process, built by the normal config path from
configs/freeda/Base-FreeDA.yaml with ``MODEL.DIFFSEG.CLIP.WEIGHTS random:ViT-L-14`` and
``MODEL.DIFFSEG.DINO.WEIGHTS random:vitl14`` (the reference models' architectures, random weights)
and ``FREEDA.BANK`` a bank of FREEDA_BANK_SIZE random rows written for those models before the
build (exact index). Times are medians of the repeats after one warm-up call, split into the stages
of ``FreeDA.last_timings``; the retrieval of a new vocabulary is timed once before them.
"""
import logging
import statistics
import tempfile
import time

from . import harness

logger = logging.getLogger("diffseg_d2.benchmark")

PRESET = "freeda"
DEFAULT_REPEATS = 3
CONFIG = harness.config_path("freeda", "Base-FreeDA.yaml")
RANDOM_WEIGHTS = ["MODEL.DIFFSEG.CLIP.WEIGHTS", "random:ViT-L-14", "MODEL.DIFFSEG.DINO.WEIGHTS", "random:vitl14"]
KINDS = {
    "freeda-reference": "FreeDA, reference mode (per window), 1 image, 150 classes",
    "freeda-whole": "FreeDA, ours: whole-image pipeline, 1 image, 150 classes",
}
PIPELINES = {"freeda-reference": "window", "freeda-whole": "whole"}
FREEDA_BANK_SIZE = 100_000  # random keys (CLIP ViT-L/14 text, 768) and prototypes (DINOv2 ViT-L/14, 1024)


# ====================================================================== what is measured (in the worker)
def measure(spec: dict) -> dict:
    """The time of one image split into its stages, and the retrieval of a new 150-class vocabulary."""
    from detectron2.modeling import build_model

    from diffseg_d2.data.datasets.builtin_meta import ADE20K_150_CLASSES

    device = spec["device"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freeda-bank-") as bank:
        cfg = freeda_cfg(spec["kind"], device, bank)
        write_random_bank(bank, cfg, FREEDA_BANK_SIZE)  # the model reads it when built
        model = build_model(cfg).eval()
    build_s = time.perf_counter() - start
    image = harness.sample_image().to(device)
    names = list(ADE20K_150_CLASSES)
    meter = harness.PeakMemory(device)
    meter.start()
    retrieval_s, _ = harness.timed(lambda: model.class_prototypes(tuple(names)), device)
    times, stages = [], []
    for i in range(1 + spec["repeats"]):
        t, _ = harness.timed(lambda: model.segment(image, names, tuple(image.shape[-2:])), device)
        if i:
            times.append(t)
            stages.append(dict(model.last_timings))
    pieces = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    pieces["retrieval (new vocabulary, once)"] = retrieval_s
    return {"times": times, **meter.result(), "build_s": build_s, "dtype": "float32", "pieces": pieces}


# ====================================================================== how the configurations are built
def freeda_cfg(kind: str, device: str, bank: str):
    """configs/freeda/Base-FreeDA.yaml with the random full-size CLIP and DINOv2, ``kind``'s pipeline
    and the bank in the folder ``bank``."""
    from diffseg_d2 import get_diffseg_cfg

    return get_diffseg_cfg(CONFIG, RANDOM_WEIGHTS + [
        "MODEL.DIFFSEG.FREEDA.PIPELINE", PIPELINES[kind], "MODEL.DIFFSEG.FREEDA.BANK", bank, "MODEL.DEVICE", device])


def write_random_bank(folder: str, cfg, size: int) -> None:
    """A finished bank of ``size`` random L2-normalised keys and prototypes in ``folder`` (one shard, exact
    index), recorded as built by the config's CLIP and DINOv2 (their weights strings and fingerprints)."""
    import torch

    from diffseg_d2.freeda.bank import Shard, bank_path, finalize_bank, model_fingerprint, shard_name, write_shard
    from diffseg_d2.pretrained.clip import OpenCLIP
    from diffseg_d2.pretrained.dino import DenseDINO

    d = cfg.MODEL.DIFFSEG
    clip = OpenCLIP.from_weights(d.CLIP.WEIGHTS, d.CLIP.TEMPLATES)
    dino = DenseDINO.from_weights(d.DINO.WEIGHTS)
    fingerprint = model_fingerprint(clip, dino)
    shard = Shard(
        keys=harness.random_unit_rows(size, clip.embed_dim, seed=0),
        prototypes=harness.random_unit_rows(size, dino.embed_dim, seed=1),
        caption_index=torch.arange(size), seed=torch.zeros(size, dtype=torch.long), area=torch.ones(size),
        nouns=[""] * size, captions=(0, size), captions_without_nouns=[],
    )
    del clip, dino  # the model builds its own
    write_shard(bank_path(folder, shard_name(0), "bank shard"), shard)
    del shard
    finalize_bank(folder, {"models": {"clip": d.CLIP.WEIGHTS, "dino": d.DINO.WEIGHTS}}, fingerprint, 1,
                  {"kind": "flat"})


def run(preset: str, args, device: str) -> dict:
    """Each configuration of KINDS in its own process."""
    return harness.run_kinds(preset, KINDS, args, device, DEFAULT_REPEATS)


# ====================================================================== how the table is rendered
def render(run: dict, cmdline: str) -> str:
    about = [
        f"- The VOC sample (375x500, read at a short side of 448: two 448 windows), the 150 ADE20K classes, a random "
        f"bank of {FREEDA_BANK_SIZE} keys (exact index); each row is its own process; times are medians of the "
        "repeats after one warm-up call; the stages are those of `FreeDA.last_timings`.",
    ]
    out, ok = harness.kinds_table(
        run, cmdline, f"{PRESET}: FreeDA test time, DINOv2 ViT-L/14 + CLIP ViT-L/14 architectures, random weights",
        about, stages=True)
    out += [""] + harness.busy_note([(k, r.get("other_load")) for k, r in ok.items()])
    return "\n".join(out).rstrip() + "\n"
