"""Data for diffseg_d2: importing this package registers the ``diffseg_`` datasets.

Lightweight on purpose: no diffusers/transformers/open_clip/imgviz/pycocotools
import, and nothing is read or written until a dataset is loaded.
"""

from . import datasets  # noqa: F401  (registers datasets)
from .datasets import check_dataset_name, sample_image_path
from .panoptic_mapper import MaskFormerPanopticMapper

__all__ = ["MaskFormerPanopticMapper", "check_dataset_name", "sample_image_path"]
