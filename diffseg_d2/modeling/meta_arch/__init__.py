"""Meta-architectures; importing this module registers them in META_ARCH_REGISTRY."""
from .diffsegmenter import DiffSegmenter
from .freeda import FreeDA

__all__ = ["DiffSegmenter", "FreeDA"]
