"""Meta-architectures; importing this module registers them in META_ARCH_REGISTRY."""
from .diffsegmenter import DiffSegmenter
from .freeda import FreeDA
from .odise import ODISE

__all__ = ["DiffSegmenter", "FreeDA", "ODISE"]
