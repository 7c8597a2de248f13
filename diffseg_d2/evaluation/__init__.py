"""Evaluation through detectron2's own evaluators (see :func:`build_evaluator`)."""

from .build import (
    SUPPORTED_EVALUATOR_TYPES,
    PanopticInstanceCOCOEvaluator,
    build_evaluator,
    check_panoptic_dataset,
)
from .report import format_results_table
from .sem_seg import SemSegGTLoader

__all__ = [
    "format_results_table",
    "SUPPORTED_EVALUATOR_TYPES",
    "PanopticInstanceCOCOEvaluator",
    "SemSegGTLoader",
    "build_evaluator",
    "check_panoptic_dataset",
]
