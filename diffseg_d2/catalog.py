"""Dataset names in detectron2's catalogs, checked with an error that lists the choices.

Below ``data`` (which registers the datasets) so that ``vocabulary`` can check a
name without importing the registrations.
"""
from __future__ import annotations

from typing import List

from detectron2.data import DatasetCatalog


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
