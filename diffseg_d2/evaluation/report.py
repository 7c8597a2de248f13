"""Readable tables of detectron2 evaluation results."""
from __future__ import annotations

import math
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
