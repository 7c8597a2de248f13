"""DiffSegmenter against the least any method reading the same UNet must pay (presets ``tiny``, ``sd15``,
``sd21`` and ``sdxl``).

Per preset, in one run:

* plain: one VAE encode and one UNet pass of the same model at the same resolution (batch 1,
  context: one encoded prompt);
* ``DiffSegmenter.segment`` on one image with 1, 5 and 20 VOC classes, in reference mode (one UNet
  batch element per class, each refined by its own pass's self-attention) without captions, in
  reference mode with BLIP large captions generated from each class prompt (``sd15`` only; random
  weights of the real size), and with our "shared" conditioning (one pass for all classes);
  category filter off.

``tiny`` is configs/tiny/diffsegmenter.yaml (the tiny random-weight presets); ``sd15`` is
configs/diffsegmenter/Base-DiffSegmenter.yaml (512x512, cross-attention factors 8, 4, 2, 1 weighted
.3, .5, .1, .1, self-attention factor 1) with ``MODEL.DIFFSEG.SD.WEIGHTS random:sd15`` and, for the
caption rows, ``MODEL.DIFFSEG.CAPTION.WEIGHTS random:large``: the real architectures with random
weights, built in memory (speed does not depend on the weights, so nothing is downloaded). ``sd21`` is
the same config on SD 2.1's architecture at its native 768x768 (``random:sd21``); ``sdxl`` SDXL base's
at 1024x1024 (``random:sdxl``) with the factors of configs/diffsegmenter/voc21_sdxl.yaml (cross-attention
at 4 and 2, self-attention at 2). Neither has caption rows.

Peak memory: on CPU the increase of peak RSS over the RSS just before the first forward, on CUDA
the increase of ``torch.cuda.max_memory_allocated``. Times are medians of ``--repeats`` calls after
one warm-up call (min and max given too). The warm-up uses another vocabulary of the same size, so
the next call, reported as "first call", still encodes its class prompts (the text-embedding cache
is cold); the repeats after it find them cached. A configuration's repeats are lowered, the slowest
first, when the preset would otherwise exceed ``--budget-min`` (estimated from the plain
configuration's times); the output says where.
"""
import logging
import statistics
import time

from . import harness
from .harness import fmt_s, median

logger = logging.getLogger("diffseg_d2.benchmark")

PRESETS = ("tiny", "sd15", "sd21", "sdxl")
DEFAULT_REPEATS = 3
CONFIGS = {
    "tiny": harness.config_path("tiny", "diffsegmenter.yaml"),
    "sd15": harness.config_path("diffsegmenter", "Base-DiffSegmenter.yaml"),
    "sd21": harness.config_path("diffsegmenter", "Base-DiffSegmenter.yaml"),
    "sdxl": harness.config_path("diffsegmenter", "voc21_sdxl.yaml"),
}
# Random full-size models of the real architectures, and the square side each runs at.
RANDOM_SD = {"sd15": "random:sd15", "sd21": "random:sd21", "sdxl": "random:sdxl"}
IMAGE_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
RANDOM_CAPTIONER = "random:large"  # BLIP large
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
TITLES = {
    "tiny": "tiny: the tiny random-weight preset (configs/tiny/diffsegmenter.yaml)",
    "sd15": "sd15: the Stable Diffusion 1.5 architecture, random weights, 512x512",
    "sd21": "sd21: the Stable Diffusion 2.1 architecture, random weights, 768x768",
    "sdxl": "sdxl: the SDXL base 1.0 architecture, random weights, 1024x1024",
}


# ====================================================================== what is measured (in the worker)
def measure(spec: dict) -> dict:
    """Build the preset's model, then measure plain or ``segment`` with ``spec["classes"]`` classes."""
    from detectron2.modeling import build_model

    start = time.perf_counter()
    model = build_model(model_cfg(spec["preset"], spec["device"], spec["dtype"], spec.get("conditioning", "shared"),
                                  spec.get("captions", False))).eval()
    image = harness.sample_image(IMAGE_SIZE.get(spec["preset"], 0))
    build_s = time.perf_counter() - start
    logger.info("%s: model built in %.1f s, measuring", spec["name"], build_s)
    load = harness.OtherLoad()
    load.start()
    if spec["kind"] == "plain":
        result = measure_plain(model, image, spec["repeats"], spec["device"])
    else:
        result = measure_segment(model, image, spec["classes"], spec["repeats"], spec["device"])
    result.update(
        other_load=load.fraction(),
        build_s=build_s,
        dtype=str(model.diffusion.dtype).replace("torch.", ""),
        image_size=model.image_size,
        input_size=list(image.shape[-2:]),
    )
    return result


def measure_plain(model, image, repeats: int, device: str) -> dict:
    """VAE encode + one UNet pass (batch 1) at the model's resolution; pieces timed separately."""
    import torch.nn.functional as F

    d = model.diffusion
    size = model.image_size
    x = F.interpolate(image[None].to(device), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 127.5) / 127.5
    ids = d.tokenize([PLAIN_PROMPT])
    context = d.encode_text(ids)
    meter = harness.PeakMemory(device)
    meter.start()
    vae_s, unet_s, total_s, text_s = [], [], [], []
    for i in range(1 + repeats):
        t_vae, latents = harness.timed(lambda: d.encode_images(x), device)
        t_unet, _ = harness.timed(lambda: d.unet_forward(latents, model.noise_step, context), device)
        # Not part of plain (its context is given): timed for the breakdown only.
        t_text, _ = harness.timed(lambda: d.encode_text(ids), device)
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
        **meter.result(),
    }


def measure_segment(model, image, num_classes: int, repeats: int, device: str) -> dict:
    """``model.segment`` with the first ``num_classes`` VOC classes: warm-up, first (cold) call, repeats."""
    from diffseg_d2.data.datasets.builtin_meta import VOC_CLASSES

    names = list(VOC_CLASSES[:num_classes])
    # Same size, another cache key: the warm-up warms everything but this vocabulary's prompts.
    warmup_names = list(reversed(VOC_CLASSES))[:num_classes]
    image = image.to(device)
    out_size = tuple(image.shape[-2:])
    meter = harness.PeakMemory(device)
    meter.start()
    harness.timed(lambda: model.segment(image, warmup_names, out_size), device)
    first_s, _ = harness.timed(lambda: model.segment(image, names, out_size), device)
    times = [harness.timed(lambda: model.segment(image, names, out_size), device)[0] for _ in range(repeats)]
    return {"times": times, "first_s": first_s, **meter.result()}


# ====================================================================== how the configurations are built
def model_cfg(preset: str, device: str, dtype: str, conditioning: str, captions: bool = False):
    """The config of the preset's DiffSegmenter, category filter off so that every row's classes are
    prompted (in reference mode, a row's class count stands for the classes the filter keeps); with
    ``captions`` (sd15), BLIP large's architecture continues every class prompt."""
    from diffseg_d2 import get_diffseg_cfg

    opts = [
        "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False",
        "DATASETS.TEST", "()",
        "MODEL.DIFFSEG.CONDITIONING", conditioning,
        "MODEL.DIFFSEG.SD.DTYPE", dtype,
        "MODEL.DEVICE", device,
    ]
    if preset in RANDOM_SD:
        opts += ["MODEL.DIFFSEG.SD.WEIGHTS", RANDOM_SD[preset], "MODEL.DIFFSEG.IMAGE_SIZE", str(IMAGE_SIZE[preset]),
                 "MODEL.DIFFSEG.CAPTION.ENABLED", str(captions),
                 "MODEL.DIFFSEG.CAPTION.WEIGHTS", RANDOM_CAPTIONER]
    return get_diffseg_cfg(CONFIGS[preset], opts)


def configurations(args, preset: str) -> list:
    """plain, then reference mode (without, then with captions), then shared, each per number of classes."""
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


def estimated_call_s(spec: dict, plain: dict) -> float:
    """A guess of one ``segment`` call of ``spec`` from plain's pieces (only for fitting --budget-min)."""
    pieces = plain["pieces"]
    if spec["conditioning"] == "shared":
        return SHARED_OVERHEAD * (pieces["VAE encode"] + pieces["UNet pass"]) + pieces["text encoder (1 prompt)"]
    # A caption generation is guessed at one UNet pass (BLIP large: ViT-L/16 at 384, ~15 tokens).
    per_class = PER_CLASS_OVERHEAD + (1.0 if spec.get("captions") else 0.0)
    return pieces["VAE encode"] + per_class * spec["classes"] * pieces["UNet pass"]


def run(preset: str, args, device: str) -> dict:
    """plain first; its times fit the other configurations' repeats into --budget-min."""
    start = time.perf_counter()
    repeats = args.repeats or DEFAULT_REPEATS
    base = {"preset": preset, "device": device, "dtype": args.dtype, "threads": args.threads, "repeats": repeats}
    specs = [{**base, **s} for s in configurations(args, preset)]
    results = harness.run_each(specs[:1], args.wait_quiet)
    plain = results["plain"]
    notes = []
    if "error" not in plain:
        # Process start, imports and model build: plain's wall time less its warm-up and repeats.
        setup_s = max(0.0, plain["wall_s"] - (1 + len(plain["times"])) * median(plain))
        call_s = {s["name"]: estimated_call_s(s, plain) for s in specs[1:]}
        budget_s = args.budget_min * 60 - (time.perf_counter() - start)
        notes = harness.fit_repeats(specs[1:], call_s, setup_s, budget_s, "plain's pieces")
        for note in notes:
            logger.warning("%s: %s", preset, note)
    results.update(harness.run_each(specs[1:], args.wait_quiet))
    return {"preset": preset, "specs": specs, "results": results, "notes": notes,
            "wall_s": time.perf_counter() - start}


# ====================================================================== how the table is rendered
def render(run: dict, cmdline: str) -> str:
    specs, results = run["specs"], run["results"]
    ok = [r for r in results.values() if "error" not in r]
    info = ok[0] if ok else {}
    plain = results["plain"] if "error" not in results["plain"] else None
    device = info.get("device_name", "?")
    out = harness.heading(TITLES[run["preset"]], harness.torch_machine(info), run, cmdline)
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
        med = median(r)
        first = fmt_s(r["first_s"]) if "first_s" in r else "-"
        t_ratio = f"{med / median(plain):.2f}x" if plain else "-"
        m_ratio = f"{r['peak_mib'] / plain['peak_mib']:.2f}x" if plain and plain["peak_mib"] > 0 else "-"
        load = "-" if r.get("other_load") is None else f"{100 * r['other_load']:.0f}%"
        out.append(f"| {s['label']} | {len(r['times'])} | {fmt_s(med)} | {fmt_s(min(r['times']))}-"
                   f"{fmt_s(max(r['times']))} | {first} | {r['peak_mib']:.0f} | {t_ratio} | {m_ratio} | {load} |")
    out.append("")
    if plain:
        pieces = ", ".join(f"{k} {fmt_s(v)} s" for k, v in plain["pieces"].items())
        out += [f"Pieces of plain (medians): {pieces}.", ""]
    if device == "CPU" and not all(r["peak_reset"] for r in ok):
        out += ["Note: the peak RSS could not be reset after the model was built; a build-time peak may hide "
                "a smaller forward peak.", ""]
    out += harness.busy_note([(s["name"], results[s["name"]].get("other_load")) for s in specs])
    for note in run["notes"]:
        out.append(f"Note: {note}.")
    if run["notes"]:
        out.append("")
    out += ["Targets (ratios of medians of this run):", ""]
    out += target_lines(specs, results)
    return "\n".join(out) + "\n"


def target_lines(specs: list, results: dict) -> list:
    ok = {name: r for name, r in results.items() if "error" not in r}
    plain = ok.get("plain")
    one, many = ok.get("shared-1"), ok.get("shared-20")
    lines = [
        time_target(one, plain, TARGET_ONE_CLASS, f"1 class <= {TARGET_ONE_CLASS}x plain", "needs plain and 1 class"),
        time_target(many, one, TARGET_MANY_CLASSES, f"20 classes <= {TARGET_MANY_CLASSES:g}x 1 class",
                    "needs --classes with 1 and 20"),
    ]
    shared = [(s["name"], ok[s["name"]]) for s in specs
              if s.get("conditioning") == "shared" and s["name"] in ok]
    if plain and shared and plain["peak_mib"] > 0:
        name, worst = max(shared, key=lambda item: item[1]["peak_mib"])
        ratio = worst["peak_mib"] / plain["peak_mib"]
        lines.append(f"- **{harness.check(ratio <= TARGET_PEAK)}** peak memory <= {TARGET_PEAK}x plain (worst shared "
                     f"configuration, {name}): {worst['peak_mib']:.0f} MB / {plain['peak_mib']:.0f} MB = "
                     f"**{ratio:.2f}x**")
    else:
        lines.append(f"- not measured: peak memory <= {TARGET_PEAK}x plain")
    reference = [s for s in specs if s.get("conditioning") == "per_class" and s["name"] in ok]
    if plain and reference and plain["peak_mib"] > 0:
        most = max(reference, key=lambda s: (s["classes"], ok[s["name"]]["peak_mib"]))
        ratio = ok[most["name"]]["peak_mib"] / plain["peak_mib"]
        lines.append(f"- **{harness.check(ratio <= TARGET_REFERENCE_PEAK)}** reference mode: peak memory <= "
                     f"{TARGET_REFERENCE_PEAK}x plain ({most['name']}): {ok[most['name']]['peak_mib']:.0f} MB / "
                     f"{plain['peak_mib']:.0f} MB = **{ratio:.2f}x**")
    return lines


def time_target(result, reference, target: float, goal: str, needs: str) -> str:
    """The line of a target on ``median(result) / median(reference)`` (either may be missing)."""
    if not (result and reference):
        return f"- not measured: {goal} ({needs})"
    ratio = median(result) / median(reference)
    return (f"- **{harness.check(ratio <= target)}** {goal}: "
            f"{fmt_s(median(result))} s / {fmt_s(median(reference))} s = **{ratio:.2f}x**")
