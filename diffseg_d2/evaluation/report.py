"""Readable tables of detectron2 evaluation results."""
from __future__ import annotations

import math
import os
from typing import Mapping

from tabulate import tabulate


def format_results_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One table per dataset and task: the summary metrics, then the per-class IoU.

    Args:
        results: ``{dataset: {task: {metric: value}}}`` as returned by
            ``DiffSegTrainer.test`` (detectron2's evaluator results per dataset).
    """
    blocks = []
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            summary = [(k, f"{v:.2f}") for k, v in metrics.items() if "-" not in k]
            per_class = [
                (k.split("-", 1)[1], f"{v:.2f}")
                for k, v in metrics.items()
                if k.startswith("IoU-") and not (isinstance(v, float) and math.isnan(v))
            ]
            blocks.append(f"{dataset} [{task}]\n" + tabulate(summary, headers=["metric", "value"], tablefmt="github"))
            if per_class:
                blocks.append(tabulate(per_class, headers=["class", "IoU"], tablefmt="github"))
    return "\n\n".join(blocks)


def update_marked_section(path: str, key: str, section: str) -> None:
    """Replace the section of ``path`` between ``<!-- key: begin -->`` and ``<!-- key: end -->``.

    The section is appended when the file has no such markers; the file is created if missing.
    The benchmark tools write their results into BENCHMARKS.md this way.
    """
    begin, end = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    block = f"{begin}\n{section}{end}\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
