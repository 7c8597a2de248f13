"""What the micro-world trainers share: resumable state, per-step randomness, atomic files.

Every file goes through ``diffseg_d2.paths.write_atomically``, so a killed run never leaves
a half-written checkpoint or weights file behind.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..paths import write_atomically
from .scenes import SPLITS, Scene, render_scene

#: The resumable checkpoint inside a trainer's output folder (removed when training ends).
STATE_FILE = "train_state.pt"


def load_train_state(output: Path, resume: bool) -> Dict:
    """The saved state of ``output`` when resuming and one exists, else {} (read with weights_only)."""
    path = Path(output) / STATE_FILE
    if resume and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    return {}


def save_train_state(path: Path, state: Dict) -> None:
    """Atomic ``torch.save`` of a trainer's state (tensors, numbers, lists and dicts only)."""
    write_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def resume_model(output: Path, resume: bool, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 history: Dict) -> Tuple[int, Dict]:
    """For a one-model trainer: restore ``model`` and ``opt`` from ``output``'s saved state when
    resuming and one exists. Returns (first step, history): ``(0, history)`` otherwise."""
    state = load_train_state(output, resume)
    if not state:
        return 0, history
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return int(state["step"]), state["history"]


def save_model_state(output: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     history: Dict) -> None:
    """For a one-model trainer: the state that ``resume_model`` restores, after ``step`` steps."""
    save_train_state(Path(output) / STATE_FILE,
                     {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "history": history})


def train_scene(index: int) -> Scene:
    """The ``index``-th scene of the train split (wrapping around it)."""
    lo, hi = SPLITS["train"]
    return render_scene(lo + index % (hi - lo))


def scene_tensor(scene: Scene) -> torch.Tensor:
    """A scene's image as a (3, H, W) float tensor in [0, 255]."""
    return torch.from_numpy(scene.image).permute(2, 0, 1).float()


def write_text(path: Path, text: str) -> None:
    """Atomically write a UTF-8 text file (configs, training.json)."""
    write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch generator of one training step: a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def warmup_cosine_lr(settings, step: int) -> float:
    """Linear warm-up over ``settings.warmup_steps``, then cosine decay of ``settings.lr`` to zero."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))
