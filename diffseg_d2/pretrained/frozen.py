"""Frozen pretrained models: one base for freezing and loading them, and keeping them out of checkpoints.

``FrozenModel`` is the base of every pretrained model the package wraps (Stable
Diffusion, CLIP, DINOv2, BLIP): its parameters never train and it stays in eval
mode whatever its parent model does. ``load_pretrained`` runs a loader on a
resolved weights location and turns a hub failure into an error that names the
config key.

ODISE's backbone holds the whole Stable Diffusion and a CLIP (several GB) next
to a few MB of trainable projections. ``exclude_from_checkpoints(owner, names)``
keeps the named submodules of ``owner`` in the module tree (so ``.to()``,
``.eval()`` and ``named_parameters()`` see them) but:

* out of ``owner.state_dict()``, wherever ``owner`` sits in a larger model
  (the hook knows its prefix), so detectron2's checkpointer never writes them;
* out of the missing keys of ``load_state_dict``, so loading a checkpoint that
  lacks them (every checkpoint we write) is not reported as incomplete.

Their weights come from ``MODEL.DIFFSEG.SD.WEIGHTS`` / ``CLIP.WEIGHTS`` at build time.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence, Tuple, Type, TypeVar

import torch
from torch import nn

from .weights import WeightsLocation, hub_load_error

logger = logging.getLogger(__name__)
T = TypeVar("T")
# The seed every random preset's weights are drawn from (tiny presets, random:<architecture>).
RANDOM_SEED = 0


class FrozenModel(nn.Module):
    """Base of a pretrained model that never trains: call :meth:`freeze` once its parts are set."""

    def freeze(self) -> None:
        """No parameter needs a gradient; eval mode (dropout off) from now on."""
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenModel":
        # Frozen: stays in eval mode whatever the parent model does.
        return super().train(False)


@contextlib.contextmanager
def random_init(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Random weights initialised from ``seed`` without touching the caller's torch random state
    (building a preset must not reseed a training that is running, or make ranks alike)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_pretrained(location: WeightsLocation, what: str, loader: Callable[[], T],
                    errors: Tuple[Type[BaseException], ...] = (OSError,)) -> T:
    """``loader()``, with a failure to load ``what`` from a hub id (offline, unknown id, ...) turned
    into a ``MissingWeightsError`` that names the config key; errors of a local folder pass as they are."""
    logger.info("loading the %s from %s", what, location.path)
    try:
        return loader()
    except errors as e:
        if location.is_local:
            raise
        raise hub_load_error(location, what, e) from e


def exclude_from_checkpoints(owner: nn.Module, names: Sequence[str]) -> None:
    """Keep ``owner``'s submodules ``names`` (dotted paths) out of its state_dict and out of missing keys on load."""
    names = tuple(names)
    for name in names:
        owner.get_submodule(name)  # raises AttributeError naming what is missing
    load_prefixes = []

    def is_excluded(key: str, prefix: str) -> bool:
        return any(key.startswith(f"{prefix}{name}.") for name in names)

    def drop_on_save(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if is_excluded(k, prefix)]:
            del state_dict[key]
        return state_dict

    def remember_prefix(module, state_dict, prefix, *args):
        # Runs before the submodules load; the post hook below only learns the keys.
        load_prefixes.append(prefix)

    def forgive_missing(module, incompatible_keys):
        while load_prefixes:
            prefix = load_prefixes.pop()
            incompatible_keys.missing_keys[:] = [
                k for k in incompatible_keys.missing_keys if not is_excluded(k, prefix)
            ]

    owner._register_state_dict_hook(drop_on_save)
    owner._register_load_state_dict_pre_hook(remember_prefix, with_module=True)
    owner.register_load_state_dict_post_hook(forgive_missing)
