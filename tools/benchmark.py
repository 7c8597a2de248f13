#!/usr/bin/env python
"""Time and memory of DiffSegmenter against the minimal cost of its input.

    python tools/benchmark.py                                # tiny and sd15, markdown on stdout
    python tools/benchmark.py --preset tiny --write BENCHMARKS.md

Per preset, in one run:

* plain: one VAE encode and one UNet pass of the same model at the same
  resolution (batch 1, context: one encoded prompt), the least any method
  reading that UNet must pay;
* ``DiffSegmenter.segment`` on one image with 1, 5 and 20 VOC classes and the
  default "shared" conditioning (category filter and caption off), and with
  the most classes under "per_class" conditioning (one UNet batch element per
  class, as the reference does) for contrast.

Every configuration runs in its own process (this script, with ``--worker``),
so that its peak memory is its own: on CPU the increase of peak RSS
(``ru_maxrss``) over the RSS just before the first forward, on CUDA the
increase of ``torch.cuda.max_memory_allocated``. Times are medians of
``--repeats`` calls after one warm-up call (min and max given too). The
warm-up uses another vocabulary of the same size, so the next call, reported
as "first call", still encodes its class prompts (the text-embedding cache is
cold); the repeats after it find them cached.

Presets: ``tiny`` is the tiny random-weight preset built from
configs/tiny/diffsegmenter.yaml; ``sd15`` is the Stable Diffusion 1.5
architecture with random weights at 512x512, built in memory (speed does not
depend on the weights, so nothing is downloaded).

A configuration's repeats are lowered, the slowest first, when the preset would
otherwise exceed ``--budget-min`` (estimated from the plain configuration's
times); the output says where. The table also gives the share of the CPUs that
other processes used while each configuration ran; on a shared machine
``--wait-quiet SECONDS`` waits for them before each configuration.
"""
import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("diffseg_d2.benchmark")

PRESETS = ("tiny", "sd15")
TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny", "diffsegmenter.yaml")
RESULT_PREFIX = "BENCHMARK_RESULT "
PLAIN_PROMPT = "a photograph of aeroplane."
# Targets of the default ("shared") conditioning.
TARGET_ONE_CLASS = 1.25  # 1 class <= this x plain
TARGET_MANY_CLASSES = 3.0  # 20 classes <= this x 1 class
TARGET_PEAK = 1.5  # peak memory increase <= this x plain's
# Guesses of a call's cost from plain's pieces, only for fitting the run into --budget-min.
SHARED_OVERHEAD = 1.3
PER_CLASS_OVERHEAD = 1.2


# ====================================================================== worker (one configuration)
def _threads(requested: int) -> int:
    return requested if requested > 0 else len(os.sched_getaffinity(0))


def build_tiny(device: str, dtype: str, conditioning: str):
    """The tiny preset through the normal config path, category filter off."""
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


def build_sd15(device: str, dtype: str, conditioning: str):
    """DiffSegmenter on the Stable Diffusion 1.5 architecture with random weights, at 512x512."""
    import transformers

    from diffseg_d2.diffusion import FrozenStableDiffusion
    from diffseg_d2.diffusion.frozen_sd import resolve_sd_weights
    from diffseg_d2.modeling import DiffSegmenter
    from diffseg_d2.random_models import random_stable_diffusion

    # The tiny preset's tokenizer is the real CLIP BPE.
    folder = resolve_sd_weights("tiny").path
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    diffusion = FrozenStableDiffusion(random_stable_diffusion("sd15", tokenizer), dtype=dtype)
    model = DiffSegmenter(
        diffusion=diffusion,
        image_size=512,
        conditioning=conditioning,
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


def run_worker(spec: dict) -> dict:
    """Build the preset's model, measure one configuration, return what the table needs."""
    import torch

    threads = _threads(spec["threads"])
    torch.set_num_threads(threads)
    device = spec["device"]
    start = time.perf_counter()
    build = build_tiny if spec["preset"] == "tiny" else build_sd15
    model = build(device, spec["dtype"], spec.get("conditioning", "shared"))
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
        device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "CPU",
        dtype=str(model.diffusion.dtype).replace("torch.", ""),
        image_size=model.image_size,
        input_size=list(image.shape[-2:]),
    )
    return result


# ====================================================================== driver
def _median(r: dict) -> float:
    return statistics.median(r["times"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark DiffSegmenter against one VAE encode + one UNet pass.")
    p.add_argument("--preset", choices=PRESETS + ("all",), default="all")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration, after one warm-up")
    p.add_argument("--classes", default="1,5,20", help="comma-separated numbers of VOC classes (at most 20)")
    p.add_argument("--no-per-class", action="store_true", help="skip the per_class conditioning contrast")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="MODEL.DIFFSEG.SD.DTYPE (half precision applies on CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use)")
    p.add_argument("--budget-min", type=float, default=25.0,
                   help="wall-time budget per preset: repeats are lowered, slowest configuration first, to fit")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--write", metavar="FILE", help="also update this preset's section in FILE (e.g. BENCHMARKS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    try:
        args.classes = sorted({int(c) for c in args.classes.split(",") if c.strip()})
    except ValueError:
        p.error(f"--classes must be comma-separated integers, got {args.classes!r}")
    if not args.classes or min(args.classes) < 1 or max(args.classes) > 20:
        p.error("--classes must name numbers between 1 and 20 (the VOC vocabulary)")
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


def configurations(args) -> list:
    specs = [{"name": "plain", "kind": "plain", "label": "plain: VAE encode + 1 UNet pass"}]
    for k in args.classes:
        specs.append({"name": f"shared-{k}", "kind": "segment", "classes": k, "conditioning": "shared",
                      "label": f"DiffSegmenter, {k} class{'es' if k > 1 else ''}, shared"})
    if not args.no_per_class:
        k = max(args.classes)
        specs.append({"name": f"per_class-{k}", "kind": "segment", "classes": k, "conditioning": "per_class",
                      "label": f"DiffSegmenter, {k} class{'es' if k > 1 else ''}, per_class"})
    return specs


def _estimated_call_s(spec: dict, plain: dict) -> float:
    pieces = plain["pieces"]
    if spec["conditioning"] == "shared":
        return SHARED_OVERHEAD * (pieces["VAE encode"] + pieces["UNet pass"]) + pieces["text encoder (1 prompt)"]
    return pieces["VAE encode"] + PER_CLASS_OVERHEAD * spec["classes"] * pieces["UNet pass"]


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
    base = {"preset": preset, "device": device, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats}
    specs = [{**base, **s} for s in configurations(args)]
    logger.info("%s: plain (%d repeats)", preset, args.repeats)
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


def _check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


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
    busy = [(s["name"], results[s["name"]]["other_load"]) for s in specs
            if results[s["name"]].get("other_load") is not None]
    if busy and max(v for _, v in busy) > 0.1:
        names = ", ".join(f"{n} ({100 * v:.0f}%)" for n, v in busy if v > 0.1)
        out += ["Note: other processes kept part of the CPUs busy while these configurations ran, so their "
                f"times are inflated and noisier: {names}.", ""]
    for note in run["notes"]:
        out.append(f"Note: {note}.")
    if run["notes"]:
        out.append("")
    out += ["Targets (default \"shared\" conditioning; ratios of medians of this run):", ""]
    out += target_lines(specs, results)
    return "\n".join(out) + "\n"


def _markers(preset: str):
    return f"<!-- tools/benchmark.py {preset}: begin -->", f"<!-- tools/benchmark.py {preset}: end -->"


def update_file(path: str, preset: str, section: str) -> None:
    """Replace the preset's marked section of ``path`` (appended if it has none; the file is created if missing)."""
    begin, end = _markers(preset)
    block = f"{begin}\n{section}{end}\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    logger.info("updated the %s section of %s", preset, path)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_PREFIX + json.dumps(run_worker(spec)), flush=True)
        return
    device = resolve_device(args.device)
    cmdline = shlex.join(["python", "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    presets = PRESETS if args.preset == "all" else (args.preset,)
    start = time.perf_counter()
    for preset in presets:
        run = run_preset(preset, args, device)
        section = render_preset(run, cmdline)
        print(section, flush=True)
        if args.write:
            update_file(args.write, preset, section)
    logger.info("benchmark done in %.1f min", (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
