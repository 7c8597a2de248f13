"""The micro-world: procedural scenes of coloured shapes with exact masks and captions.

- :mod:`.scenes`: the generator (:func:`render_scene`, :func:`scene_seeds`, :data:`SPLITS`).
- :mod:`.train_diffusion`, :mod:`.train_clip`, :mod:`.train_dense`: the trainers of the micro
  models (they need the model libraries; import them on their own).

The ``diffseg_microworld_*`` Detectron2 datasets are registered by
``diffseg_d2.data.datasets.register_microworld`` (on ``import diffseg_d2``).
The generator's public names are importable from here.
"""
from . import scenes as _scenes
from .scenes import *  # noqa: F401,F403  (exactly scenes.__all__)

__all__ = list(_scenes.__all__)
