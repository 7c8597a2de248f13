"""Evaluation through detectron2's own evaluators (see :func:`build_evaluator`)."""

from .report import format_results_table
from .sem_seg import SUPPORTED_EVALUATOR_TYPES, SemSegGTLoader, build_evaluator

__all__ = ["format_results_table", "SUPPORTED_EVALUATOR_TYPES", "SemSegGTLoader", "build_evaluator"]
