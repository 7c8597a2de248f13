"""Dataset registrations. Importing this package registers every ``diffseg_`` dataset.

Registration lists no files and writes nothing; see ``docs/datasets.md`` for
the names and the folder layout expected under ``$DETECTRON2_DATASETS``.
"""

from __future__ import annotations

from ...catalog import UnknownDatasetError, check_dataset_name, registered_diffseg_datasets
from . import (  # noqa: F401  (registers datasets)
    builtin_meta,
    register_microworld,
    register_panoptic,
    register_sample,
    register_semseg,
)
from .register_microworld import MICROWORLD_DATASET_NAMES, materialize_split
from .register_panoptic import PANOPTIC_DATASET_NAMES
from .register_sample import SAMPLE_DATASET_NAMES, SAMPLE_PANOPTIC_DATASET_NAMES, sample_image_path
from .register_semseg import SEMSEG_DATASET_NAMES

__all__ = [
    "MICROWORLD_DATASET_NAMES",
    "PANOPTIC_DATASET_NAMES",
    "SAMPLE_DATASET_NAMES",
    "SAMPLE_PANOPTIC_DATASET_NAMES",
    "SEMSEG_DATASET_NAMES",
    "UnknownDatasetError",
    "check_dataset_name",
    "materialize_split",
    "registered_diffseg_datasets",
    "sample_image_path",
]
