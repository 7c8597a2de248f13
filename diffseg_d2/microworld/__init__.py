"""The micro-world (issue 5): procedural scenes of coloured shapes with exact masks and captions.

- :mod:`.scenes`: the generator (:func:`render_scene`, :func:`scene_seeds`, :data:`SPLITS`).
- :mod:`.datasets`: the ``diffseg_microworld_*`` Detectron2 datasets, written to the cache
  on first use (registered on ``import diffseg_d2``).

The names below are importable from this package; they are loaded on first access, so that
importing the package (which dataset registration does) loads no module it does not need.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "scenes": (
        "SHAPES",
        "COLOURS",
        "COLOUR_RGB",
        "COLOUR_SHAPE_CLASSES",
        "IMAGE_SIZE",
        "SPLITS",
        "MIN_VISIBLE_FRACTION",
        "SceneObject",
        "Scene",
        "render_scene",
        "scene_seeds",
        "caption_of",
    ),
    "datasets": ("MICROWORLD_DATASET_NAMES", "materialize_split"),
}
_ORIGIN = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_ORIGIN)


def __getattr__(name: str) -> Any:
    if name in _ORIGIN:
        return getattr(importlib.import_module(f".{_ORIGIN[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_ORIGIN))
