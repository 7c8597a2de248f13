#!/usr/bin/env python
"""Time and memory of DiffSegmenter against the minimal cost of its input, and of FreeDA's retrieval.

    python tools/benchmark.py                                # every preset, markdown on stdout
    python tools/benchmark.py --preset tiny --write BENCHMARKS.md
    python tools/benchmark.py --preset retrieval --write BENCHMARKS.md
    python tools/benchmark.py --preset freeda-build --build-steps 3 --write BENCHMARKS.md

Per preset, in one run:

* plain: one VAE encode and one UNet pass of the same model at the same
  resolution (batch 1, context: one encoded prompt), the least any method
  reading that UNet must pay;
* ``DiffSegmenter.segment`` on one image with 1, 5 and 20 VOC classes, in
  reference mode (one UNet batch element per class, each refined by its own
  pass's self-attention) without captions, in reference mode with BLIP large
  captions generated from each class prompt (``sd15`` only; random weights of
  the real size), and with our "shared" conditioning (one pass for all classes);
  category filter off.

Every configuration runs in its own process (this script, with ``--worker``),
so that its peak memory is its own: on CPU the increase of peak RSS
(``ru_maxrss``) over the RSS just before the first forward, on CUDA the
increase of ``torch.cuda.max_memory_allocated``. Times are medians of
``--repeats`` calls after one warm-up call (min and max given too). The
warm-up uses another vocabulary of the same size, so the next call, reported
as "first call", still encodes its class prompts (the text-embedding cache is
cold); the repeats after it find them cached.

Presets: ``freeda`` times FreeDA's test time per stage (reference mode and ours) with the
reference models' architectures and random weights; ``freeda-build`` times FreeDA's offline
stage, one caption of the bank build (``PrototypeBankBuilder.caption_prototypes``) per stage,
with the same random full-size models and the reference build settings, and extrapolates a run
at fewer DDIM steps (``--build-steps``) to the configured ones; ``tiny`` is the tiny random-weight preset built from
configs/tiny/diffsegmenter.yaml; ``sd15`` is the Stable Diffusion 1.5
architecture with random weights at 512x512, built in memory (speed does not
depend on the weights, so nothing is downloaded).

A configuration's repeats are lowered, the slowest first, when the preset would
otherwise exceed ``--budget-min`` (estimated from the plain configuration's
times); the output says where. The table also gives the share of the CPUs that
other processes used while each configuration ran; on a shared machine
``--wait-quiet SECONDS`` waits for them before each configuration.

The ``retrieval`` preset times FreeDA's retrieval step on CPU instead:
``PrototypeBank.class_prototypes`` (the ``k`` = 350 nearest keys of each of
150 class queries, mean of their prototypes) over banks of ``--bank-sizes``
random L2-normalised keys (dimension 768, CLIP ViT-L/14 text) and prototypes
(768, DINOv2 ViT-B), for each faiss index kind that ``build_index`` makes
(flat, HNSW, IVF; several search breadths each) and for a brute-force matrix
product in torch that computes the same result without faiss. Each (bank
size, index) is one worker process: it generates the bank, builds the index
(timed, with its memory), times ``--repeats`` calls after a warm-up call with
the search inside them timed apart, then measures recall@k against the exact
top k. An index whose build time, extrapolated from the smaller banks of
the same index, exceeds what is left of ``--budget-min`` is skipped and the
estimate reported (the exact references, brute force and flat, always run).
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("diffseg_d2.benchmark")

RETRIEVAL = "retrieval"
ODISE = "odise"
FREEDA = "freeda"
FREEDA_BUILD = "freeda-build"
PRESETS = ("tiny", "sd15", RETRIEVAL, ODISE, FREEDA, FREEDA_BUILD)
# freeda-build: captions timed (no warm-up: at full size one caption costs minutes on a CPU)
DEFAULT_REPEATS = {"tiny": 3, "sd15": 3, RETRIEVAL: 7, ODISE: 3, FREEDA: 3, FREEDA_BUILD: 2}
TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny", "diffsegmenter.yaml")
RESULT_PREFIX = "BENCHMARK_RESULT "
PLAIN_PROMPT = "a photograph of aeroplane."
# Targets of our "shared" conditioning ...
TARGET_ONE_CLASS = 1.25  # 1 class <= this x plain
TARGET_MANY_CLASSES = 3.0  # 20 classes <= this x 1 class
TARGET_PEAK = 1.5  # peak memory increase <= this x plain's
# ... and of reference mode, which pays one UNet batch element per class (that is the method).
TARGET_REFERENCE_PEAK = 2.5  # peak memory increase with the most classes <= this x plain's
# Guesses of a call's cost from plain's pieces, only for fitting the run into --budget-min.
SHARED_OVERHEAD = 1.3
PER_CLASS_OVERHEAD = 1.2
# The retrieval preset: FreeDA's reference setting (ADE20K's 150 classes, top 350 keys).
KEY_DIM = 768  # CLIP ViT-L/14 text embedding
PROTOTYPE_DIM = 768  # DINOv2 ViT-B feature
RETRIEVAL_CLASSES = 150
RETRIEVAL_TOP_K = 350
TARGET_RETRIEVAL_MS = 50.0  # 150 classes ...
TARGET_RETRIEVAL_KEYS = 10**6  # ... on a bank of this many keys, on CPU
HNSW_M = 32  # build_index's default
# Growth of an approximate index's build time with the bank size, t ~ n^this: the least the
# algorithm allows (HNSW: n log n; IVF: k-means of n keys into 4 sqrt(n) lists), used where the
# measured builds suggest less. Builds under MIN_FIT_BUILD_S are too noisy to fit. The exact
# methods (brute force, flat) are the references: they are never skipped.
BUILD_EXPONENTS = {"hnsw": 1.1, "ivf": 1.5}
MIN_FIT_BUILD_S = 1.0


# ====================================================================== worker (one configuration)
def _threads(requested: int) -> int:
    return requested if requested > 0 else len(os.sched_getaffinity(0))


def build_tiny(device: str, dtype: str, conditioning: str, captions: bool = False):
    """The tiny preset through the normal config path, category filter and captions off."""
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg

    cfg = get_diffseg_cfg(
        TINY_CONFIG,
        [
            "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False",
            "DATASETS.TEST", "()",
            "MODEL.DIFFSEG.CONDITIONING", conditioning,
            "MODEL.DIFFSEG.SD.DTYPE", dtype,
            "MODEL.DEVICE", device,
        ],
    )
    return build_model(cfg).eval()


def build_sd15(device: str, dtype: str, conditioning: str, captions: bool = False):
    """DiffSegmenter on the Stable Diffusion 1.5 architecture with random weights, at 512x512;
    with ``captions``, BLIP large's architecture (random weights) continues every class prompt."""
    import transformers

    from diffseg_d2.diffusion import FrozenStableDiffusion
    from diffseg_d2.pretrained.stable_diffusion import resolve_sd_weights
    from diffseg_d2.modeling import DiffSegmenter
    from diffseg_d2.random_models import random_stable_diffusion

    # The tiny preset's tokenizer is the real CLIP BPE.
    folder = resolve_sd_weights("tiny").path
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    diffusion = FrozenStableDiffusion(random_stable_diffusion("sd15", tokenizer), dtype=dtype)
    captioner = None
    if captions:
        from diffseg_d2.pretrained.blip import BlipCaptioner
        from diffseg_d2.random_models import random_blip_large

        captioner = BlipCaptioner(*random_blip_large(), max_new_tokens=0)
    model = DiffSegmenter(
        diffusion=diffusion,
        image_size=512,
        conditioning=conditioning,
        captioner=captioner,
        cross_attn_factors=(8, 4, 2, 1),
        cross_attn_weights=(0.3, 0.5, 0.1, 0.1),
        self_attn_factor=1,
    )
    return model.to(device).eval()


def load_image(preset: str):
    """The bundled VOC sample (375x500) for tiny, resized to 512x512 for sd15: (3, H, W) RGB float in [0, 255]."""
    import numpy as np
    import torch
    from PIL import Image

    from diffseg_d2.data.datasets.register_sample import sample_image_path
    from diffseg_d2.data.image import read_image_rgb

    rgb = read_image_rgb(sample_image_path())
    if preset == "sd15":
        rgb = np.asarray(Image.fromarray(rgb).resize((512, 512), Image.BILINEAR))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()


class PeakMemory:
    """Increase of peak memory over the level at ``start()``, in MiB.

    CPU: peak RSS (``ru_maxrss``, KiB on Linux) over the RSS at ``start()``; the
    kernel's peak is reset there first (``/proc/self/clear_refs``) so that a
    higher transient while the model was built cannot hide the forward's peak.
    CUDA: ``max_memory_allocated`` over ``memory_allocated`` at ``start()``.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.baseline_mib = 0.0
        self.peak_reset = False

    def start(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mib = torch.cuda.memory_allocated() / 2**20
            return
        from diffseg_d2.optional_imports import require

        psutil = require("psutil", "psutil", "Measuring memory in tools/benchmark.py")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5 = reset the peak RSS of this process (Linux >= 4.0)
            self.peak_reset = True
        except OSError:
            self.peak_reset = False
        self.baseline_mib = psutil.Process().memory_info().rss / 2**20

    def increase_mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.baseline_mib
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kib / 1024 - self.baseline_mib


class OtherLoad:
    """Share of the machine's CPU time that other processes used meanwhile (Linux ``/proc/stat``).

    Other work on the machine slows the timed calls; this tells a reader how much there was.
    """

    def __init__(self):
        self.start_busy = self.start_own = self.start_wall = None

    @staticmethod
    def _busy_s():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.start_busy = self._busy_s()
        self.start_own = sum(os.times()[:2])
        self.start_wall = time.perf_counter()

    def fraction(self):
        """Other processes' CPU time / (wall time x CPUs), or None where unknown."""
        busy = self._busy_s()
        if busy is None or self.start_busy is None:
            return None
        others = (busy - self.start_busy) - (sum(os.times()[:2]) - self.start_own)
        return max(0.0, others / ((time.perf_counter() - self.start_wall) * os.cpu_count()))


def _timed(fn, device: str):
    """``(seconds, fn())``, waiting for CUDA work to finish on both ends."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def measure_plain(model, image, repeats: int, device: str) -> dict:
    """VAE encode + one UNet pass (batch 1) at the model's resolution; pieces timed separately."""
    import torch.nn.functional as F

    d = model.diffusion
    size = model.image_size
    x = F.interpolate(image[None].to(device), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 127.5) / 127.5
    ids = d.tokenize([PLAIN_PROMPT])
    context = d.encode_text(ids)
    meter = PeakMemory(device)
    meter.start()
    vae_s, unet_s, total_s, text_s = [], [], [], []
    for i in range(1 + repeats):
        t_vae, latents = _timed(lambda: d.encode_images(x), device)
        t_unet, _ = _timed(lambda: d.unet_forward(latents, model.noise_step, context), device)
        # Not part of plain (its context is given): timed for the breakdown only.
        t_text, _ = _timed(lambda: d.encode_text(ids), device)
        if i == 0:
            continue  # warm-up
        vae_s.append(t_vae)
        unet_s.append(t_unet)
        total_s.append(t_vae + t_unet)
        text_s.append(t_text)
    return {
        "times": total_s,
        "pieces": {
            "VAE encode": statistics.median(vae_s),
            "UNet pass": statistics.median(unet_s),
            "text encoder (1 prompt)": statistics.median(text_s),
        },
        "peak_mib": meter.increase_mib(),
        "baseline_mib": meter.baseline_mib,
        "peak_reset": meter.peak_reset,
    }


def measure_segment(model, image, num_classes: int, repeats: int, device: str) -> dict:
    """``model.segment`` with the first ``num_classes`` VOC classes: warm-up, first (cold) call, repeats."""
    from diffseg_d2.data.datasets.builtin_meta import VOC_CLASSES

    names = list(VOC_CLASSES[:num_classes])
    # Same size, another cache key: the warm-up warms everything but this vocabulary's prompts.
    warmup_names = list(reversed(VOC_CLASSES))[:num_classes]
    image = image.to(device)
    out_size = tuple(image.shape[-2:])
    meter = PeakMemory(device)
    meter.start()
    _timed(lambda: model.segment(image, warmup_names, out_size), device)
    first_s, _ = _timed(lambda: model.segment(image, names, out_size), device)
    times = [_timed(lambda: model.segment(image, names, out_size), device)[0] for _ in range(repeats)]
    return {
        "times": times,
        "first_s": first_s,
        "peak_mib": meter.increase_mib(),
        "baseline_mib": meter.baseline_mib,
        "peak_reset": meter.peak_reset,
    }


def random_unit_rows(n: int, dim: int, seed: int):
    """(n, dim) float32 rows uniformly distributed on the unit sphere; normalised in place (one copy)."""
    import torch

    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    rows /= rows.norm(dim=1, keepdim=True)
    return rows


def brute_force_bank(keys, prototypes):
    """A ``PrototypeBank`` whose search is ``queries @ keys.T`` and ``topk`` in torch (no faiss).

    Its ``class_prototypes`` is the bank's own, so the two differ in the search only.
    """
    from diffseg_d2.freeda.bank import PrototypeBank

    class BruteForceBank(PrototypeBank):
        def __init__(self):  # no faiss index
            self.keys, self.prototypes, self.nouns, self.manifest = keys, prototypes, [], {}

        def search(self, queries, k):
            return (queries @ self.keys.T).topk(max(1, min(int(k), len(self))), dim=1)

    return BruteForceBank()


def recall_at_k(ids, exact_ids) -> float:
    """Mean over queries of the share of the exact top-k ids that ``ids`` found."""
    import torch

    found = sum(int(torch.isin(row, ref).sum()) for row, ref in zip(ids, exact_ids))
    return found / exact_ids.numel()


def measure_retrieval(spec: dict) -> dict:
    """One bank size and one index: build it, then per search breadth time ``class_prototypes``."""
    from diffseg_d2.freeda.bank import PrototypeBank, build_index, set_search_breadth
    from diffseg_d2.optional_imports import require

    faiss = require("faiss", "faiss-cpu", "The retrieval preset of tools/benchmark.py")
    n, k, repeats = spec["size"], spec["top_k"], spec["repeats"]
    start = time.perf_counter()
    keys = random_unit_rows(n, KEY_DIM, seed=0)
    prototypes = random_unit_rows(n, PROTOTYPE_DIM, seed=1)
    queries = random_unit_rows(spec["classes"], KEY_DIM, seed=2)
    setup_s = time.perf_counter() - start
    logger.info("%s: bank of %d random keys generated in %.1f s, building", spec["name"], n, setup_s)
    meter = PeakMemory("cpu")
    meter.start()
    build_load = OtherLoad()
    build_load.start()
    build = {}
    if spec["method"] == "brute":
        bank, build_s = brute_force_bank(keys, prototypes), 0.0
    else:
        build_s, (index, kind) = _timed(lambda: build_index(keys.numpy(), spec["method"], **spec["build"]), "cpu")
        bank = PrototypeBank(index, prototypes, [""] * n, {})
        inner = faiss.downcast_index(index)
        build = {"kind": kind, **({"nlist": int(inner.nlist)} if hasattr(inner, "nlist") else {})}
        logger.info("%s: %s index built in %.1f s", spec["name"], kind, build_s)
    build_peak_mib, before_build_mib = meter.increase_mib(), meter.baseline_mib
    build_other_load = build_load.fraction() if spec["method"] != "brute" else None
    meter.start()
    index_mib = meter.baseline_mib - before_build_mib  # what the built index keeps resident

    search = bank.search
    search_s = []

    def timed_search(q, top_k):
        t, out = _timed(lambda: search(q, top_k), "cpu")
        search_s.append(t)
        return out

    bank.search = timed_search  # class_prototypes calls it: the search inside each call is timed apart
    rows, exact_ids = [], None
    for setting in spec["search"]:
        breadth = {}
        if spec["method"] != "brute":
            set_search_breadth(index, k, setting.get("ef_search", 0), setting.get("nprobe", 1))
            breadth = {name: int(getattr(obj, name)) for obj, name in ((getattr(inner, "hnsw", None), "efSearch"),
                                                                      (inner, "nprobe")) if hasattr(obj, name)}
        meter.start()
        load = OtherLoad()
        load.start()
        times = []
        for i in range(1 + repeats):
            search_s.clear()
            t, _ = _timed(lambda: bank.class_prototypes(queries, k), "cpu")
            if i > 0:  # the first call is the warm-up
                times.append((t, search_s[0]))
        peak_mib, other_load = meter.increase_mib(), load.fraction()
        _, ids = search(queries, k)
        if exact_ids is None:  # after the timings, so that its (Q, n) similarities are in no peak above
            exact_ids = ids if spec["method"] == "brute" else (queries @ keys.T).topk(k, dim=1)[1]
        rows.append({
            "setting": setting,
            "breadth": breadth,
            "times": [t for t, _ in times],
            "search_times": [s for _, s in times],
            "recall": recall_at_k(ids, exact_ids),
            "missing": int((ids < 0).sum()),
            "peak_mib": peak_mib,
            "other_load": other_load,
        })
        logger.info("%s %s: median %.1f ms, recall@%d %.3f", spec["name"], breadth or "",
                    1e3 * statistics.median(rows[-1]["times"]), k, rows[-1]["recall"])
    return {
        "rows": rows,
        "build_s": build_s,
        "build": build,
        "build_peak_mib": build_peak_mib,
        "build_other_load": build_other_load,
        "index_mib": index_mib,
        "faiss": faiss.__version__,
    }


def run_worker(spec: dict) -> dict:
    """Build the preset's model (or bank), measure one configuration, return what the table needs."""
    import torch

    threads = _threads(spec["threads"])
    torch.set_num_threads(threads)
    device = spec.get("device", "cpu")
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    if spec["preset"] in (ODISE, FREEDA, FREEDA_BUILD):
        load = OtherLoad()
        load.start()
        measure = {ODISE: measure_odise, FREEDA: measure_freeda, FREEDA_BUILD: measure_freeda_build}[spec["preset"]]
        result = measure(spec)
        result.update(other_load=load.fraction(), threads=threads, torch=torch.__version__, device_name=device_name)
        return result
    if spec["preset"] == RETRIEVAL:
        from diffseg_d2.optional_imports import require

        require("faiss", "faiss-cpu", "The retrieval preset of tools/benchmark.py").omp_set_num_threads(threads)
        result = measure_retrieval(spec)
        result.update(threads=threads, torch=torch.__version__, device_name=device_name)
        return result
    start = time.perf_counter()
    build = build_tiny if spec["preset"] == "tiny" else build_sd15
    model = build(device, spec["dtype"], spec.get("conditioning", "shared"), spec.get("captions", False))
    image = load_image(spec["preset"])
    build_s = time.perf_counter() - start
    logger.info("%s: model built in %.1f s, measuring", spec["name"], build_s)
    load = OtherLoad()
    load.start()
    if spec["kind"] == "plain":
        result = measure_plain(model, image, spec["repeats"], device)
    else:
        result = measure_segment(model, image, spec["classes"], spec["repeats"], device)
    result.update(
        other_load=load.fraction(),
        build_s=build_s,
        threads=threads,
        torch=torch.__version__,
        device_name=device_name,
        dtype=str(model.diffusion.dtype).replace("torch.", ""),
        image_size=model.image_size,
        input_size=list(image.shape[-2:]),
    )
    return result


# ====================================================================== ODISE preset
ODISE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "odise", "Base-ODISE.yaml")
TARGET_BACKBONE = 1.15  # backbone features of one 512 window <= this x (VAE encode + plain UNet pass)
ODISE_KINDS = {
    "odise-plain": "plain: VAE encode + 1 UNet pass (empty prompt)",
    "odise-backbone": "DiffusionUNetBackbone (reference taps: UNet + VAE encoder + VAE decoder), captioner off",
    "odise-backbone-captioner": "DiffusionUNetBackbone with the implicit captioner (CLIP ViT-L/14-336)",
    "odise-inference": "ODISE inference, 1 image 512x512, 150 classes, MaskCLIP ensemble",
    "odise-inference-1024": "ODISE inference at the reference test size, 1 image 1024x1024 (4 windows), 150 classes",
    "odise-train-step": "ODISE training step, batch 1, 512 LSJ crop (forward, backward, AdamW)",
}


def build_odise_cfg(device: str, captioner: bool = True):
    """The reference config (configs/odise/Base-ODISE.yaml) on ``device`` with the 150 ADE20K class names."""
    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.data.datasets.builtin_meta import ADE20K_150_CLASSES

    cfg = get_diffseg_cfg(ODISE_CONFIG, [
        "MODEL.DEVICE", device, "MODEL.DIFFSEG.SD.DTYPE", "float32",
        "MODEL.DIFFSEG.ODISE.CAPTIONER.ENABLED", str(captioner),
        "DATASETS.TRAIN", "('diffseg_sample_voc_panoptic',)", "DATASETS.TEST", "()",
        "INPUT.LSJ.SIZE", "512",
    ])
    cfg.MODEL.DIFFSEG.VOCABULARY = list(ADE20K_150_CLASSES)
    return cfg


def random_full_size_weights():
    """Patches that make the config's SD 1.5, CLIP ViT-L/14 and DINOv2 ViT-L/14 load as random
    full-size models (whatever weights the config names).

    Speed and memory do not depend on the weights, and nothing can be downloaded here;
    everything else is built by the normal config path.
    """
    from contextlib import ExitStack
    from unittest import mock

    import open_clip
    import transformers

    from diffseg_d2.pretrained.stable_diffusion import resolve_sd_weights
    from diffseg_d2.pretrained.clip import OpenCLIP
    from diffseg_d2.pretrained.dino import DenseDINO
    from diffseg_d2.random_models import random_dino, random_stable_diffusion

    tokenizer = transformers.CLIPTokenizer.from_pretrained(resolve_sd_weights("tiny").path, subfolder="tokenizer")

    def clip_from_weights(weights, templates):
        name = "ViT-L-14-336" if "336" in weights else "ViT-L-14"  # ODISE's CLIP is the 336 px one
        return OpenCLIP(open_clip.create_model(name), open_clip.get_tokenizer(name), templates)

    def random_sd(weights, revision=None):
        return random_stable_diffusion("sd15", tokenizer)

    stack = ExitStack()
    # Where each user looks the SD loader up: ODISE's backbone imports it by name, the bank builder
    # from the diffusion package when it is built.
    stack.enter_context(mock.patch("diffseg_d2.modeling.backbone.diffusion_unet.load_stable_diffusion", random_sd))
    stack.enter_context(mock.patch("diffseg_d2.diffusion.load_stable_diffusion", random_sd))
    stack.enter_context(mock.patch.object(OpenCLIP, "from_weights", staticmethod(clip_from_weights)))
    stack.enter_context(mock.patch.object(DenseDINO, "from_weights",
                                          staticmethod(lambda weights: DenseDINO(random_dino("vitl14")))))
    return stack


def odise_input(size: int = 512) -> dict:
    """The VOC sample resized to size x size, as a detectron2 input dict (uint8 RGB)."""
    import torch.nn.functional as F

    image = F.interpolate(load_image("tiny")[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return {"image": image.round().clamp(0, 255).byte(), "height": size, "width": size}


def measure_odise(spec: dict) -> dict:
    """One ODISE configuration (SD 1.5 and CLIP ViT-L/14-336 architectures, random weights)."""
    import torch
    from detectron2.modeling import build_backbone, build_model

    device, kind, repeats = spec["device"], spec["kind"], spec["repeats"]
    start = time.perf_counter()
    cfg = build_odise_cfg(device, captioner=kind != "odise-backbone")
    pieces = {}
    with random_full_size_weights():
        if kind in ("odise-inference", "odise-inference-1024", "odise-train-step"):
            model = build_model(cfg)
            backbone = model.backbone
        else:
            backbone = build_backbone(cfg).to(device).eval()
    build_s = time.perf_counter() - start
    x = (odise_input()["image"].float()[None].to(device) - 127.5) / 127.5
    d = backbone.diffusion
    if kind == "odise-plain":
        context = d.empty_prompt_context()

        def step():
            with torch.no_grad():
                t_vae, latents = _timed(lambda: d.encode_images(x), device)
                t_unet, _ = _timed(lambda: d.unet_forward(latents, 0, context), device)
            pieces.setdefault("VAE encode", []).append(t_vae)
            pieces.setdefault("UNet pass", []).append(t_unet)
    elif kind.startswith("odise-backbone"):
        def step():
            with torch.no_grad():
                backbone(x)
    elif kind in ("odise-inference", "odise-inference-1024"):
        model.eval()
        inputs = [odise_input(1024 if kind.endswith("1024") else 512)]

        def step():
            with torch.no_grad():
                model(inputs)
    else:
        from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper
        from diffseg_d2.engine import DiffSegTrainer
        from detectron2.data import DatasetCatalog

        model.train()
        optimizer = DiffSegTrainer.build_optimizer(cfg, model)
        batch = [MaskFormerPanopticMapper(cfg, True)(DatasetCatalog.get("diffseg_sample_voc_panoptic")[0])]

        def step():
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    meter = PeakMemory(device)
    meter.start()
    times = []
    for i in range(1 + repeats):
        t, _ = _timed(step, device)
        if i:
            times.append(t)
    result = {"times": times, "peak_mib": meter.increase_mib(), "baseline_mib": meter.baseline_mib,
              "peak_reset": meter.peak_reset, "build_s": build_s, "dtype": str(d.dtype).replace("torch.", "")}
    if pieces:
        result["pieces"] = {k: statistics.median(v[1:]) for k, v in pieces.items()}
    return result


def run_kinds(args, device: str, preset: str) -> dict:
    """Each configuration of the ODISE or FreeDA preset in its own process."""
    start = time.perf_counter()
    kinds = ODISE_KINDS if preset == ODISE else FREEDA_KINDS
    base = {"preset": preset, "device": device, "threads": args.threads, "repeats": args.repeats or DEFAULT_REPEATS[preset]}
    specs = [{**base, "name": kind, "kind": kind, "label": label} for kind, label in kinds.items()]
    results = {}
    for s in specs:
        logger.info("%s: %s (%d repeats)", preset, s["name"], s["repeats"])
        results[s["name"]] = run_in_subprocess(s, args.wait_quiet)
    return {"preset": preset, "specs": specs, "results": results, "wall_s": time.perf_counter() - start}


# ====================================================================== FreeDA preset
FREEDA_KINDS = {
    "freeda-reference": "FreeDA, reference mode (per window), 1 image, 150 classes",
    "freeda-whole": "FreeDA, ours: whole-image pipeline, 1 image, 150 classes",
}
FREEDA_BANK_SIZE = 100_000  # random keys (CLIP ViT-L/14 text, 768) and prototypes (DINOv2 ViT-L/14, 1024)


def measure_freeda(spec: dict) -> dict:
    """FreeDA's test time on the VOC sample with the reference models' architectures (DINOv2 ViT-L/14,
    CLIP ViT-L/14), random weights and a random bank: the time of one image split into its stages,
    and the retrieval of a new 150-class vocabulary."""
    import numpy as np
    import open_clip
    import torch

    from diffseg_d2.data.datasets.builtin_meta import ADE20K_150_CLASSES
    from diffseg_d2.freeda.bank import PrototypeBank, build_index, model_fingerprint
    from diffseg_d2.pretrained.clip import OpenCLIP
    from diffseg_d2.pretrained.dino import DenseDINO
    from diffseg_d2.modeling.meta_arch import FreeDA
    from diffseg_d2.random_models import random_dino

    start = time.perf_counter()
    clip = OpenCLIP(open_clip.create_model("ViT-L-14"), open_clip.get_tokenizer("ViT-L-14"), ["a photo of a {}."])
    dino = DenseDINO(random_dino("vitl14"))
    keys = random_unit_rows(FREEDA_BANK_SIZE, clip.embed_dim, seed=0)
    prototypes = random_unit_rows(FREEDA_BANK_SIZE, dino.embed_dim, seed=1)
    bank = PrototypeBank(build_index(keys.numpy(), "flat")[0], prototypes, [""] * FREEDA_BANK_SIZE,
                         {"fingerprint": model_fingerprint(clip, dino)})
    model = FreeDA(bank=bank, clip=clip, dino=dino, pipeline="window" if spec["kind"] == "freeda-reference" else "whole",
                   query_templates=get_default_query_templates()).to(spec["device"]).eval()
    build_s = time.perf_counter() - start
    image = load_image("tiny").to(spec["device"])
    names = list(ADE20K_150_CLASSES)
    meter = PeakMemory(spec["device"])
    meter.start()
    retrieval_s, _ = _timed(lambda: model.class_prototypes(tuple(names)), spec["device"])
    times, stages = [], []
    for i in range(1 + spec["repeats"]):
        t, _ = _timed(lambda: model.segment(image, names, tuple(image.shape[-2:])), spec["device"])
        if i:
            times.append(t)
            stages.append(dict(model.last_timings))
    pieces = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    pieces["retrieval (new vocabulary, once)"] = retrieval_s
    return {"times": times, "peak_mib": meter.increase_mib(), "baseline_mib": meter.baseline_mib,
            "peak_reset": meter.peak_reset, "build_s": build_s, "dtype": "float32", "pieces": pieces}


def render_freeda(run: dict, cmdline: str) -> str:
    about = [
        f"- The VOC sample (375x500, read at a short side of 448: two 448 windows), the 150 ADE20K classes, a random "
        f"bank of {FREEDA_BANK_SIZE} keys (exact index); each row is its own process; times are medians of the "
        "repeats after one warm-up call; the stages are those of `FreeDA.last_timings`.",
    ]
    out, ok = render_kinds_table(
        run, cmdline, f"{FREEDA}: FreeDA test time, DINOv2 ViT-L/14 + CLIP ViT-L/14 architectures, random weights",
        about, stages=True)
    out += [""] + busy_note([(k, r.get("other_load")) for k, r in ok.items()])
    return "\n".join(out).rstrip() + "\n"


def get_default_query_templates() -> list:
    from diffseg_d2 import get_diffseg_cfg

    return list(get_diffseg_cfg().MODEL.DIFFSEG.FREEDA.QUERY_TEMPLATES)


def render_kinds_table(run: dict, cmdline: str, title: str, about: list, stages: bool = False):
    """The heading, machine lines and per-configuration table of the ODISE or FreeDA preset, and the
    configurations that ran (name -> result); ``stages`` adds a column with each result's pieces."""
    results = run["results"]
    ok = {k: r for k, r in results.items() if "error" not in r}
    info = next(iter(ok.values()), {})
    device = info.get("device_name", "?")
    machine = f"{cpu_model()}, {info.get('threads', '?')} torch threads" if device == "CPU" else device
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    extra = " stages (median s) |" if stages else ""
    out = [
        f"### {title}",
        "",
        f"- Machine: {machine}; torch {info.get('torch', '?')}, {info.get('dtype', '?')}",
        f"- Date: {date}; wall time of this preset: {run['wall_s'] / 60:.1f} min",
        f"- Command: `{cmdline}`",
        *about,
        "",
        "| configuration | median (s) | min-max (s) | peak (MB) | other load |" + extra,
        "|---|---|---|---|---|" + ("---|" if stages else ""),
    ]
    for s in run["specs"]:
        r = results[s["name"]]
        if "error" in r:
            out.append(f"| {s['label']} | failed: {r['error']} | | | |" + (" |" if stages else ""))
            continue
        load = "?" if r.get("other_load") is None else f"{100 * r['other_load']:.0f}%"
        row = (f"| {s['label']} | {_fmt_s(_median(r))} | {_fmt_s(min(r['times']))}-{_fmt_s(max(r['times']))} "
               f"| {r['peak_mib']:.0f} | {load} |")
        if stages:
            row += " " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in r["pieces"].items()) + " |"
        out.append(row)
    return out, ok


# ====================================================================== FreeDA bank build preset
FREEDA_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "freeda", "Base-FreeDA.yaml")
FREEDA_TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny", "freeda.yaml")
BUILD_NOUN_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny", "freeda_nouns.txt")
# COCO-like captions with 2-3 nouns of BUILD_NOUN_LIST each; caption i is built with seed SEED + i.
BUILD_CAPTIONS = (
    "a cat sitting on a chair next to a potted plant",
    "a horse and a cow in a field with sheep",
    "a bus parked near a train on the street",
)
BUILD_MODELS = {"reference": FREEDA_CONFIG, "tiny": FREEDA_TINY_CONFIG}
BUILD_STAGES = ("nouns", "text encoder", "generation", "masks", "dino", "clip keys")


def freeda_build_cfg(models: str, steps=None, dtype: str = "float32"):
    """The build settings of configs/freeda/Base-FreeDA.yaml (``reference``) or configs/tiny/freeda.yaml
    (``tiny``), with ``steps`` DDIM steps (None: the config's) and the nouns of BUILD_NOUN_LIST
    (the same nouns on every machine: the reference's NLTK tagger needs data that may be missing)."""
    from diffseg_d2 import get_diffseg_cfg

    opts = ["MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "list", "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", BUILD_NOUN_LIST,
            "MODEL.DIFFSEG.SD.DTYPE", dtype]
    if steps is not None:
        opts += ["MODEL.DIFFSEG.FREEDA.BUILD.STEPS", str(steps)]
    return get_diffseg_cfg(BUILD_MODELS[models], opts)


def measure_freeda_build(spec: dict) -> dict:
    """``PrototypeBankBuilder.caption_prototypes`` on ``spec["repeats"]`` captions of BUILD_CAPTIONS, per stage.

    The builder comes from the normal config path: with ``spec["models"]`` ``reference``, the loaders
    give random full-size models (SD 1.5, DINOv2 ViT-L/14, CLIP ViT-L/14); ``tiny``, the tiny presets.
    There is no warm-up call (at full size a caption costs minutes on a CPU): the first caption is
    returned apart (``first_s``) and ``times`` are the later ones' (all, when there is one). The VAE
    decode that ends every generation is timed apart once (``decode_s``): it does not grow with the
    steps, which the extrapolation to the configured steps needs to know.
    """
    import contextlib

    import torch

    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    device = spec["device"]
    start = time.perf_counter()
    config_steps = int(freeda_build_cfg(spec["models"]).MODEL.DIFFSEG.FREEDA.BUILD.STEPS)
    cfg = freeda_build_cfg(spec["models"], spec.get("steps"), spec.get("dtype", "float32"))
    loaders = random_full_size_weights() if spec["models"] == "reference" else contextlib.nullcontext()
    with loaders:
        builder = PrototypeBankBuilder.from_config(cfg)
    builder.to(device).eval()
    build_s = time.perf_counter() - start
    logger.info("%s: builder built in %.1f s, %d DDIM steps per caption", spec["name"], build_s, builder.steps)
    meter = PeakMemory(device)
    meter.start()
    calls = []
    for i in range(spec["repeats"]):
        caption = BUILD_CAPTIONS[i % len(BUILD_CAPTIONS)]
        t, result = _timed(lambda: builder.caption_prototypes(i, caption), device)
        calls.append({"caption": caption, "seconds": t, "stages": dict(builder.last_timings),
                      "rows": len(result.nouns) if result else 0})
        logger.info("%s: caption %d in %.1f s (%s)", spec["name"], i, t,
                    ", ".join(f"{k} {v:.2f} s" for k, v in builder.last_timings.items()))
    peak_mib = meter.increase_mib()
    d = builder.diffusion
    side = builder.image_size // d.latent_factor
    latents = torch.randn(1, d.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device)
    with torch.no_grad():
        decode_s, _ = _timed(lambda: d.decode_latents(latents), device)
    timed = calls[1:] or calls
    pieces = {k: statistics.median(c["stages"].get(k, 0.0) for c in timed) for k in BUILD_STAGES}
    pieces["other"] = statistics.median(c["seconds"] - sum(c["stages"].values()) for c in timed)
    return {
        "times": [c["seconds"] for c in timed], "first_s": calls[0]["seconds"], "calls": calls, "pieces": pieces,
        "decode_s": decode_s, "steps": builder.steps, "config_steps": config_steps,
        "image_size": builder.image_size, "guidance_scale": builder.guidance_scale,
        "latent_shape": list(latents.shape), "models": spec["models"],
        "peak_mib": peak_mib, "baseline_mib": meter.baseline_mib, "peak_reset": meter.peak_reset,
        "build_s": build_s, "dtype": str(d.dtype).replace("torch.", ""),
    }


def extrapolate_build(r: dict) -> dict:
    """Seconds of one caption at the configured steps ``S`` from a run at ``N = r["steps"]``; medians over
    the timed captions. A DDIM step is ``(generation - VAE decode) / N`` (the decode ends every
    generation, whatever the steps), so a caption at ``S`` steps is estimated as
    ``(caption - generation) + VAE decode + S x step``."""
    n, s = r["steps"], r["config_steps"]
    timed = r["calls"][1:] or r["calls"]
    step_s = statistics.median(max(0.0, c["stages"]["generation"] - r["decode_s"]) / n for c in timed)
    rest_s = statistics.median(c["seconds"] - c["stages"]["generation"] for c in timed)
    measured_s = statistics.median(c["seconds"] for c in timed)
    caption_s = measured_s if n == s else rest_s + r["decode_s"] + s * step_s
    return {"steps": n, "config_steps": s, "step_s": step_s, "rest_s": rest_s, "measured_s": measured_s,
            "caption_s": caption_s, "captions_per_hour": 3600.0 / caption_s,
            "measured_captions_per_hour": 3600.0 / measured_s, "extrapolated": n != s}


def _steps(n: int) -> str:
    return f"{n} DDIM step" + ("" if n == 1 else "s")


def run_freeda_build(args, device: str) -> dict:
    """The bank-build configuration in its own process."""
    start = time.perf_counter()
    spec = {"preset": FREEDA_BUILD, "name": FREEDA_BUILD, "kind": FREEDA_BUILD, "device": device,
            "dtype": args.dtype, "threads": args.threads, "models": args.build_models, "steps": args.build_steps,
            "repeats": args.repeats or DEFAULT_REPEATS[FREEDA_BUILD],
            "label": "one caption: `PrototypeBankBuilder.caption_prototypes`"}
    logger.info("%s: %d captions, %s models", FREEDA_BUILD, spec["repeats"], spec["models"])
    result = run_in_subprocess(spec, args.wait_quiet)
    if "error" not in result:
        spec["label"] += f", {_steps(result['steps'])}"
    return {"preset": FREEDA_BUILD, "specs": [spec], "results": {FREEDA_BUILD: result},
            "wall_s": time.perf_counter() - start}


def render_freeda_build(run: dict, cmdline: str) -> str:
    r = run["results"][FREEDA_BUILD]
    spec = run["specs"][0]
    models = ("SD 1.5 + DINOv2 ViT-L/14 + CLIP ViT-L/14 architectures, random weights"
              if spec["models"] == "reference" else "the tiny random-weight presets")
    config = os.path.relpath(BUILD_MODELS[spec["models"]], os.path.join(os.path.dirname(__file__), ".."))
    title = f"{FREEDA_BUILD}: FreeDA bank build, one caption, {models}"
    if "error" in r:
        about = [f"- Build settings of {config}; the run failed."]
        out, _ = render_kinds_table(run, cmdline, title, about, stages=True)
        return "\n".join(out).rstrip() + "\n"
    e = extrapolate_build(r)
    n, s, size = r["steps"], r["config_steps"], r["image_size"]
    lone = len(r["calls"]) == 1
    about = [
        f"- `PrototypeBankBuilder.caption_prototypes` with the build settings of {config}: a {size}x{size} image "
        f"generated with DDIM and guidance {r['guidance_scale']:g} (a batch of 2 per step) while the "
        f"cross-attention of every noun is recorded, DINOv2 on that image, CLIP keys of its nouns. "
        f"**{_steps(n)}** here (`--build-steps`; the config's BUILD.STEPS: {s})"
        + ("; random weights make random images, at the cost of real ones." if spec["models"] == "reference"
           else "."),
        f"- Captions: {len(r['calls'])} of BUILD_CAPTIONS in tools/benchmark.py (nouns from "
        f"configs/tiny/freeda_nouns.txt; rows made: {', '.join(str(c['rows']) for c in r['calls'])}), one "
        "process, no warm-up call: "
        + (f"the only caption ({_fmt_s(r['first_s'])} s) includes one-time costs."
           if lone else f"the first caption ({_fmt_s(r['first_s'])} s) pays one-time costs and is left out "
                        "of the times below."),
        "- Stages: the builder's `last_timings` (generation = the DDIM steps with attention recorded, and the "
        "VAE decode); *other* is the caption's time less their sum.",
    ]
    out, _ = render_kinds_table(run, cmdline, title, about, stages=True)
    latent = "x".join(str(v) for v in r["latent_shape"])
    out += [
        "",
        (f"Extrapolation to BUILD.STEPS = {s} from this run at {n} steps (an estimate: step and decode times "
         "assumed the same at any number of steps):" if e["extrapolated"] else
         f"Throughput at BUILD.STEPS = {s} (measured; no extrapolation):"),
        "",
        "| quantity | value | how |",
        "|---|---:|---|",
        f"| one DDIM step (UNet on the guided batch of 2, attention recorded) | {_fmt_s(e['step_s'])} s | "
        f"(generation - VAE decode) / {n} |",
        f"| VAE decode, once per caption | {_fmt_s(r['decode_s'])} s | timed apart on a random ({latent}) latent |",
        f"| rest of a caption (nouns, text encoder, masks, DINOv2, CLIP keys, other) | {_fmt_s(e['rest_s'])} s | "
        "caption - generation |",
        f"| one caption at {n} steps (measured) | {_fmt_s(e['measured_s'])} s | median above |",
        f"| captions per hour at {n} steps (measured) | {_fmt_rate(e['measured_captions_per_hour'])} | "
        "3600 / one caption |",
    ]
    if e["extrapolated"]:
        out += [
            f"| **one caption at {s} steps (extrapolated)** | **{_fmt_s(e['caption_s'])} s** | "
            f"rest + VAE decode + {s} x step |",
            f"| **captions per hour at {s} steps (extrapolated)** | **{_fmt_rate(e['captions_per_hour'])}** | "
            f"3600 / one caption at {s} steps |",
        ]
    out += [""] + busy_note([(FREEDA_BUILD, r.get("other_load"))])
    return "\n".join(out).rstrip() + "\n"


def render_odise(run: dict, cmdline: str) -> str:
    about = [
        "- Built by the normal config path (configs/odise/Base-ODISE.yaml) with the SD and CLIP loaders patched to",
        "  random full-size models; each row is its own process; peak = increase of peak memory over the level",
        "  before the first call; times are medians of the repeats after one warm-up call.",
    ]
    out, ok = render_kinds_table(
        run, cmdline, f"{ODISE}: ODISE (reference mode), SD 1.5 + CLIP ViT-L/14-336 architectures, random weights", about)
    plain = ok.get("odise-plain")
    if plain and "pieces" in plain:
        out += ["", "Plain's pieces: " + ", ".join(f"{k} {_fmt_s(v)} s" for k, v in plain["pieces"].items())]
    out += ["", "Target (medians of this run):", ""]
    bb = ok.get("odise-backbone")
    if plain and bb:
        ratio = _median(bb) / _median(plain)
        mem = bb["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] > 0 else float("nan")
        out.append(f"- **{_check(ratio <= TARGET_BACKBONE)}** backbone features <= {TARGET_BACKBONE}x plain: "
                   f"{_fmt_s(_median(bb))} s / {_fmt_s(_median(plain))} s = **{ratio:.2f}x** "
                   f"(peak memory {mem:.2f}x)")
    else:
        out.append(f"- not measured: backbone <= {TARGET_BACKBONE}x plain")
    cap = ok.get("odise-backbone-captioner")
    if plain and cap:
        out.append(f"- with the implicit captioner: {_median(cap) / _median(plain):.2f}x plain (no target)")
    out += [""] + busy_note([(k, r.get("other_load")) for k, r in ok.items()])
    return "\n".join(out).rstrip() + "\n"


# ====================================================================== driver
def _median(r: dict) -> float:
    return statistics.median(r["times"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark DiffSegmenter against one VAE encode + one UNet pass, "
                                "and FreeDA's retrieval (--preset retrieval).")
    p.add_argument("--preset", choices=PRESETS + ("all",), default="all")
    p.add_argument("--repeats", type=int, help="timed calls per configuration, after one warm-up; "
                   f"{FREEDA_BUILD}: captions, no warm-up "
                   f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_REPEATS.items())})")
    p.add_argument("--classes", default="1,5,20", help="comma-separated numbers of VOC classes (at most 20)")
    p.add_argument("--no-per-class", action="store_true", help="skip the reference-mode (per_class) rows")
    p.add_argument("--no-captions", action="store_true", help="skip the reference-mode rows with BLIP captions (sd15)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="MODEL.DIFFSEG.SD.DTYPE (half precision applies on CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch (and faiss) threads (0: the cores this process may use)")
    p.add_argument("--budget-min", type=float, default=25.0,
                   help="wall-time budget per preset: repeats are lowered, slowest configuration first, to fit "
                   f"({RETRIEVAL}: an index whose extrapolated build time exceeds what is left is skipped)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--write", metavar="FILE", help="also update this preset's section in FILE (e.g. BENCHMARKS.md)")
    r = p.add_argument_group(f"{RETRIEVAL} preset (FreeDA retrieval, always on CPU)")
    r.add_argument("--bank-sizes", default="10000,100000,1000000", help="comma-separated numbers of random keys")
    r.add_argument("--ef-construction", default="200,40",
                   help=f"HNSW efConstruction values (M = {HNSW_M}), one index each")
    r.add_argument("--ef-search", default="512,1024", help=f"HNSW efSearch values (raised to at least k = "
                   f"{RETRIEVAL_TOP_K} by set_search_breadth)")
    r.add_argument("--nprobe", default="16,64,256", help="IVF nprobe values (nlist: build_index's default)")
    b = p.add_argument_group(f"{FREEDA_BUILD} preset (FreeDA bank build, one caption per stage)")
    b.add_argument("--build-steps", type=int, metavar="N",
                   help="DDIM steps per caption (default: the config's BUILD.STEPS, 50 for the reference); "
                   "fewer steps are extrapolated to the config's, and the table says so")
    b.add_argument("--build-models", choices=tuple(BUILD_MODELS), default="reference",
                   help="reference: SD 1.5, DINOv2 ViT-L/14 and CLIP ViT-L/14 architectures with random weights "
                   "and configs/freeda/Base-FreeDA.yaml's build settings; tiny: configs/tiny/freeda.yaml (seconds)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.build_steps is not None and args.build_steps < 1:
        p.error("--build-steps must be at least 1")

    def int_list(option: str, low: int, high: float = float("inf")) -> list:
        text = getattr(args, option.lstrip("-").replace("-", "_"))
        try:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
        except ValueError:
            p.error(f"{option} must be comma-separated integers, got {text!r}")
        if not values or min(values) < low or max(values) > high:
            p.error(f"{option} must name integers from {low}" + (f" to {high}" if high < float("inf") else ""))
        return values

    args.classes = int_list("--classes", 1, 20)  # the VOC vocabulary
    args.bank_sizes = int_list("--bank-sizes", RETRIEVAL_TOP_K)
    args.ef_construction = int_list("--ef-construction", 1)
    args.ef_search = int_list("--ef-search", 1)
    args.nprobe = int_list("--nprobe", 1)
    return args


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    # Asked in a child so that this driver process stays small (no torch import).
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True, check=True,
    )
    return "cuda" if out.stdout.strip() == "True" else "cpu"


def wait_for_quiet(max_wait_s: float, threshold: float = 0.1, window_s: float = 2.0) -> None:
    """Wait (at most ``max_wait_s``) until other processes use under ``threshold`` of the CPUs."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        load = OtherLoad()
        load.start()
        time.sleep(window_s)
        busy = load.fraction()
        if busy is None or busy < threshold:
            return
        if time.perf_counter() >= deadline:
            logger.warning("other processes still use %.0f%% of the CPUs; measuring anyway", 100 * busy)
            return
        logger.info("other processes use %.0f%% of the CPUs; waiting", 100 * busy)


def run_in_subprocess(spec: dict, wait_quiet_s: float = 0.0) -> dict:
    """Run one configuration in a fresh process; its stderr (logs) passes through."""
    if wait_quiet_s > 0:
        wait_for_quiet(wait_quiet_s)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True,
    )
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        why = f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
        logger.error("%s failed: %s", spec["name"], why)
        return {"error": why, "wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = wall
    return result


def configurations(args, preset: str) -> list:
    specs = [{"name": "plain", "kind": "plain", "label": "plain: VAE encode + 1 UNet pass"}]

    def classes(k: int) -> str:
        return f"{k} class{'es' if k > 1 else ''}"

    if not args.no_per_class:
        for k in args.classes:
            specs.append({"name": f"per_class-{k}", "kind": "segment", "classes": k, "conditioning": "per_class",
                          "label": f"DiffSegmenter, {classes(k)}, reference mode, no captions"})
        if preset == "sd15" and not args.no_captions:
            for k in args.classes:
                specs.append({"name": f"captions-{k}", "kind": "segment", "classes": k, "conditioning": "per_class",
                              "captions": True,
                              "label": f"DiffSegmenter, {classes(k)}, reference mode with BLIP large captions"})
    for k in args.classes:
        specs.append({"name": f"shared-{k}", "kind": "segment", "classes": k, "conditioning": "shared",
                      "label": f"DiffSegmenter, {classes(k)}, ours: shared"})
    return specs


def _estimated_call_s(spec: dict, plain: dict) -> float:
    pieces = plain["pieces"]
    if spec["conditioning"] == "shared":
        return SHARED_OVERHEAD * (pieces["VAE encode"] + pieces["UNet pass"]) + pieces["text encoder (1 prompt)"]
    # A caption generation is guessed at one UNet pass (BLIP large: ViT-L/16 at 384, ~15 tokens).
    per_class = PER_CLASS_OVERHEAD + (1.0 if spec.get("captions") else 0.0)
    return pieces["VAE encode"] + per_class * spec["classes"] * pieces["UNet pass"]


def fit_repeats(specs: list, plain: dict, budget_s: float) -> list:
    """Lower repeats (slowest configuration first, down to 1) so the estimated run fits ``budget_s``.

    A configuration costs its process start and model build (as measured for
    plain) plus warm-up, first call and repeats. Returns notes on what was lowered.
    """
    # Process start, imports and model build: plain's wall time less its warm-up and repeats.
    setup_s = max(0.0, plain["wall_s"] - (1 + len(plain["times"])) * _median(plain))
    est = {s["name"]: _estimated_call_s(s, plain) for s in specs}

    def total() -> float:
        return sum(setup_s + (2 + s["repeats"]) * est[s["name"]] for s in specs)

    requested = {s["name"]: s["repeats"] for s in specs}
    while total() > budget_s:
        lowerable = [s for s in specs if s["repeats"] > 1]
        if not lowerable:
            break
        max(lowerable, key=lambda s: est[s["name"]])["repeats"] -= 1
    notes = [
        f"{s['name']}: repeats lowered from {requested[s['name']]} to {s['repeats']} to fit --budget-min "
        f"(one call estimated at {est[s['name']]:.0f} s from plain's pieces)"
        for s in specs if s["repeats"] != requested[s["name"]]
    ]
    if total() > budget_s:
        notes.append(f"the run is estimated at {total() / 60:.0f} min, over --budget-min even with 1 repeat each")
    return notes


def run_preset(preset: str, args, device: str) -> dict:
    start = time.perf_counter()
    repeats = args.repeats or DEFAULT_REPEATS[preset]
    base = {"preset": preset, "device": device, "dtype": args.dtype, "threads": args.threads, "repeats": repeats}
    specs = [{**base, **s} for s in configurations(args, preset)]
    logger.info("%s: plain (%d repeats)", preset, repeats)
    results = {"plain": run_in_subprocess(specs[0], args.wait_quiet)}
    notes = []
    if "error" not in results["plain"]:
        elapsed = time.perf_counter() - start
        notes = fit_repeats(specs[1:], results["plain"], args.budget_min * 60 - elapsed)
        for note in notes:
            logger.warning("%s: %s", preset, note)
    for s in specs[1:]:
        logger.info("%s: %s (%d repeats)", preset, s["name"], s["repeats"])
        results[s["name"]] = run_in_subprocess(s, args.wait_quiet)
    return {"preset": preset, "specs": specs, "results": results, "notes": notes,
            "wall_s": time.perf_counter() - start}


def retrieval_configurations(args) -> list:
    """Per bank size, smallest first: brute force, then each faiss index with all its search breadths."""
    base = {"preset": RETRIEVAL, "threads": args.threads, "repeats": args.repeats or DEFAULT_REPEATS[RETRIEVAL],
            "classes": RETRIEVAL_CLASSES, "top_k": RETRIEVAL_TOP_K}
    indexes = [
        ("brute", "brute", "brute force (torch matmul + topk)", {}, [{}]),
        ("flat", "flat", "faiss flat (exact)", {}, [{}]),
        ("ivf", "ivf", "faiss IVF", {"ivf_nlist": 0}, [{"nprobe": v} for v in args.nprobe]),
    ]
    indexes += [("hnsw", f"hnsw-efc{efc}", f"faiss HNSW M={HNSW_M} efC={efc}",
                 {"hnsw_m": HNSW_M, "hnsw_ef_construction": efc}, [{"ef_search": v} for v in args.ef_search])
                for efc in args.ef_construction]
    return [{**base, "name": f"{family}-{n}", "family": family, "method": method, "label": label, "size": n,
             "build": build, "search": search}
            for n in args.bank_sizes for method, family, label, build, search in indexes]


def estimated_build_s(method: str, history: list, n: int):
    """``(seconds, exponent)`` to build an approximate index over ``n`` keys, or None (exact methods,
    or no smaller bank measured yet).

    A power law ``t ~ n^exponent`` from the largest ``(keys, seconds)`` build of the same index
    measured so far; the exponent is fitted through the two largest builds (those of at least
    ``MIN_FIT_BUILD_S``) and is at least ``BUILD_EXPONENTS[method]``.
    """
    history = [(keys, t) for keys, t in history if t > 0]
    if method not in BUILD_EXPONENTS or not history:
        return None
    n2, t2 = history[-1]
    exponent = BUILD_EXPONENTS[method]
    fit = [(keys, t) for keys, t in history[-2:] if t >= MIN_FIT_BUILD_S]
    if len(fit) == 2 and fit[0][0] != fit[1][0]:
        (n1, t1), (n2, t2) = fit
        exponent = max(exponent, math.log(t2 / t1) / math.log(n2 / n1))
    return t2 * (n / n2) ** exponent, exponent


def run_retrieval(args) -> dict:
    """Every retrieval configuration in its own process; an approximate index whose build would overrun
    --budget-min is skipped."""
    start = time.perf_counter()
    specs = retrieval_configurations(args)
    results, builds = {}, {}
    # Per bank size, the exact references last (never skipped), so the budget left goes to the
    # approximate indexes whose build may not fit.
    for s in sorted(specs, key=lambda s: (s["size"], s["method"] not in BUILD_EXPONENTS)):
        history = builds.setdefault(s["family"], [])
        estimate = estimated_build_s(s["method"], history, s["size"])
        left_s = 60 * args.budget_min - (time.perf_counter() - start)
        if estimate and estimate[0] > left_s:
            measured = ", ".join(f"{n:,} keys {_fmt_s(t)} s" for n, t in history)
            left = f"the {_fmt_min(left_s)} left of" if left_s > 0 else "the spent"
            why = (f"not built: its build is estimated at {_fmt_min(estimate[0])} (t ~ n^{estimate[1]:.2f} "
                   f"from the builds measured here: {measured}), over {left} --budget-min {args.budget_min:g}")
            logger.warning("%s: %s: %s", RETRIEVAL, s["name"], why)
            results[s["name"]] = {"skipped": why}
            continue
        logger.info("%s: %s (%d repeats)", RETRIEVAL, s["name"], s["repeats"])
        results[s["name"]] = run_in_subprocess(s, args.wait_quiet)
        if "error" not in results[s["name"]]:
            history.append((s["size"], results[s["name"]]["build_s"]))
    return {"preset": RETRIEVAL, "specs": specs, "results": results, "wall_s": time.perf_counter() - start}


# ====================================================================== markdown
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_s(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 100 else f"{t:.0f}"


def _fmt_min(t: float) -> str:
    return f"{t / 60:.0f} min" if t >= 90 else f"{t:.0f} s"


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _fmt_ms(t: float) -> str:
    return f"{1e3 * t:.1f}" if t < 0.1 else f"{1e3 * t:.0f}"


def _check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def busy_note(loads: list) -> list:
    """Markdown lines naming the ``(name, share)`` configurations during which others used over 10% of the CPUs."""
    busy = [(name, v) for name, v in loads if v is not None and v > 0.1]
    if not busy:
        return []
    names = ", ".join(f"{name} ({100 * v:.0f}%)" for name, v in busy)
    return ["Note: other processes kept part of the CPUs busy while these configurations ran, so their "
            f"times are inflated and noisier: {names}.", ""]


def target_lines(specs: list, results: dict) -> list:
    ok = {name: r for name, r in results.items() if "error" not in r}
    plain = ok.get("plain")
    one, many = ok.get("shared-1"), ok.get("shared-20")
    lines = []
    if plain and one:
        ratio = _median(one) / _median(plain)
        lines.append(f"- **{_check(ratio <= TARGET_ONE_CLASS)}** 1 class <= {TARGET_ONE_CLASS}x plain: "
                     f"{_fmt_s(_median(one))} s / {_fmt_s(_median(plain))} s = **{ratio:.2f}x**")
    else:
        lines.append(f"- not measured: 1 class <= {TARGET_ONE_CLASS}x plain (needs plain and 1 class)")
    if one and many:
        ratio = _median(many) / _median(one)
        lines.append(f"- **{_check(ratio <= TARGET_MANY_CLASSES)}** 20 classes <= {TARGET_MANY_CLASSES:g}x 1 class: "
                     f"{_fmt_s(_median(many))} s / {_fmt_s(_median(one))} s = **{ratio:.2f}x**")
    else:
        lines.append(f"- not measured: 20 classes <= {TARGET_MANY_CLASSES:g}x 1 class (needs --classes with 1 and 20)")
    shared = [(s["name"], ok[s["name"]]) for s in specs
              if s.get("conditioning") == "shared" and s["name"] in ok]
    if plain and shared and plain["peak_mib"] > 0:
        name, worst = max(shared, key=lambda item: item[1]["peak_mib"])
        ratio = worst["peak_mib"] / plain["peak_mib"]
        lines.append(f"- **{_check(ratio <= TARGET_PEAK)}** peak memory <= {TARGET_PEAK}x plain (worst shared "
                     f"configuration, {name}): {worst['peak_mib']:.0f} MB / {plain['peak_mib']:.0f} MB = "
                     f"**{ratio:.2f}x**")
    else:
        lines.append(f"- not measured: peak memory <= {TARGET_PEAK}x plain")
    reference = [s for s in specs if s.get("conditioning") == "per_class" and s["name"] in ok]
    if plain and reference and plain["peak_mib"] > 0:
        most = max(reference, key=lambda s: (s["classes"], ok[s["name"]]["peak_mib"]))
        ratio = ok[most["name"]]["peak_mib"] / plain["peak_mib"]
        lines.append(f"- **{_check(ratio <= TARGET_REFERENCE_PEAK)}** reference mode: peak memory <= "
                     f"{TARGET_REFERENCE_PEAK}x plain ({most['name']}): {ok[most['name']]['peak_mib']:.0f} MB / "
                     f"{plain['peak_mib']:.0f} MB = **{ratio:.2f}x**")
    return lines


PRESET_TITLES = {
    "tiny": "tiny: the tiny random-weight preset (configs/tiny/diffsegmenter.yaml)",
    "sd15": "sd15: the Stable Diffusion 1.5 architecture, random weights, 512x512",
}


def render_preset(run: dict, cmdline: str) -> str:
    specs, results = run["specs"], run["results"]
    ok = [r for r in results.values() if "error" not in r]
    info = ok[0] if ok else {}
    plain = results["plain"] if "error" not in results["plain"] else None
    device = info.get("device_name", "?")
    cpu = cpu_model()
    machine = f"{cpu}, {info.get('threads', '?')} torch threads" if device == "CPU" else f"{device} (host CPU: {cpu})"
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out = [
        f"### {PRESET_TITLES[run['preset']]}",
        "",
        f"- Machine: {machine}; torch {info.get('torch', '?')}, {info.get('dtype', '?')}",
        f"- Date: {date}; wall time of this preset: {run['wall_s'] / 60:.1f} min",
        f"- Command: `{cmdline}`",
    ]
    if info:
        h, w = info["input_size"]
        out.append(f"- Input: the bundled VOC sample image, {h}x{w}, resized by the model to "
                   f"{info['image_size']}x{info['image_size']}; scores returned at {h}x{w}")
    if plain:
        mem = "RSS" if device == "CPU" else "allocated memory"
        out.append(f"- Model resident before the first forward: {plain['baseline_mib']:.0f} MB ({mem}); "
                   "peak MB below is the increase over it")
    out += [
        "",
        "| configuration | repeats | median s | min-max s | first call s (cold cache) | peak MB | "
        "time / plain | peak / plain | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in specs:
        r = results[s["name"]]
        if "error" in r:
            out.append(f"| {s['label']} | {s['repeats']} | failed: {r['error']} | | | | | | |")
            continue
        med = _median(r)
        first = _fmt_s(r["first_s"]) if "first_s" in r else "-"
        t_ratio = f"{med / _median(plain):.2f}x" if plain else "-"
        m_ratio = f"{r['peak_mib'] / plain['peak_mib']:.2f}x" if plain and plain["peak_mib"] > 0 else "-"
        load = "-" if r.get("other_load") is None else f"{100 * r['other_load']:.0f}%"
        out.append(f"| {s['label']} | {len(r['times'])} | {_fmt_s(med)} | {_fmt_s(min(r['times']))}-"
                   f"{_fmt_s(max(r['times']))} | {first} | {r['peak_mib']:.0f} | {t_ratio} | {m_ratio} | {load} |")
    out.append("")
    if plain:
        pieces = ", ".join(f"{k} {_fmt_s(v)} s" for k, v in plain["pieces"].items())
        out += [f"Pieces of plain (medians): {pieces}.", ""]
    if device == "CPU" and not all(r["peak_reset"] for r in ok):
        out += ["Note: the peak RSS could not be reset after the model was built; a build-time peak may hide "
                "a smaller forward peak.", ""]
    out += busy_note([(s["name"], results[s["name"]].get("other_load")) for s in specs])
    for note in run["notes"]:
        out.append(f"Note: {note}.")
    if run["notes"]:
        out.append("")
    out += ["Targets (ratios of medians of this run):", ""]
    out += target_lines(specs, results)
    return "\n".join(out) + "\n"


def _retrieval_rows(run: dict):
    """``(spec, result, row)`` per measured search breadth, ``(spec, result, None)`` per skipped or failed index."""
    for s in run["specs"]:
        r = run["results"][s["name"]]
        for row in r.get("rows") or [None]:
            yield s, r, row


def _index_label(s: dict, r: dict) -> str:
    nlist = r.get("build", {}).get("nlist")
    return s["label"] + (f" nlist={nlist}" if nlist else "")


def _breadth_label(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["breadth"].items()) or "-"


def _config_label(s: dict, r: dict, row: dict) -> str:
    return _index_label(s, r) + (f", {_breadth_label(row)}" if row["breadth"] else "")


def retrieval_target_lines(run: dict) -> list:
    n = TARGET_RETRIEVAL_KEYS
    goal = f"{RETRIEVAL_CLASSES} classes on a {n:,}-key bank under {TARGET_RETRIEVAL_MS:g} ms on CPU"
    measured = [(s, r, row) for s, r, row in _retrieval_rows(run) if s["size"] == n and row]
    if not measured:
        return [f"- not measured: {goal} (needs {n} in --bank-sizes)"]
    lines = []
    for s, r, row in measured:
        med = statistics.median(row["times"])
        lines.append(f"- **{_check(1e3 * med < TARGET_RETRIEVAL_MS)}** {_config_label(s, r, row)}: "
                     f"**{_fmt_ms(med)} ms** (search {_fmt_ms(statistics.median(row['search_times']))} ms), "
                     f"recall@{RETRIEVAL_TOP_K} {row['recall']:.3f}")
    passed = [line for line in lines if line.startswith("- **PASS**")]
    s, r, row = min(measured, key=lambda m: statistics.median(m[2]["times"]))
    fastest = f"{_config_label(s, r, row)}, {_fmt_ms(statistics.median(row['times']))} ms"
    lines.append(f"- **{_check(bool(passed))}** overall, {goal}: "
                 f"{len(passed)} of {len(lines)} measured configurations; fastest: {fastest}")
    skipped = [_index_label(s, r) for s, r, row in _retrieval_rows(run) if s["size"] == n and not row]
    if skipped:
        lines.append(f"- not measured at {n:,} keys: {', '.join(skipped)} (see the table)")
    return lines


def render_retrieval(run: dict, cmdline: str) -> str:
    ok = [r for r in run["results"].values() if "rows" in r]
    info = ok[0] if ok else {}
    k = RETRIEVAL_TOP_K
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    repeats = run["specs"][0]["repeats"] if run["specs"] else "?"
    brute = {s["size"]: row for s, r, row in _retrieval_rows(run) if s["method"] == "brute" and row}
    out = [
        f"### {RETRIEVAL}: FreeDA retrieval, {RETRIEVAL_CLASSES} classes, k = {k}, random banks",
        "",
        f"- Machine: {cpu_model()}, {info.get('threads', '?')} threads (torch and faiss); torch "
        f"{info.get('torch', '?')}, faiss {info.get('faiss', '?')}, float32",
        f"- Date: {date}; wall time of this preset: {run['wall_s'] / 60:.1f} min",
        f"- Command: `{cmdline}`",
        f"- Bank: random L2-normalised keys (dim {KEY_DIM}, as CLIP ViT-L/14 text embeddings) and prototypes "
        f"(dim {PROTOTYPE_DIM}, as DINOv2 ViT-B features); {RETRIEVAL_CLASSES} random L2-normalised class queries",
        f"- Time: `PrototypeBank.class_prototypes(queries, {k})`, median of {repeats} calls after one warm-up; "
        f"*search* is the index search inside those calls (brute force: `queries @ keys.T` and `topk`), "
        f"*prototype mean* the rest of them (the mean of the {k} prototypes of each class)",
        f"- Recall@{k}: share of the exact {k} nearest keys (torch matmul + topk) that the index returned. Random "
        "keys are a worst case for approximate indexes: they form no clusters, so a query's nearest keys are "
        "spread over the whole space; real keys cluster, so expect higher recall on a real bank",
        "- Memory: *index MB* is the RSS the built index adds (faiss holds its own copy of the keys); *peak MB* "
        "the increase of peak RSS while building and while searching",
        "",
        f"| keys | index | build s | search breadth | median ms | min-max ms | search ms | prototype mean ms | "
        f"time / brute force: all / search | recall@{k} | index MB | peak MB build / search | "
        "other processes' CPU |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, r, row in _retrieval_rows(run):
        head = f"| {s['size']:,} | {_index_label(s, r)} |"
        if row is None:
            why = r.get("skipped") or f"failed: {r.get('error')}"
            out.append(f"{head} {why} | | | | | | | | | | |")
            continue
        med, search = statistics.median(row["times"]), statistics.median(row["search_times"])
        mean = statistics.median(t - t_search for t, t_search in zip(row["times"], row["search_times"]))
        ref = brute.get(s["size"])
        ratio = "-" if ref is None else (f"{med / statistics.median(ref['times']):.2f}x / "
                                         f"{search / statistics.median(ref['search_times']):.2f}x")
        recall = "1 (reference)" if s["method"] == "brute" else f"{row['recall']:.3f}"
        if row["missing"]:
            recall += f" ({row['missing']} ids missing)"
        load = "-" if row["other_load"] is None else f"{100 * row['other_load']:.0f}%"
        if s["method"] == "brute":  # nothing built
            build_s = index_mib = build_peak = "-"
        else:
            build_s = _fmt_s(r["build_s"])
            index_mib, build_peak = (f"{max(0.0, r[key]):.0f}" for key in ("index_mib", "build_peak_mib"))
        out.append(
            f"{head} {build_s} | {_breadth_label(row)} | {_fmt_ms(med)} | "
            f"{_fmt_ms(min(row['times']))}-{_fmt_ms(max(row['times']))} | {_fmt_ms(search)} | "
            f"{_fmt_ms(mean)} | {ratio} | {recall} | "
            f"{index_mib} | {build_peak} / {max(0.0, row['peak_mib']):.0f} | {load} |")
    out.append("")
    loads = [(f"{s['name']} build", run["results"][s["name"]].get("build_other_load")) for s in run["specs"]]
    loads += [(s["name"] + (f" {_breadth_label(row)}" if row["breadth"] else ""), row["other_load"])
              for s, r, row in _retrieval_rows(run) if row]
    out += busy_note(loads)
    out += [f"Target ({RETRIEVAL_CLASSES} classes, medians of this run):", ""]
    out += retrieval_target_lines(run)
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    from diffseg_d2.evaluation.report import update_marked_section

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_PREFIX + json.dumps(run_worker(spec)), flush=True)
        return
    cmdline = shlex.join(["python", "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    presets = PRESETS if args.preset == "all" else (args.preset,)
    device = resolve_device(args.device) if set(presets) - {RETRIEVAL} else "cpu"
    start = time.perf_counter()
    for preset in presets:
        if preset == RETRIEVAL:
            section = render_retrieval(run_retrieval(args), cmdline)
        elif preset == ODISE:
            section = render_odise(run_kinds(args, device, ODISE), cmdline)
        elif preset == FREEDA:
            section = render_freeda(run_kinds(args, device, FREEDA), cmdline)
        elif preset == FREEDA_BUILD:
            section = render_freeda_build(run_freeda_build(args, device), cmdline)
        else:
            section = render_preset(run_preset(preset, args, device), cmdline)
        print(section, flush=True)
        if args.write:
            update_marked_section(args.write, f"tools/benchmark.py {preset}", section)
            logger.info("updated the %s section of %s", preset, args.write)
    logger.info("benchmark done in %.1f min", (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
