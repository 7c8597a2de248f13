"""Checkpoints of trained models: read weights-only, and loaded whole or not at all.

Two guarantees that hold whichever checkpointer loads a diffseg_d2 model (ours,
detectron2's stock ``DetectionCheckpointer`` under ``DefaultPredictor`` or
``DefaultTrainer``, or a plain ``model.load_state_dict``):

* ``check_checkpoint_file`` runs while the model is BUILT (every ``from_config`` of
  the package calls it through ``config.check_config``), so before any checkpointer
  opens ``MODEL.WEIGHTS``, and again in ``SafeCheckpointer`` on the file a
  checkpointer actually reads (``--resume``'s ``last_checkpoint`` included). It looks
  at the path detectron2 will read (``checkpoint_read_path``: the query of a URL or
  file name taken off, as ``DetectionCheckpointer.load`` does), refuses pickles
  (``.pkl``/``.pyth``: detectron2 would ``pickle.load`` them, which runs whatever code
  the file carries) and any local file that ``torch.load(weights_only=True)`` cannot read.
* ``refuse_partial_loads(module)`` installs a load-state-dict pre-hook that runs
  before a single tensor is copied and raises ``CheckpointMismatchError`` when the
  given keys are not exactly the module's own (missing, unexpected or of another
  shape), instead of fvcore's warning and a model with an untrained head.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

# Suffixes that detectron2's DetectionCheckpointer reads with pickle or a full torch.load.
PICKLE_SUFFIXES = (".pkl", ".pyth", ".pickle")
_REMOTE_PREFIXES = ("http://", "https://", "detectron2://", "catalog://", "manifold://", "s3://", "gs://")


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be read without unpickling arbitrary objects."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose model keys are not the model's."""


def checkpoint_read_path(path: str) -> str:
    """The path detectron2's ``DetectionCheckpointer.load`` reads for ``path``: its query taken off
    (``model.pkl?dl=1`` -> ``model.pkl``), for URLs and local names alike.

    Every check of a checkpoint path must look at this path, not the string it was given: a check
    of the raw string let ``http://host/model.pkl?dl=1`` (or a weights-only file named
    ``m.pkl?dl=1`` beside a pickle ``m.pkl``) through, and detectron2 then unpickled ``model.pkl``.
    """
    return urlparse(path)._replace(query="").geturl()


def _is_remote(path: str) -> bool:
    return path.startswith(_REMOTE_PREFIXES)


def check_checkpoint_file(path: str, config_key: str = "MODEL.WEIGHTS") -> None:
    """Raise unless ``path`` is empty or a checkpoint that loads with ``weights_only=True``.

    The path checked is the one detectron2 reads (:func:`checkpoint_read_path`). Remote paths
    (URLs, ``detectron2://``) are only checked by suffix here; the file they download to is
    checked again by ``SafeCheckpointer`` before it is read, and read by any detectron2
    checkpointer with a ``torch.load`` that is weights-only by default (torch >= 2.6, which the
    package requires), unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns that off: then a remote
    path is refused, since nothing here would read it weights-only.
    """
    if not path:
        return
    read = checkpoint_read_path(path)
    shown = repr(path) if read == path else f"{path!r} (read as {read!r})"
    if read.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeCheckpointError(
            f"{config_key} = {shown} is a pickle file; it is not loaded, because unpickling can run "
            "arbitrary code. Convert it to a .pth state dict of tensors (torch.save(model.state_dict()) "
            "in a trusted environment) and point the key there."
        )
    if _is_remote(read):
        if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in ("", "0", "false"):
            raise UnsafeCheckpointError(
                f"{config_key} = {shown} is downloaded and read by detectron2's checkpointer, and "
                "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, so torch.load would unpickle it. Unset that "
                "variable, or download the file and give its local path."
            )
        return
    if not os.path.isfile(read):
        raise FileNotFoundError(f"{config_key} = {shown}: no such file. Give the path of a .pth checkpoint, or '' for none.")
    local = read
    try:
        try:  # a zip-format checkpoint is only mapped: its tensors are not read here
            torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(local, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise UnsafeCheckpointError(
            f"{config_key} = {shown} cannot be read weights-only (torch.load(weights_only=True)), so it is "
            f"not loaded: it holds objects other than tensors and plain containers, or it is damaged. "
            f"Load it once in a trusted environment and save its state dict alone. ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def _listing(title: str, keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{title} ({len(keys)}): {shown}"


def state_dict_mismatch(expected: Dict[str, Tuple[int, ...]], given: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    """What keeps ``given`` (key -> shape) from fitting ``expected`` exactly, or None."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(
        f"{k} {given[k]} vs {expected[k]}" for k in set(expected) & set(given) if given[k] != expected[k]
    )
    parts = [
        _listing(title, keys)
        for title, keys in (
            ("missing from the checkpoint", missing),
            ("not in this model", unexpected),
            ("with other shapes (checkpoint vs model)", reshaped),
        )
        if keys
    ]
    return "; ".join(parts) if parts else None


def require_fit(model: nn.Module, items: Iterable[Tuple[str, object]]) -> None:
    """Raise ``CheckpointMismatchError`` unless the ``(key, value)`` pairs of a checkpoint are exactly
    ``model.state_dict()``'s keys with the same shapes (a value without a shape counts as shape ())."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = state_dict_mismatch(expected, {k: tuple(getattr(v, "shape", ())) for k, v in items})
    if problem:
        raise CheckpointMismatchError(
            f"The checkpoint does not fit {type(model).__name__}, so nothing was loaded. {problem}. Was it "
            "written by another architecture or config (MODEL.META_ARCHITECTURE, head sizes, vocabulary)? "
            "Pass the matching --config-file, or MODEL.WEIGHTS of this model."
        )


def refuse_partial_loads(module: nn.Module) -> None:
    """Make every ``load_state_dict`` reaching ``module`` (directly or as part of a larger model)
    raise ``CheckpointMismatchError`` before anything is copied, unless the keys under its prefix
    are exactly those of ``module.state_dict()`` with the same shapes. ``strict=False`` does not
    relax this: a half-loaded model is never what a user of this package wants."""

    def check(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        require_fit(mod, ((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix)))

    module._register_load_state_dict_pre_hook(check, with_module=True)
