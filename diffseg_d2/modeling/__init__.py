"""Models of diffseg_d2; importing registers every backbone and meta-architecture (no weights are loaded)."""
from . import backbone, meta_arch  # noqa: F401  (registers)
from .backbone import DiffusionUNetBackbone
from .meta_arch import ODISE, DiffSegmenter, FreeDA

__all__ = ["DiffSegmenter", "DiffusionUNetBackbone", "FreeDA", "ODISE"]
