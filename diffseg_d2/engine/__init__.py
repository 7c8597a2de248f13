"""Training and evaluation loops on top of detectron2's DefaultTrainer."""
from .checkpoint import CheckpointMismatchError, SafeCheckpointer, StrictCheckpointer
from .trainer import DiffSegTrainer

__all__ = ["CheckpointMismatchError", "DiffSegTrainer", "SafeCheckpointer", "StrictCheckpointer"]
