"""Models of diffseg_d2; importing registers every meta-architecture (no weights are loaded)."""
from . import meta_arch  # noqa: F401  (registers)
from .meta_arch import DiffSegmenter, FreeDA

__all__ = ["DiffSegmenter", "FreeDA"]
