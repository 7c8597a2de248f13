"""FreeDA's offline stage: one caption of the bank build, stage by stage (preset ``freeda-build``).

``PrototypeBankBuilder.caption_prototypes`` on a few fixed captions (BUILD_CAPTIONS), in one worker
process, with the build settings of configs/freeda/Base-FreeDA.yaml and random full-size models
(``--build-models reference``: ``MODEL.DIFFSEG.SD.WEIGHTS random:sd15``, ``CLIP.WEIGHTS
random:ViT-L-14``, ``DINO.WEIGHTS random:vitl14``), or configs/tiny/freeda.yaml (``tiny``, seconds).
A run at fewer DDIM steps (``--build-steps``) is extrapolated to the configured ones: a step's time
and the VAE decode that ends every generation are measured apart.
"""
import logging
import os
import statistics
import time

from . import harness
from .harness import fmt_rate, fmt_s

logger = logging.getLogger("diffseg_d2.benchmark")

PRESET = "freeda-build"
DEFAULT_REPEATS = 2  # captions timed (no warm-up: at full size one caption costs minutes on a CPU)
BUILD_MODELS = {"reference": harness.config_path("freeda", "Base-FreeDA.yaml"),
                "tiny": harness.config_path("tiny", "freeda.yaml")}
RANDOM_WEIGHTS = ["MODEL.DIFFSEG.SD.WEIGHTS", "random:sd15", "MODEL.DIFFSEG.CLIP.WEIGHTS", "random:ViT-L-14",
                  "MODEL.DIFFSEG.DINO.WEIGHTS", "random:vitl14"]
BUILD_NOUN_LIST = harness.config_path("tiny", "freeda_nouns.txt")
# COCO-like captions with 2-3 nouns of BUILD_NOUN_LIST each; caption i is built with seed SEED + i.
BUILD_CAPTIONS = (
    "a cat sitting on a chair next to a potted plant",
    "a horse and a cow in a field with sheep",
    "a bus parked near a train on the street",
)
BUILD_STAGES = ("nouns", "text encoder", "generation", "masks", "dino", "clip keys")


# ====================================================================== what is measured (in the worker)
def measure(spec: dict) -> dict:
    """``PrototypeBankBuilder.caption_prototypes`` on ``spec["repeats"]`` captions of BUILD_CAPTIONS, per stage.

    The builder comes from the normal config path (``freeda_build_cfg``). There is no warm-up call
    (at full size a caption costs minutes on a CPU): the first caption is returned apart
    (``first_s``) and ``times`` are the later ones' (all, when there is one). The VAE decode that
    ends every generation is timed apart once (``decode_s``): it does not grow with the steps, which
    the extrapolation to the configured steps needs to know.
    """
    import torch

    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    device = spec["device"]
    start = time.perf_counter()
    config_steps = int(freeda_build_cfg(spec["models"]).MODEL.DIFFSEG.FREEDA.BUILD.STEPS)
    builder = PrototypeBankBuilder.from_config(
        freeda_build_cfg(spec["models"], spec.get("steps"), spec.get("dtype", "float32")))
    builder.to(device).eval()
    build_s = time.perf_counter() - start
    logger.info("%s: builder built in %.1f s, %d DDIM steps per caption", spec["name"], build_s, builder.steps)
    meter = harness.PeakMemory(device)
    meter.start()
    calls = []
    for i in range(spec["repeats"]):
        caption = BUILD_CAPTIONS[i % len(BUILD_CAPTIONS)]
        t, result = harness.timed(lambda: builder.caption_prototypes(i, caption), device)
        calls.append({"caption": caption, "seconds": t, "stages": dict(builder.last_timings),
                      "rows": len(result.nouns) if result else 0})
        logger.info("%s: caption %d in %.1f s (%s)", spec["name"], i, t,
                    ", ".join(f"{k} {v:.2f} s" for k, v in builder.last_timings.items()))
    memory = meter.result()
    d = builder.diffusion
    side = builder.image_size // d.latent_factor
    latents = torch.randn(1, d.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device)
    with torch.no_grad():
        decode_s, _ = harness.timed(lambda: d.decode_latents(latents), device)
    timed = calls[1:] or calls
    pieces = {k: statistics.median(c["stages"].get(k, 0.0) for c in timed) for k in BUILD_STAGES}
    pieces["other"] = statistics.median(c["seconds"] - sum(c["stages"].values()) for c in timed)
    return {
        "times": [c["seconds"] for c in timed], "first_s": calls[0]["seconds"], "calls": calls, "pieces": pieces,
        "decode_s": decode_s, "steps": builder.steps, "config_steps": config_steps,
        "image_size": builder.image_size, "guidance_scale": builder.guidance_scale,
        "latent_shape": list(latents.shape), "models": spec["models"],
        **memory, "build_s": build_s, "dtype": str(d.dtype).replace("torch.", ""),
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


# ====================================================================== how the configuration is built
def freeda_build_cfg(models: str, steps=None, dtype: str = "float32"):
    """The build settings of BUILD_MODELS[models] (with the random full-size models for ``reference``),
    with ``steps`` DDIM steps (None: the config's) and the nouns of BUILD_NOUN_LIST (the same nouns on
    every machine: the reference's NLTK tagger needs data that may be missing)."""
    from diffseg_d2 import get_diffseg_cfg

    opts = ["MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "list", "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", BUILD_NOUN_LIST,
            "MODEL.DIFFSEG.SD.DTYPE", dtype]
    if models == "reference":
        opts += RANDOM_WEIGHTS
    if steps is not None:
        opts += ["MODEL.DIFFSEG.FREEDA.BUILD.STEPS", str(steps)]
    return get_diffseg_cfg(BUILD_MODELS[models], opts)


def run(preset: str, args, device: str) -> dict:
    """The bank-build configuration in its own process."""
    start = time.perf_counter()
    spec = {"preset": preset, "name": preset, "kind": preset, "device": device,
            "dtype": args.dtype, "threads": args.threads, "models": args.build_models, "steps": args.build_steps,
            "repeats": args.repeats or DEFAULT_REPEATS,
            "label": "one caption: `PrototypeBankBuilder.caption_prototypes`"}
    logger.info("%s: %d captions, %s models", preset, spec["repeats"], spec["models"])
    result = harness.run_in_subprocess(spec, args.wait_quiet)
    if "error" not in result:
        spec["label"] += f", {steps_text(result['steps'])}"
    return {"preset": preset, "specs": [spec], "results": {preset: result}, "wall_s": time.perf_counter() - start}


# ====================================================================== how the table is rendered
def steps_text(n: int) -> str:
    return f"{n} DDIM step" + ("" if n == 1 else "s")


def render(run: dict, cmdline: str) -> str:
    r = run["results"][PRESET]
    spec = run["specs"][0]
    models = ("SD 1.5 + DINOv2 ViT-L/14 + CLIP ViT-L/14 architectures, random weights"
              if spec["models"] == "reference" else "the tiny random-weight presets")
    config = os.path.relpath(BUILD_MODELS[spec["models"]], harness.ROOT)
    title = f"{PRESET}: FreeDA bank build, one caption, {models}"
    if "error" in r:
        about = [f"- Build settings of {config}; the run failed."]
        out, _ = harness.kinds_table(run, cmdline, title, about, stages=True)
        return "\n".join(out).rstrip() + "\n"
    e = extrapolate_build(r)
    n, s, size = r["steps"], r["config_steps"], r["image_size"]
    lone = len(r["calls"]) == 1
    about = [
        f"- `PrototypeBankBuilder.caption_prototypes` with the build settings of {config}: a {size}x{size} image "
        f"generated with DDIM and guidance {r['guidance_scale']:g} (a batch of 2 per step) while the "
        f"cross-attention of every noun is recorded, DINOv2 on that image, CLIP keys of its nouns. "
        f"**{steps_text(n)}** here (`--build-steps`; the config's BUILD.STEPS: {s})"
        + ("; random weights make random images, at the cost of real ones." if spec["models"] == "reference"
           else "."),
        f"- Captions: {len(r['calls'])} of BUILD_CAPTIONS in tools/benchmarks/freeda_build.py (nouns from "
        f"configs/tiny/freeda_nouns.txt; rows made: {', '.join(str(c['rows']) for c in r['calls'])}), one "
        "process, no warm-up call: "
        + (f"the only caption ({fmt_s(r['first_s'])} s) includes one-time costs."
           if lone else f"the first caption ({fmt_s(r['first_s'])} s) pays one-time costs and is left out "
                        "of the times below."),
        "- Stages: the builder's `last_timings` (generation = the DDIM steps with attention recorded, and the "
        "VAE decode); *other* is the caption's time less their sum.",
    ]
    out, _ = harness.kinds_table(run, cmdline, title, about, stages=True)
    latent = "x".join(str(v) for v in r["latent_shape"])
    out += [
        "",
        (f"Extrapolation to BUILD.STEPS = {s} from this run at {n} steps (an estimate: step and decode times "
         "assumed the same at any number of steps):" if e["extrapolated"] else
         f"Throughput at BUILD.STEPS = {s} (measured; no extrapolation):"),
        "",
        "| quantity | value | how |",
        "|---|---:|---|",
        f"| one DDIM step (UNet on the guided batch of 2, attention recorded) | {fmt_s(e['step_s'])} s | "
        f"(generation - VAE decode) / {n} |",
        f"| VAE decode, once per caption | {fmt_s(r['decode_s'])} s | timed apart on a random ({latent}) latent |",
        f"| rest of a caption (nouns, text encoder, masks, DINOv2, CLIP keys, other) | {fmt_s(e['rest_s'])} s | "
        "caption - generation |",
        f"| one caption at {n} steps (measured) | {fmt_s(e['measured_s'])} s | median above |",
        f"| captions per hour at {n} steps (measured) | {fmt_rate(e['measured_captions_per_hour'])} | "
        "3600 / one caption |",
    ]
    if e["extrapolated"]:
        out += [
            f"| **one caption at {s} steps (extrapolated)** | **{fmt_s(e['caption_s'])} s** | "
            f"rest + VAE decode + {s} x step |",
            f"| **captions per hour at {s} steps (extrapolated)** | **{fmt_rate(e['captions_per_hour'])}** | "
            f"3600 / one caption at {s} steps |",
        ]
    out += [""] + harness.busy_note([(PRESET, r.get("other_load"))])
    return "\n".join(out).rstrip() + "\n"
