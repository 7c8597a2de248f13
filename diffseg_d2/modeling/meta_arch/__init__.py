"""Meta-architectures; importing this module registers them in META_ARCH_REGISTRY."""
from .daam import DAAM
from .diffsegmenter import DiffSegmenter
from .freeda import FreeDA
from .odise import ODISE

__all__ = ["DAAM", "DiffSegmenter", "FreeDA", "ODISE"]
