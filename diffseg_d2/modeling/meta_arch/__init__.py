"""Meta-architectures; importing this module registers them in META_ARCH_REGISTRY."""
from .diffsegmenter import DiffSegmenter

__all__ = ["DiffSegmenter"]
