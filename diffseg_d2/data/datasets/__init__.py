"""Dataset registrations. Importing this package registers every ``diffseg_`` dataset.

Registration lists no files and writes nothing; see ``docs/datasets.md`` for
the names and the folder layout expected under ``$DETECTRON2_DATASETS``.
"""

from __future__ import annotations

from typing import List

from detectron2.data import DatasetCatalog

from . import (
    builtin_meta,
    register_panoptic,
    register_sample,
    register_semseg,
)  # noqa: F401  (registers datasets)
from .register_panoptic import PANOPTIC_DATASET_NAMES
from .register_sample import SAMPLE_DATASET_NAMES, SAMPLE_PANOPTIC_DATASET_NAMES, sample_image_path
from .register_semseg import SEMSEG_DATASET_NAMES
from ...microworld import datasets as _microworld_datasets  # noqa: F401,E402  (registers the micro-world)

__all__ = [
    "PANOPTIC_DATASET_NAMES",
    "SAMPLE_DATASET_NAMES",
    "SAMPLE_PANOPTIC_DATASET_NAMES",
    "SEMSEG_DATASET_NAMES",
    "UnknownDatasetError",
    "check_dataset_name",
    "registered_diffseg_datasets",
    "sample_image_path",
]


def registered_diffseg_datasets() -> List[str]:
    """Names in ``DatasetCatalog`` that start with ``diffseg_``, sorted."""
    return sorted(n for n in DatasetCatalog.list() if n.startswith("diffseg_"))


class UnknownDatasetError(KeyError):
    """A dataset name that is neither registered nor in ``MetadataCatalog``."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


def check_dataset_name(name: str) -> None:
    """Raise :class:`UnknownDatasetError` (a KeyError) listing the ``diffseg_`` datasets when ``name``
    is not registered.

    Use before building a data loader or evaluator from a config, to replace
    detectron2's bare "not registered" error with the list of choices.
    """
    if name not in DatasetCatalog.list():
        raise UnknownDatasetError(
            f"Dataset '{name}' is not registered in detectron2's DatasetCatalog. "
            f"diffseg_d2 registers: {', '.join(registered_diffseg_datasets())}. "
            "Other datasets must be registered by the code that defines them."
        )
