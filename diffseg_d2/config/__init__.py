"""Configuration of diffseg_d2: every key lives under ``MODEL.DIFFSEG``, declared in the module of its method
(``common``, ``diffsegmenter``, ``freeda``, ``odise``: each key's comment, default and range side by side).

``add_diffseg_config(cfg)`` adds the node with the reference settings as defaults
and is idempotent, so it can be called after (or before) other projects'
``add_*_config``. ``get_diffseg_cfg(config_file, opts)`` is the one setup helper
used by the tools, the tests and user code; ``merge_config_file(cfg, path)`` is how
it (and any project that builds its own config) reads a yaml file: as data only.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .common import add_common_keys
from .diffsegmenter import CARRIER_TEMPLATE, add_diffsegmenter_keys
from .freeda import FREEDA_QUERY_TEMPLATES, add_freeda_keys
from .keys import RANGES, Keys
from .odise import add_odise_keys

__all__ = ["CARRIER_TEMPLATE", "FREEDA_QUERY_TEMPLATES", "add_diffseg_config", "check_config", "get_diffseg_cfg",
           "merge_config_file"]


def add_diffseg_config(cfg: CN) -> CN:
    """Add the ``MODEL.DIFFSEG`` node to ``cfg`` (in place; a no-op if present): every method's keys, declared in
    its module (``common``, ``diffsegmenter``, ``freeda``, ``odise``) with their defaults and ranges."""
    if "DIFFSEG" in cfg.MODEL:
        return cfg
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.DIFFSEG = CN()
    k = Keys(cfg)
    for add in (add_common_keys, add_diffsegmenter_keys, add_freeda_keys, add_odise_keys):
        add(k)
    if was_frozen:
        cfg.freeze()
    return cfg


class ConfigKeyError(KeyError):
    """A config file or ``KEY VALUE`` override naming a key that does not exist, or a missing file."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class UnsafeConfigError(ConfigKeyError):
    """A config file with a yaml tag that would construct a Python object (and so run code)."""


def merge_config_file(cfg: CN, config_file: str) -> CN:
    """Merge a yaml config file and its ``_BASE_`` chain into ``cfg`` (in place), read as data only.

    detectron2's ``merge_from_file`` allows "unsafe" yaml by default: when a file holds a Python tag
    (``!!python/object/apply:...``), fvcore reads it again with ``yaml.unsafe_load``, which calls
    whatever the tag names while the file is read. Here every file of the chain is read with
    ``yaml.safe_load`` only.

    Raises:
        UnsafeConfigError: a file of the chain holds such a tag (the message names the file and line).
        ConfigKeyError: the file does not exist and is not the name of a shipped config.
    """
    import yaml

    from ..model_zoo import find_config_file

    if not os.path.isfile(config_file):
        # A shipped config's name ("diffsegmenter/voc21.yaml", or "configs/..." outside a clone).
        shipped = find_config_file(config_file)
        if shipped is None:
            raise ConfigKeyError(f"The config file {config_file} does not exist, nor is it the name of a shipped "
                                 "config (diffseg_d2.model_zoo.list_configs() lists them).")
        config_file = str(shipped)
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else config_file
        raise UnsafeConfigError(
            f"{where}: {e.problem or 'a tag that constructs an object'}. Config files are read as data "
            "only (such a tag would make the yaml reader construct a Python object, that is, run code): "
            "write a plain value instead."
        ) from None
    return cfg


def get_diffseg_cfg(config_file: Optional[str] = None, opts: Optional[Sequence[str]] = None) -> CN:
    """A detectron2 config with the diffseg_d2 keys, merged from a yaml and ``KEY VALUE`` opts.

    Every registry entry a config may name exists by now: importing this module ran
    ``diffseg_d2/__init__.py``, which registers the meta-architectures and datasets. The yaml is
    read as data only (:func:`merge_config_file`).

    Raises:
        ConfigKeyError: ``config_file`` does not exist, or it or ``opts`` name an unknown key.
        UnsafeConfigError: ``config_file`` (or a ``_BASE_`` of it) holds a Python yaml tag.
    """
    cfg = get_cfg()
    add_diffseg_config(cfg)
    merges = [(config_file, lambda path: merge_config_file(cfg, path), config_file)] if config_file else []
    if opts:
        merges.append(("the KEY VALUE overrides", cfg.merge_from_list, list(opts)))
    for source, merge, value in merges:
        try:
            merge(value)
        except ConfigKeyError:
            raise
        except (AssertionError, KeyError) as e:
            # yacs reports unknown keys with a bare assert; say where the known ones are.
            raise ConfigKeyError(
                f"{e} (in {source}). Keys under MODEL.DIFFSEG are declared in diffseg_d2/config/*.py; "
                "other keys are detectron2's (detectron2/config/defaults.py)."
            ) from e
    return cfg


# ---------------------------------------------------------------------------- checks at build time
def _lookup(node: CN, dotted: str):
    for part in dotted.split("."):
        node = node[part]
    return node


def check_device(device: str) -> None:
    """Raise a clear error when ``MODEL.DEVICE`` names no device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"MODEL.DEVICE = {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"MODEL.DEVICE = {device!r}, but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, torch.cuda.is_available() is False). Set MODEL.DEVICE cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"MODEL.DEVICE = {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"MODEL.DEVICE = {device!r}, but MPS is not available here. Set MODEL.DEVICE cpu.")


def check_config(cfg: CN) -> None:
    """Every check a model of the package runs on ``cfg`` when it is built, before any weights load:
    the numeric ``MODEL.DIFFSEG`` keys are in range, ``MODEL.DEVICE`` exists on this machine, and
    ``MODEL.WEIGHTS`` is empty or a checkpoint that loads weights-only (never a pickle)."""
    from ..checkpoint_safety import check_checkpoint_file

    d = cfg.MODEL.DIFFSEG
    for key, (low, high, what) in RANGES.items():
        value = _lookup(d, key)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"MODEL.DIFFSEG.{key} = {value!r} must be a number {what}.")
            if (low is not None and v < low) or (high is not None and v > high):
                raise ValueError(f"MODEL.DIFFSEG.{key} = {value!r} is out of range: it must be {what}.")
    check_device(cfg.MODEL.DEVICE)
    check_checkpoint_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
