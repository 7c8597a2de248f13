"""Training and evaluation loops on top of detectron2's DefaultTrainer."""
from .trainer import DiffSegTrainer

__all__ = ["DiffSegTrainer"]
