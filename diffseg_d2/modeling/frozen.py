"""Frozen pretrained parts that live inside a trainable model but not in its checkpoints.

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

from typing import Sequence

from torch import nn


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
