#!/usr/bin/env python
"""Segmentation quality on held-out micro-world scenes, with the micro models trained by the project.

    python tools/benchmark_quality.py                          # the table on stdout
    python tools/benchmark_quality.py --write BENCHMARKS.md    # and into its section of BENCHMARKS.md
    python tools/benchmark_quality.py --count 50               # a quick look on fewer scenes

Every method row runs ``tools/train_net.py --eval-only`` in its own process on the
evaluated datasets (detectron2's ``SemSegEvaluator``; mIoU); the trivial baselines
(all background, a uniformly random class per pixel) go through the same evaluator
in this process. Every setting was fixed before the held-out split was looked at:
the configs name them, this tool only switches the parts being measured on and off.
"""
import argparse
import datetime
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DIFFSEGMENTER = os.path.join(ROOT, "configs", "micro", "diffsegmenter.yaml")
DATASETS = ("diffseg_microworld_shapes_val", "diffseg_microworld_colourshapes_val")
SECTION = "tools/benchmark_quality.py microworld"
NO_FILTER = ["MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False"]
PLAIN_WEIGHTS = os.path.join(ROOT, "diffseg_d2", "microworld", "weights", "diffusion_plain")

# (label, config, opts). Rows whose weights are missing are reported as such, not skipped silently.
ROWS = [
    ("DiffSegmenter, cross-attention only", DIFFSEGMENTER, ["MODEL.DIFFSEG.REFINE", "False", *NO_FILTER]),
    ("DiffSegmenter + self-attention refinement", DIFFSEGMENTER, NO_FILTER),
    ("DiffSegmenter + refinement + category filter (micro CLIP)", DIFFSEGMENTER, []),
    ("DiffSegmenter + refinement, per-class prompts", DIFFSEGMENTER, ["MODEL.DIFFSEG.CONDITIONING", "per_class", *NO_FILTER]),
    ("DiffSegmenter + refinement, noise step 50", DIFFSEGMENTER, ["MODEL.DIFFSEG.NOISE_STEP", "50", *NO_FILTER]),
    ("DiffSegmenter + refinement, noise step 300", DIFFSEGMENTER, ["MODEL.DIFFSEG.NOISE_STEP", "300", *NO_FILTER]),
    ("DiffSegmenter + refinement, model trained WITHOUT the alignment loss", DIFFSEGMENTER,
     ["MODEL.DIFFSEG.SD.WEIGHTS", PLAIN_WEIGHTS, *NO_FILTER]),
]

logger = logging.getLogger("diffseg_d2.benchmark_quality")


def run_row(config: str, opts, datasets, env) -> dict:
    """{dataset: mIoU} of one configuration through tools/train_net.py --eval-only (or {"error": why}).

    The numbers are read from the results table train_net prints (``<dataset> [sem_seg]``
    then ``| mIoU | value |``): the evaluator's own .pth file holds pickled numpy scalars,
    which are not loaded here.
    """
    with tempfile.TemporaryDirectory(prefix="quality-") as out:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", config, "--eval-only",
               "DATASETS.TEST", "(" + "".join(f"'{d}'," for d in datasets) + ")", "OUTPUT_DIR", out, *opts]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        results = {}
        for d in datasets:
            block = proc.stdout.split(f"{d} [sem_seg]", 1)
            rows = [line for line in block[-1].splitlines() if line.startswith("| mIoU")] if len(block) == 2 else []
            if not rows:
                return {"error": f"no mIoU for {d} in train_net's output"}
            results[d] = float(rows[0].strip("|").split("|")[1])
        return results


def trivial_baselines(datasets, seed: int = 0) -> dict:
    """mIoU of "all background" and "uniform random class" predictions through SemSegEvaluator."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from diffseg_d2.evaluation import build_evaluator

    out = {"all background": {}, "random class per pixel": {}}
    for d in datasets:
        records = DatasetCatalog.get(d)
        k = len(MetadataCatalog.get(d).stuff_classes)
        rng = np.random.default_rng(seed)
        for name in out:
            evaluator = build_evaluator(d, output_dir=None, distributed=False)
            evaluator.reset()
            for r in records:
                h = w = 64
                if name == "all background":
                    labels = torch.zeros(h, w, dtype=torch.long)
                else:
                    labels = torch.from_numpy(rng.integers(0, k, (h, w)))
                scores = torch.nn.functional.one_hot(labels, k).permute(2, 0, 1).float()
                evaluator.process([{"file_name": r["file_name"]}], [{"sem_seg": scores}])
            out[name][d] = float(evaluator.evaluate()["sem_seg"]["mIoU"])
    return out


def render(rows, datasets, args, wall_s: float) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    short = {d: d.replace("diffseg_microworld_", "").replace("_val", "") for d in datasets}
    lines = [
        "### Micro-world quality: mIoU on held-out scenes (micro models trained by the project)",
        "",
        f"- Date: {date}; {args.count} val scenes per dataset; wall time {wall_s / 60:.1f} min",
        f"- Command: `{shlex.join(['python', 'tools/benchmark_quality.py', *sys.argv[1:]])}`",
        "- shapes: background + 4 shapes; colourshapes: background + 16 colour-shape classes.",
        "",
        "| method | " + " | ".join(short[d] for d in datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for label, result in rows:
        if "error" in result:
            lines.append(f"| {label} | failed: {result['error'][:120]} |" + " |" * (len(datasets) - 1))
        else:
            lines.append(f"| {label} | " + " | ".join(f"{result[d]:.1f}" for d in datasets) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=500, help="val scenes per dataset (the first N of the split)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--write", metavar="FILE", help="also replace this tool's section in FILE (e.g. BENCHMARKS.md)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    os.environ["DIFFSEG_D2_MICROWORLD_COUNT"] = f"val={args.count}"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    rows = []
    for label, result in trivial_baselines(args.datasets).items():
        rows.append((label, result))
    for label, config, opts in ROWS:
        logger.info("%s", label)
        rows.append((label, run_row(config, opts, args.datasets, env)))
        logger.info("  -> %s", rows[-1][1])
    section = render(rows, args.datasets, args, time.perf_counter() - start)
    print(section, flush=True)
    if args.write:
        from diffseg_d2.evaluation.report import update_marked_section

        update_marked_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
