#!/usr/bin/env python
"""The papers' tables in one command: evaluate a method on its paper's benchmarks with this repository's
configs and print the paper's number beside ours.

    .venv/bin/python tools/reproduce_papers.py --method diffsegmenter MODEL.DEVICE cuda
    .venv/bin/python tools/reproduce_papers.py --method all --micro        # the micro-world, offline, on CPU

Each benchmark is evaluated as ``tools/train_net.py --config-file <config> --eval-only`` evaluates it (same
code); a benchmark that cannot run says what it needs (the dataset's files and their layout, weights, a
FreeDA bank, a trained ODISE checkpoint) and the others still run. Results go to ``--output`` (default
output/papers/): ``<method>.md`` (the table) and ``<method>.png`` (the paper's number and ours side by side
per benchmark). ``--micro`` evaluates the micro-world configs instead (no paper number: these are this
project's micro models, which measure the code, not the papers' models).

The papers' numbers (``PAPERS``) are copied only from a source read for this repository, named per method;
where none was read here the number is left empty ("not verified here"), never guessed.
"""
import argparse
import logging
import os
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import diffseg_d2  # noqa: F401, I001  (first: registers the datasets, silences fvcore's warning)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_net  # noqa: E402  (the evaluation tools/train_net.py --eval-only runs)

logger = logging.getLogger("diffseg_d2.reproduce_papers")


@dataclass(frozen=True)
class Benchmark:
    """One number of a paper's table: ``config`` evaluated, ``results[task][metric]`` read."""

    label: str
    config: str
    task: str
    metric: str
    paper: Optional[float] = None


@dataclass(frozen=True)
class Paper:
    title: str
    source: str
    benchmarks: Tuple[Benchmark, ...]
    micro: Tuple[Benchmark, ...] = field(default=())


PAPERS: Dict[str, Paper] = {
    "diffsegmenter": Paper(
        "DiffSegmenter (Wang et al., 2023: Diffusion Model is Secretly a Training-free Open Vocabulary Semantic "
        "Segmenter)",
        "paper numbers not verified here (the reference repository's README gives none; the paper could not be "
        "read from this machine): fill PAPERS from its Table after reading it",
        (Benchmark("Pascal VOC 2012, 21 classes", "diffsegmenter/voc21.yaml", "sem_seg", "mIoU"),
         Benchmark("Pascal Context, 60 classes", "diffsegmenter/context60.yaml", "sem_seg", "mIoU"),
         Benchmark("COCO-Object, 81 classes", "diffsegmenter/coco_object.yaml", "sem_seg", "mIoU")),
        (Benchmark("micro-world shapes, val", "micro/diffsegmenter.yaml", "sem_seg", "mIoU"),),
    ),
    "freeda": Paper(
        "FreeDA (Barsellotti et al., CVPR 2024)",
        "paper numbers not verified here (the reference repository's README gives none; secondary listings "
        "disagree between variants): fill PAPERS from the paper's main table after reading it",
        (Benchmark("Pascal VOC 2012, 20 classes", "freeda/voc20.yaml", "sem_seg", "mIoU"),
         Benchmark("Pascal Context, 59 classes", "freeda/context59.yaml", "sem_seg", "mIoU"),
         Benchmark("COCO-Stuff, 171 classes", "freeda/coco_stuff171.yaml", "sem_seg", "mIoU"),
         Benchmark("Cityscapes, 19 classes", "freeda/cityscapes.yaml", "sem_seg", "mIoU"),
         Benchmark("ADE20K, 150 classes", "freeda/ade150.yaml", "sem_seg", "mIoU")),
        (Benchmark("micro-world shapes, val", "micro/freeda.yaml", "sem_seg", "mIoU"),),
    ),
    "odise": Paper(
        "ODISE (Xu et al., CVPR 2023), label-trained model (odise_label_coco_50e)",
        "NVlabs/ODISE README, model zoo table (ODISE (label) row)",
        (Benchmark("ADE20K panoptic, 150 classes", "odise/Base-ODISE.yaml", "panoptic_seg", "PQ", 22.6),
         Benchmark("ADE20K instances, 100 thing classes", "odise/Base-ODISE.yaml", "segm", "AP", 14.4),
         Benchmark("ADE20K semantic, 150 classes", "odise/ade20k_semantic150.yaml", "sem_seg", "mIoU", 29.9),
         Benchmark("COCO panoptic, 133 classes", "odise/coco_panoptic_val.yaml", "panoptic_seg", "PQ", 55.4)),
        (Benchmark("micro-world panoptic, val", "micro/odise.yaml", "panoptic_seg", "PQ"),),
    ),
}


def evaluate(name: str, opts: List[str], output_dir: str) -> Tuple[Optional[dict], str]:
    """``(results, "")`` of the shipped config ``name`` evaluated as tools/train_net.py --eval-only does, or
    ``(None, what it needs)`` when its dataset, weights or another input is missing."""
    from detectron2.data import DatasetCatalog

    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.model_zoo import get_config_file

    config = get_config_file(name)

    try:
        cfg = get_diffseg_cfg(config, opts)
    except train_net.EXPECTED_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"
    from detectron2.modeling import META_ARCH_REGISTRY

    trained = not getattr(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), "TRAINING_FREE", False)
    if trained and not cfg.MODEL.WEIGHTS:
        return None, (f"{cfg.MODEL.META_ARCHITECTURE} is trained: set MODEL.WEIGHTS to its checkpoint (train it with "
                      f"tools/train_net.py --config-file configs/{name}, or convert the released one: README, ODISE)")
    for name in cfg.DATASETS.TEST:  # before any model loads: a missing dataset is named at once
        try:
            DatasetCatalog.get(name)
        except Exception as e:  # noqa: BLE001 - every registration names its files and the layout
            return None, f"dataset {name}: {e} (layouts: docs/datasets.md)"
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "--eval-only", *opts, "OUTPUT_DIR", output_dir])
    try:
        return train_net.run(args), ""
    except train_net.EXPECTED_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"
    except SystemExit as e:
        return None, str(e)


def reproduce(method: str, micro: bool, opts: List[str], output: str) -> List[dict]:
    """Every benchmark of ``method``'s paper (or its micro-world configs): one row each."""
    paper = PAPERS[method]
    rows, done = [], {}
    for b in paper.micro if micro else paper.benchmarks:
        if b.config not in done:  # one evaluation per config, however many of its numbers are read
            out_dir = os.path.join(output, method, os.path.splitext(b.config)[0].replace("/", "_"))
            done[b.config] = evaluate(b.config, opts, out_dir)
        results, why = done[b.config]
        ours = None
        if results is not None:
            if b.task not in results and len(results) == 1:  # keyed by the one evaluated dataset
                results = next(iter(results.values()))
            ours = (results.get(b.task) or {}).get(b.metric)
            if ours is None:
                why = f"the evaluation gave no {b.task} {b.metric} (results: {sorted(results)})"
        rows.append({"benchmark": b, "ours": ours, "why": why})
    return rows


def markdown(method: str, micro: bool, rows: List[dict], command: str) -> str:
    paper = PAPERS[method]
    lines = [f"## {paper.title}{' — micro-world' if micro else ''}", "",
             f"- Paper's numbers: {'none (micro-world models)' if micro else paper.source}",
             f"- Command: `{command}`", "",
             "| benchmark | metric | paper | ours | ours - paper | config | what it needs |",
             "|---|---|---:|---:|---:|---|---|"]
    for row in rows:
        b, ours = row["benchmark"], row["ours"]
        paper_s = "-" if b.paper is None else f"{b.paper:.1f}"
        ours_s = "-" if ours is None else f"{ours:.1f}"
        delta = "-" if ours is None or b.paper is None else f"{ours - b.paper:+.1f}"
        lines.append(f"| {b.label} | {b.metric} | {paper_s} | {ours_s} | {delta} | `configs/{b.config}` | "
                     f"{row['why'].replace('|', '/') or '-'} |")
    return "\n".join(lines) + "\n"


def plot(method: str, rows: List[dict], path: str) -> None:
    """Bars of the paper's number and ours per benchmark; a missing number is left out and marked."""
    from diffseg_d2.optional_imports import require

    matplotlib = require("matplotlib", "matplotlib", "Plotting the papers' tables")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['benchmark'].label}\n{r['benchmark'].metric}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(rows)), 4.2))
    width = 0.38
    for offset, name, values, colour in ((-width / 2, "paper", [r["benchmark"].paper for r in rows], "#8c8c8c"),
                                         (width / 2, "ours", [r["ours"] for r in rows], "#3070b0")):
        for i, value in enumerate(values):
            x = i + offset
            if value is None:
                ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=8, color=colour, rotation=90)
                continue
            ax.bar(x, value, width, color=colour, label=name if i == next(
                (j for j, v in enumerate(values) if v is not None), -1) else None)
            ax.text(x, value + 0.5, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylabel("score (%)")
    ax.set_title(textwrap.fill(PAPERS[method].title, 80), fontsize=9)
    ax.set_ylim(0, max([100.0 if r["benchmark"].metric == "mIoU" else 0.0 for r in rows] + [10.0]))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Dict[str, List[dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=(*PAPERS, "all"), default="all")
    p.add_argument("--micro", action="store_true", help="the micro-world configs (offline, CPU, minutes)")
    p.add_argument("--output", default="output/papers", help="folder of <method>.md and <method>.png")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    os.makedirs(args.output, exist_ok=True)
    command = " ".join(["python tools/reproduce_papers.py", *(sys.argv[1:] if argv is None else argv)])
    every = {}
    for method in PAPERS if args.method == "all" else (args.method,):
        rows = reproduce(method, args.micro, list(args.opts), args.output)
        text = markdown(method, args.micro, rows, command)
        with open(os.path.join(args.output, f"{method}.md"), "w", encoding="utf-8") as f:
            f.write(text)
        plot(method, rows, os.path.join(args.output, f"{method}.png"))
        print(text, flush=True)
        every[method] = rows
    return every


if __name__ == "__main__":
    main()
