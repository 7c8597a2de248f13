"""The micro-world: procedural scenes of coloured shapes with exact masks and captions.

- :mod:`.scenes`: the generator (:func:`render_scene`, :func:`scene_seeds`, :data:`SPLITS`).
- :mod:`.datasets`: the ``diffseg_microworld_*`` Detectron2 datasets, written to the cache
  on first use (registered on ``import diffseg_d2``, which imports that module anyway).

The generator's public names and the two dataset entry points are importable from here.
The trainers (``train_*``) are imported on their own: they need the model libraries.
"""
from . import scenes as _scenes
from .datasets import MICROWORLD_DATASET_NAMES, materialize_split
from .scenes import *  # noqa: F401,F403  (exactly scenes.__all__)

__all__ = [*_scenes.__all__, "MICROWORLD_DATASET_NAMES", "materialize_split"]
