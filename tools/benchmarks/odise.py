"""ODISE in reference mode against the least its diffusion backbone must pay (preset ``odise``).

Each configuration is its own process, built by the normal config path from
configs/odise/Base-ODISE.yaml with ``MODEL.DIFFSEG.SD.WEIGHTS random:sd15`` and
``MODEL.DIFFSEG.CLIP.WEIGHTS random:ViT-L-14-336``: SD 1.5 and OpenAI CLIP ViT-L/14-336's
architectures with random weights (speed and memory do not depend on the weights). Times are
medians of the repeats after one warm-up call; peak memory is the increase over the level before
the first call.

* plain: one VAE encode and one UNet pass on the empty prompt, one 512 window;
* ``DiffusionUNetBackbone`` on the same window, captioner off: with the reference taps (UNet, VAE
  encoder and VAE decoder) and without the VAE decoder taps (``ODISE.BACKBONE.VAE_DECODER_BLOCKS``
  empty); with the implicit captioner;
* ODISE inference at 512 and at the reference test size (1024, four windows), 150 ADE20K classes;
* one training step (batch 1, 512 LSJ crop, AdamW).

For plain and the two backbones without captioner, one more call (not timed) counts their
floating-point operations with ``torch.utils.flop_counter.FlopCounterMode``, by part (VAE encoder,
UNet, VAE decoder, projections): the target "backbone <= 1.15x plain" is given as a time ratio and
as a FLOP ratio, and the FLOP ratio is a floor for any implementation of the same features.
"""
import logging
import statistics
import time

from . import harness
from .harness import fmt_s, median

logger = logging.getLogger("diffseg_d2.benchmark")

PRESET = "odise"
DEFAULT_REPEATS = 3
# "reference" is what the preset measures; "tiny" (configs/tiny/odise.yaml) checks the code in seconds.
CONFIGS = {"reference": harness.config_path("odise", "Base-ODISE.yaml"),
           "tiny": harness.config_path("tiny", "odise.yaml")}
RANDOM_WEIGHTS = ["MODEL.DIFFSEG.SD.WEIGHTS", "random:sd15", "MODEL.DIFFSEG.CLIP.WEIGHTS", "random:ViT-L-14-336"]
TARGET_BACKBONE = 1.15  # backbone features of one 512 window <= this x (VAE encode + plain UNet pass)
KINDS = {
    "odise-plain": "plain: VAE encode + 1 UNet pass (empty prompt)",
    "odise-backbone": "DiffusionUNetBackbone (reference taps: UNet + VAE encoder + VAE decoder), captioner off",
    "odise-backbone-nodecoder": "DiffusionUNetBackbone without the VAE decoder taps "
                                "(ODISE.BACKBONE.VAE_DECODER_BLOCKS []), captioner off",
    "odise-backbone-captioner": "DiffusionUNetBackbone with the implicit captioner (CLIP ViT-L/14-336)",
    "odise-inference": "ODISE inference, 1 image 512x512, 150 classes, MaskCLIP ensemble",
    "odise-inference-1024": "ODISE inference at the reference test size, 1 image 1024x1024 (4 windows), 150 classes",
    "odise-train-step": "ODISE training step, batch 1, 512 LSJ crop (forward, backward, AdamW)",
}
MODEL_KINDS = ("odise-inference", "odise-inference-1024", "odise-train-step")  # the whole ODISE model
FLOP_KINDS = ("odise-plain", "odise-backbone", "odise-backbone-nodecoder")
# The backbone's parts, by module path under it (the VAE decoder runs resnet by resnet, outside its forward).
BACKBONE_PARTS = {
    "VAE encoder": ("diffusion.vae.encoder", "diffusion.vae.quant_conv"),
    "UNet": ("diffusion.unet",),
    "VAE decoder": ("diffusion.vae.post_quant_conv", "diffusion.vae.decoder"),
    "projections": ("projections",),
}


# ====================================================================== what is measured (in the worker)
def measure(spec: dict) -> dict:
    """One ODISE configuration: time and peak memory of ``spec["repeats"]`` calls after a warm-up, and
    for ``FLOP_KINDS`` the floating-point operations of one more call (``flops``: part -> count)."""
    import torch
    from detectron2.modeling import build_backbone, build_model

    device, kind = spec["device"], spec["kind"]
    start = time.perf_counter()
    cfg = odise_cfg(spec.get("models", "reference"), device, kind)
    if kind in MODEL_KINDS:
        model = build_model(cfg)
        backbone = model.backbone
    else:
        backbone = build_backbone(cfg).to(device).eval()
    build_s = time.perf_counter() - start
    window = cfg.MODEL.DIFFSEG.ODISE.BACKBONE.WINDOW
    x = (odise_input(window)["image"].float()[None].to(device) - 127.5) / 127.5
    d = backbone.diffusion
    pieces = {}
    if kind == "odise-plain":
        plain = plain_pieces(d, x)

        def step():
            with torch.no_grad():
                for name, (t, _) in run_pieces(plain, lambda fn: harness.timed(fn, device)).items():
                    pieces.setdefault(name, []).append(t)
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
        step = training_step(cfg, model)
    meter = harness.PeakMemory(device)
    meter.start()
    times = harness.timed_calls(step, spec["repeats"], device)
    result = {"times": times, **meter.result(), "build_s": build_s, "dtype": str(d.dtype).replace("torch.", "")}
    if pieces:
        result["pieces"] = {k: statistics.median(v[1:]) for k, v in pieces.items()}  # not the warm-up
    if kind in FLOP_KINDS:
        result["flops"] = count_flops(plain_pieces(d, x) if kind == "odise-plain" else None, backbone, x)
        logger.info("%s: %.0f GFLOP (%s)", spec["name"], sum(result["flops"].values()) / 1e9,
                    ", ".join(f"{k} {v / 1e9:.1f}" for k, v in result["flops"].items()))
    return result


def plain_pieces(d, x) -> dict:
    """plain as named pieces, each a function of the previous one's output: VAE encode, then one UNet
    pass (timestep 0, as the backbone's noise step) on the empty prompt."""
    context = d.empty_prompt_context()
    return {"VAE encode": lambda _: d.encode_images(x),
            "UNet pass": lambda latents: d.unet_forward(latents, 0, context)}


def run_pieces(pieces: dict, measure_call) -> dict:
    """Run ``pieces`` in order, each call wrapped by ``measure_call(fn) -> (measurement, value)``:
    name -> (measurement, value)."""
    out, value = {}, None
    for name, piece in pieces.items():
        out[name] = measure_call(lambda: piece(value))
        value = out[name][1]
    return out


def count_flops(plain, backbone, x) -> dict:
    """Floating-point operations of one call (not timed), by part: plain's ``pieces`` when given, else
    the backbone's ``BACKBONE_PARTS`` (and ``other`` for any operation outside them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def counted(fn):
        with FlopCounterMode(display=False) as counter:
            value = fn()
        return counter, value

    with torch.no_grad():
        if plain is not None:
            return {name: c.get_total_flops() for name, (c, _) in run_pieces(plain, counted).items()}
        counter, _ = counted(lambda: backbone(x))
    counts = counter.get_flop_counts()
    root = type(backbone).__name__
    parts = {part: sum(flops_under(counts, f"{root}.{p}") for p in paths) for part, paths in BACKBONE_PARTS.items()}
    parts["other"] = counter.get_total_flops() - sum(parts.values())
    return parts


def flops_under(counts: dict, path: str) -> int:
    """Operations of module ``path`` and everything under it, from ``FlopCounterMode.get_flop_counts()``
    (module path -> {operator: count}, a module's count including its submodules'): the sum over the
    outermost modules that ran there (a module called directly, not through its parent's forward, has
    no entry of that parent)."""
    ran = [k for k in counts if k == path or k.startswith(path + ".")]
    outermost = [k for k in ran if not any(k.startswith(a + ".") for a in ran)]
    return sum(sum(counts[k].values()) for k in outermost)


def odise_input(size: int = 512) -> dict:
    """The VOC sample resized to size x size, as a detectron2 input dict (uint8 RGB)."""
    import torch.nn.functional as F

    image = F.interpolate(harness.sample_image()[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return {"image": image.round().clamp(0, 255).byte(), "height": size, "width": size}


def training_step(cfg, model):
    """One AdamW step of ``model`` on the VOC panoptic sample (the config's training mapper)."""
    from detectron2.data import DatasetCatalog

    from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper
    from diffseg_d2.engine import DiffSegTrainer

    model.train()
    optimizer = DiffSegTrainer.build_optimizer(cfg, model)
    batch = [MaskFormerPanopticMapper(cfg, True)(DatasetCatalog.get("diffseg_sample_voc_panoptic")[0])]

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


# ====================================================================== how the configurations are built
def odise_cfg(models: str, device: str, kind: str):
    """The config of ``kind`` on ``device``: CONFIGS[models] (the reference with random full-size SD 1.5 and
    CLIP ViT-L/14-336, float32, LSJ crops of 512), the 150 ADE20K class names, the captioner off for the
    backbones without it, no VAE decoder taps for ``odise-backbone-nodecoder``."""
    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.data.datasets.builtin_meta import ADE20K_150_CLASSES

    opts = [
        "MODEL.DEVICE", device, "MODEL.DIFFSEG.SD.DTYPE", "float32",
        "MODEL.DIFFSEG.ODISE.CAPTIONER.ENABLED", str(kind not in ("odise-backbone", "odise-backbone-nodecoder")),
        "DATASETS.TRAIN", "('diffseg_sample_voc_panoptic',)", "DATASETS.TEST", "()",
    ]
    if models == "reference":
        opts += RANDOM_WEIGHTS + ["INPUT.LSJ.SIZE", "512"]
    if kind == "odise-backbone-nodecoder":
        opts += ["MODEL.DIFFSEG.ODISE.BACKBONE.VAE_DECODER_BLOCKS", "[]"]
    cfg = get_diffseg_cfg(CONFIGS[models], opts)
    cfg.MODEL.DIFFSEG.VOCABULARY = list(ADE20K_150_CLASSES)
    return cfg


def run(preset: str, args, device: str) -> dict:
    """Each configuration of KINDS in its own process."""
    return harness.run_kinds(preset, KINDS, args, device, DEFAULT_REPEATS)


# ====================================================================== how the table is rendered
def render(run: dict, cmdline: str) -> str:
    about = [
        "- Built by the normal config path (configs/odise/Base-ODISE.yaml) with `MODEL.DIFFSEG.SD.WEIGHTS "
        "random:sd15` and `MODEL.DIFFSEG.CLIP.WEIGHTS random:ViT-L-14-336`",
        "  (random full-size models); each row is its own process; peak = increase of peak memory over the level",
        "  before the first call; times are medians of the repeats after one warm-up call.",
    ]
    out, ok = harness.kinds_table(
        run, cmdline, f"{PRESET}: ODISE (reference mode), SD 1.5 + CLIP ViT-L/14-336 architectures, random weights",
        about)
    plain = ok.get("odise-plain")
    if plain and "pieces" in plain:
        out += ["", "Plain's pieces: " + ", ".join(f"{k} {fmt_s(v)} s" for k, v in plain["pieces"].items())]
    out += flop_table(run, ok)
    out += ["", "Target (medians of this run):", ""]
    out += target_lines(ok)
    out += [""] + harness.busy_note([(k, r.get("other_load")) for k, r in ok.items()])
    return "\n".join(out).rstrip() + "\n"


def gflop(n: float) -> str:
    g = n / 1e9
    return f"{g:.0f}" if g >= 100 else f"{g:.3g}"


def flop_table(run: dict, ok: dict) -> list:
    counted = [s for s in run["specs"] if "flops" in ok.get(s["name"], {})]
    if not counted:
        return []
    plain = ok.get("odise-plain", {}).get("flops")
    out = ["", "Floating-point operations of one call (one more call after the timed ones, counted by "
           "`torch.utils.flop_counter.FlopCounterMode`; 1 GFLOP = 1e9):", "",
           "| configuration | GFLOP | / plain | parts (GFLOP) |", "|---|---:|---:|---|"]
    for s in counted:
        flops = ok[s["name"]]["flops"]
        ratio = f"{sum(flops.values()) / sum(plain.values()):.3f}x" if plain else "-"
        parts = ", ".join(f"{k} {gflop(v)}" for k, v in flops.items() if v)
        out.append(f"| {s['label']} | {gflop(sum(flops.values()))} | {ratio} | {parts} |")
    return out


def target_lines(ok: dict) -> list:
    plain = ok.get("odise-plain")
    lines = []
    for name, what in (("odise-backbone", "backbone features"),
                       ("odise-backbone-nodecoder", "backbone features without the VAE decoder taps")):
        bb = ok.get(name)
        if not (plain and bb):
            lines.append(f"- not measured: {what} <= {TARGET_BACKBONE}x plain")
            continue
        ratio = median(bb) / median(plain)
        mem = bb["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] > 0 else float("nan")
        line = (f"- **{harness.check(ratio <= TARGET_BACKBONE)}** {what} <= {TARGET_BACKBONE}x plain: "
                f"time {fmt_s(median(bb))} s / {fmt_s(median(plain))} s = **{ratio:.2f}x**")
        if "flops" in bb and "flops" in plain:
            flop_ratio = sum(bb["flops"].values()) / sum(plain["flops"].values())
            line += (f"; operations {gflop(sum(bb['flops'].values()))} / {gflop(sum(plain['flops'].values()))} "
                     f"GFLOP = **{flop_ratio:.3f}x**")
        lines.append(line + f" (peak memory {mem:.2f}x)")
        if name == "odise-backbone" and "flops" in bb and "flops" in plain:
            lines.append(f"- The FLOP ratio ({flop_ratio:.3f}x) is a floor for any implementation that computes the "
                         "same features: they need these operations, plain's and more, so only running them faster "
                         "per operation than plain runs its own could bring the time ratio below it.")
    cap = ok.get("odise-backbone-captioner")
    if plain and cap:
        lines.append(f"- with the implicit captioner: {median(cap) / median(plain):.2f}x plain (no target)")
    return lines
