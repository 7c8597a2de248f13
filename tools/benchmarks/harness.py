"""What every benchmark of tools/benchmark.py shares.

* Worker processes: every configuration runs in its own process (``tools/benchmark.py --worker
  SPEC``, SPEC a JSON object with at least ``preset``, ``name``, ``threads``), so that its peak memory
  is its own; the worker prints one ``RESULT_PREFIX`` line with the measurement as JSON.
* Measuring: wall time (``timed``, CUDA synchronised), the increase of peak memory
  (``PeakMemory``), the share of the CPUs other processes used meanwhile (``OtherLoad``), waiting
  for a quiet machine (``wait_for_quiet``), lowering repeats to fit a time budget (``fit_repeats``).
* Inputs: the bundled VOC sample image, random unit rows (bank keys and prototypes).
* Markdown: number formats, the heading and per-configuration table of a section, and writing a
  section between its ``<!-- tools/benchmark.py <preset>: begin/end -->`` markers.
"""
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("diffseg_d2.benchmark")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "benchmark.py")
RESULT_PREFIX = "BENCHMARK_RESULT "


def config_path(*parts: str) -> str:
    """A config file of the repository: ``config_path("tiny", "odise.yaml")``."""
    return os.path.join(ROOT, "configs", *parts)


# ====================================================================== worker processes
def threads(requested: int) -> int:
    """Torch (and faiss) threads: ``requested``, or the cores this process may use when it is 0."""
    return requested if requested > 0 else len(os.sched_getaffinity(0))


def run_worker(spec: dict, measure) -> dict:
    """In the worker process: ``measure(spec)`` with the spec's threads, plus what every table needs.

    ``other_load`` covers the whole measurement (model build included) unless ``measure`` gives its own.
    """
    import torch

    n = threads(spec["threads"])
    torch.set_num_threads(n)
    device = spec.get("device", "cpu")
    load = OtherLoad()
    load.start()
    result = measure(spec)
    result.setdefault("other_load", load.fraction())
    result.update(threads=n, torch=torch.__version__,
                  device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "CPU")
    return result


def run_in_subprocess(spec: dict, wait_quiet_s: float = 0.0) -> dict:
    """Run one configuration in a fresh process; its stderr (logs) passes through."""
    if wait_quiet_s > 0:
        wait_for_quiet(wait_quiet_s)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, SCRIPT, "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        why = f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
        logger.error("%s failed: %s", spec["name"], why)
        return {"error": why, "wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = wall
    return result


def run_each(specs: list, wait_quiet_s: float) -> dict:
    """Every configuration in its own process, in order: name -> result."""
    results = {}
    for s in specs:
        logger.info("%s: %s (%d repeats)", s["preset"], s["name"], s["repeats"])
        results[s["name"]] = run_in_subprocess(s, wait_quiet_s)
    return results


def run_kinds(preset: str, kinds: dict, args, device: str, default_repeats: int) -> dict:
    """A preset whose configurations are its ``kinds`` (name -> table label), each in its own process."""
    start = time.perf_counter()
    base = {"preset": preset, "device": device, "threads": args.threads, "repeats": args.repeats or default_repeats}
    specs = [{**base, "name": kind, "kind": kind, "label": label} for kind, label in kinds.items()]
    results = run_each(specs, args.wait_quiet)
    return {"preset": preset, "specs": specs, "results": results, "wall_s": time.perf_counter() - start}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    # Asked in a child so that the driver process stays small (no torch import).
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


# ====================================================================== measuring
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

    def result(self) -> dict:
        """The entries of a measurement: ``peak_mib`` (the increase so far), ``baseline_mib``, ``peak_reset``."""
        return {"peak_mib": self.increase_mib(), "baseline_mib": self.baseline_mib, "peak_reset": self.peak_reset}


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


def timed(fn, device: str):
    """``(seconds, fn())``, waiting for CUDA work to finish on both ends."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def timed_calls(fn, repeats: int, device: str) -> list:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    times = [timed(fn, device)[0] for _ in range(1 + repeats)]
    return times[1:]


def median(result: dict) -> float:
    """Median of a measurement's ``times``."""
    return statistics.median(result["times"])


def sample_image(size: int = 0):
    """The bundled VOC sample (375x500), resized to ``size`` x ``size`` when given: (3, H, W) RGB float in [0, 255]."""
    import numpy as np
    import torch
    from PIL import Image

    from diffseg_d2.data.datasets.register_sample import sample_image_path
    from diffseg_d2.data.image import read_image_rgb

    rgb = read_image_rgb(sample_image_path())
    if size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()


def random_unit_rows(n: int, dim: int, seed: int):
    """(n, dim) float32 rows uniformly distributed on the unit sphere; normalised in place (one copy)."""
    import torch

    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    rows /= rows.norm(dim=1, keepdim=True)
    return rows


def fit_repeats(specs: list, call_s: dict, setup_s: float, budget_s: float, basis: str) -> list:
    """Lower repeats (slowest configuration first, down to 1) so the estimated run fits ``budget_s``.

    A configuration costs ``setup_s`` (process start and model build) plus its warm-up call, first
    call and repeats, each estimated at ``call_s[name]`` seconds (from ``basis``, which the notes
    name). Lowers ``spec["repeats"]`` in place; returns notes on what was lowered.
    """

    def total() -> float:
        return sum(setup_s + (2 + s["repeats"]) * call_s[s["name"]] for s in specs)

    requested = {s["name"]: s["repeats"] for s in specs}
    while total() > budget_s:
        lowerable = [s for s in specs if s["repeats"] > 1]
        if not lowerable:
            break
        max(lowerable, key=lambda s: call_s[s["name"]])["repeats"] -= 1
    notes = [
        f"{s['name']}: repeats lowered from {requested[s['name']]} to {s['repeats']} to fit --budget-min "
        f"(one call estimated at {call_s[s['name']]:.0f} s from {basis})"
        for s in specs if s["repeats"] != requested[s["name"]]
    ]
    if total() > budget_s:
        notes.append(f"the run is estimated at {total() / 60:.0f} min, over --budget-min even with 1 repeat each")
    return notes


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


def fmt_s(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 100 else f"{t:.0f}"


def fmt_min(t: float) -> str:
    return f"{t / 60:.0f} min" if t >= 90 else f"{t:.0f} s"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ms(t: float) -> str:
    return f"{1e3 * t:.1f}" if t < 0.1 else f"{1e3 * t:.0f}"


def check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def torch_machine(info: dict) -> str:
    """The machine of a worker's result: CPU model and torch threads, or the GPU and its host CPU; torch, dtype."""
    device, cpu = info.get("device_name", "?"), cpu_model()
    machine = f"{cpu}, {info.get('threads', '?')} torch threads" if device == "CPU" else f"{device} (host CPU: {cpu})"
    return f"{machine}; torch {info.get('torch', '?')}, {info.get('dtype', '?')}"


def heading(title: str, machine: str, run: dict, cmdline: str) -> list:
    """A section's first lines: title, machine, date and wall time, command."""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        f"### {title}",
        "",
        f"- Machine: {machine}",
        f"- Date: {date}; wall time of this preset: {run['wall_s'] / 60:.1f} min",
        f"- Command: `{cmdline}`",
    ]


def busy_note(loads: list) -> list:
    """Markdown lines naming the ``(name, share)`` configurations during which others used over 10% of the CPUs."""
    busy = [(name, v) for name, v in loads if v is not None and v > 0.1]
    if not busy:
        return []
    names = ", ".join(f"{name} ({100 * v:.0f}%)" for name, v in busy)
    return ["Note: other processes kept part of the CPUs busy while these configurations ran, so their "
            f"times are inflated and noisier: {names}.", ""]


def kinds_table(run: dict, cmdline: str, title: str, about: list, stages: bool = False):
    """The heading and per-configuration table of a preset whose rows are time and peak memory (ODISE,
    FreeDA, the bank build), and the configurations that ran (name -> result); ``stages`` adds a
    column with each result's ``pieces``."""
    results = run["results"]
    ok = {k: r for k, r in results.items() if "error" not in r}
    extra = " stages (median s) |" if stages else ""
    out = heading(title, torch_machine(next(iter(ok.values()), {})), run, cmdline) + [
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
        row = (f"| {s['label']} | {fmt_s(median(r))} | {fmt_s(min(r['times']))}-{fmt_s(max(r['times']))} "
               f"| {r['peak_mib']:.0f} | {load} |")
        if stages:
            row += " " + ", ".join(f"{k} {fmt_s(v)}" for k, v in r["pieces"].items()) + " |"
        out.append(row)
    return out, ok


def write_section(path: str, preset: str, section: str) -> None:
    """Replace (or append) ``preset``'s section of ``path`` between its begin/end markers."""
    from diffseg_d2.evaluation.report import update_marked_section

    update_marked_section(path, f"tools/benchmark.py {preset}", section)
    logger.info("updated the %s section of %s", preset, path)
