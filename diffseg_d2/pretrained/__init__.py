"""Frozen pretrained models, the package's bottom layer: Stable Diffusion's parts, CLIP, DINOv2, BLIP.

Each model has one module here that knows where its weights come from (a hub id,
a local folder, the ``tiny`` and ``micro`` presets, ``random:<architecture>``),
loads them (safetensors only), freezes the result (``frozen.FrozenModel``) and
builds its tiny and random architectures. Nothing here imports the rest of the
package beyond its small utilities (paths, numerics, vocabulary parsing), so
``diffusion``, ``modeling``, ``freeda`` and ``microworld`` all build on it.
"""
from .frozen import FrozenModel, exclude_from_checkpoints, load_pretrained
from .weights import MissingWeightsError, WeightsLocation, resolve_weights

__all__ = ["FrozenModel", "MissingWeightsError", "WeightsLocation", "exclude_from_checkpoints", "load_pretrained",
           "resolve_weights"]
