"""Register the panoptic segmentation datasets of the ODISE protocol (train on COCO, test on ADE20K).

Registered names (see ``docs/datasets.md`` for the folder layout):

- ``diffseg_coco_panoptic_train``, ``diffseg_coco_panoptic_val``: COCO 2017
  panoptic, 133 classes (80 things, 53 stuff), in the "standard" format.
- ``diffseg_ade20k_panoptic_train``, ``diffseg_ade20k_panoptic_val``: ADE20K
  panoptic, 150 classes (100 things, 50 stuff).

Registration is lazy: importing this module lists no files. The datasets root
(``$DETECTRON2_DATASETS``) is read when a record list or a path in the metadata
is asked for, so the variable may be set after import.

Records are those of detectron2's ``load_coco_panoptic_json``: ``file_name``,
``image_id`` (as in the json: an int for COCO, the file stem for ADE20K),
``pan_seg_file_name``, ``segments_info`` (each with the CONTIGUOUS
``category_id`` and ``isthing``, plus the json's ``id``, ``area``, ``bbox``,
``iscrowd``), plus ``height``/``width`` from the json's ``images`` and
``sem_seg_file_name`` when the semantic PNGs exist, and ``captions`` (COCO) when the captions json
exists.

Metadata follows the Mask2Former / detectron2 panoptic convention:
``stuff_classes`` lists ALL classes (things and stuff) in contiguous-id order,
``thing_classes`` the things, ``thing_dataset_id_to_contiguous_id`` maps thing
dataset ids into the full list, ``stuff_dataset_id_to_contiguous_id`` maps ALL
dataset ids; plus ``ignore_label`` 255, ``label_divisor`` 1000 and
``evaluator_type`` ``"coco_panoptic_seg"``. The path keys ``image_root``,
``panoptic_root``, ``panoptic_json`` always exist; ``sem_seg_root`` and
``json_file`` (instances json) exist only while those files are on disk.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from ...paths import datasets_root
from . import builtin_meta as bm
from .register_semseg import _missing

__all__ = [
    "PANOPTIC_DATASET_NAMES",
    "ADE20K_150_THING_IDS",
    "LABEL_DIVISOR",
    "LazyPathMetadata",
    "panoptic_metadata",
    "coco_panoptic_metadata",
    "ade20k_panoptic_metadata",
    "load_panoptic_json",
    "load_panoptic_dataset",
    "register_lazy_dataset",
    "register_all_panoptic",
]

logger = logging.getLogger(__name__)

#: ``panoptic id = class id * LABEL_DIVISOR + instance`` in models that output a single id map.
LABEL_DIVISOR = 1000

# fmt: off
#: ADE20K-150 classes that are "things" in the panoptic benchmark, as 0-based indices into
#: :data:`~diffseg_d2.data.datasets.builtin_meta.ADE20K_150_CLASSES`. The panoptic and instance
#: jsons use these indices as category ids (wall = 0 ... flag = 149).
ADE20K_150_THING_IDS: Tuple[int, ...] = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37,
    38, 39, 41, 42, 43, 44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67,
    69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92,
    93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124,
    125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)
# fmt: on


# --------------------------------------------------------------------------- #
# Metadata
# --------------------------------------------------------------------------- #


class LazyPathMetadata(Metadata):
    """detectron2 ``Metadata`` whose path keys are computed when read, not at registration.

    ``resolve_paths()`` returns ``{key: path}`` for the path keys that apply
    now (e.g. ``panoptic_json`` under the current ``$DETECTRON2_DATASETS``).
    Keys set explicitly (``meta.set(...)``) take precedence. ``as_dict()``
    includes the computed keys. Pickles when ``resolve_paths`` does (a
    module-level function or a ``functools.partial`` of one).
    """

    def __init__(
        self, name: str = "N/A", resolve_paths: Optional[Callable[[], Dict[str, str]]] = None
    ):
        # Defaults: pickle re-creates the object without arguments, then restores __dict__.
        super().__init__(name=name)
        self._resolve_paths = resolve_paths if resolve_paths is not None else dict

    def __getattr__(self, key: str) -> Any:
        # Only called for keys missing from __dict__; read __dict__ directly so that
        # unpickling (empty __dict__) cannot recurse.
        resolve = self.__dict__.get("_resolve_paths")
        if resolve is not None and not key.startswith("_"):
            paths = resolve()
            if key in paths:
                return paths[key]
        return super().__getattr__(key)

    def as_dict(self) -> Dict[str, Any]:
        out = dict(self.__dict__["_resolve_paths"]())
        out.update({k: v for k, v in self.__dict__.items() if k != "_resolve_paths"})
        return out


def panoptic_metadata(
    classes: Sequence[str], dataset_ids: Sequence[int], isthing: Sequence[bool]
) -> Dict[str, Any]:
    """Panoptic metadata (Mask2Former convention) from one list of categories.

    Args:
        classes: ALL class names (things and stuff), in contiguous-id order.
        dataset_ids: the category id of each class in the dataset's jsons.
        isthing: whether each class is a thing.

    Returns:
        Keyword arguments for ``MetadataCatalog.get(name).set(...)`` (paths excluded):
        ``stuff_classes``, ``thing_classes``, ``thing_dataset_id_to_contiguous_id``,
        ``stuff_dataset_id_to_contiguous_id``, ``ignore_label``, ``label_divisor``,
        ``evaluator_type``.
    """
    classes, dataset_ids, isthing = list(classes), list(dataset_ids), list(isthing)
    if not len(classes) == len(dataset_ids) == len(isthing):
        raise ValueError(
            f"{len(classes)} classes, {len(dataset_ids)} dataset ids, {len(isthing)} thing flags"
        )
    if len(set(dataset_ids)) != len(dataset_ids):
        raise ValueError("dataset ids are not unique")
    if len(set(classes)) != len(classes):
        raise ValueError("class names are not unique")
    return {
        "stuff_classes": classes,
        "thing_classes": [c for c, t in zip(classes, isthing) if t],
        "thing_dataset_id_to_contiguous_id": {
            d: i for i, (d, t) in enumerate(zip(dataset_ids, isthing)) if t
        },
        "stuff_dataset_id_to_contiguous_id": {d: i for i, d in enumerate(dataset_ids)},
        "ignore_label": bm.IGNORE_LABEL,
        "label_divisor": LABEL_DIVISOR,
        "evaluator_type": "coco_panoptic_seg",
    }


def _prompt_name(coco_name: str) -> str:
    # "wall-other-merged" -> "wall", "floor-wood" -> "floor wood", "door-stuff" -> "door"
    name = coco_name
    for suffix in ("-merged", "-other", "-stuff"):
        name = name.replace(suffix, "")
    return name.replace("-", " ")


def coco_panoptic_metadata() -> Dict[str, Any]:
    """Metadata of COCO panoptic: the 133 categories of detectron2's ``COCO_CATEGORIES``.

    Things come first (contiguous 0..79, the order of the instance benchmark), then
    the 53 stuff classes (80..132). Names are made prompt-friendly ("wall-other-merged"
    -> "wall", "floor-wood" -> "floor wood"); dataset ids are unchanged.
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return panoptic_metadata(
        [_prompt_name(c["name"]) for c in COCO_CATEGORIES],
        [c["id"] for c in COCO_CATEGORIES],
        [bool(c["isthing"]) for c in COCO_CATEGORIES],
    )


def ade20k_panoptic_metadata() -> Dict[str, Any]:
    """Metadata of ADE20K panoptic: the 150 classes in ADE order, dataset id = 0-based index.

    Contiguous id == dataset id == the value in the ``annotations_detectron2`` semantic PNGs.
    """
    things = set(ADE20K_150_THING_IDS)
    return panoptic_metadata(bm.ADE20K_150_CLASSES, range(150), [i in things for i in range(150)])


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_panoptic_json(
    json_file: str,
    image_dir: str,
    panoptic_dir: str,
    meta: Mapping[str, Any],
    sem_seg_dir: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Read a COCO-format panoptic json into detectron2 records.

    Gives the records of detectron2's ``load_coco_panoptic_json``, plus
    ``height``/``width`` and ``sem_seg_file_name``; unlike it, ``image_id`` keeps
    the json's type (ADE20K uses strings) and the image file name is taken from
    the json's ``images`` entry when there is one.

    Args:
        json_file: the panoptic json (``images``, ``annotations``, ``categories``).
        image_dir: folder of the images.
        panoptic_dir: folder of the panoptic PNGs (RGB, id = R + 256 G + 256^2 B).
        meta: needs ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id``; a segment's category is looked up in
            the thing table first (as detectron2 does).
        sem_seg_dir: folder of semantic PNGs named like the panoptic PNGs, or None.

    Returns:
        One record per annotation, in the json's order.

    Raises:
        ValueError: a segment has a category id the metadata does not know.
    """
    with open(json_file) as f:
        data = json.load(f)
    images = {img["id"]: img for img in data.get("images", [])}
    things = meta["thing_dataset_id_to_contiguous_id"]
    stuff = meta["stuff_dataset_id_to_contiguous_id"]
    records = []
    for ann in data["annotations"]:
        image_id = ann["image_id"]
        stem = os.path.splitext(ann["file_name"])[0]
        image = images.get(image_id, {})
        segments = []
        for seg in ann["segments_info"]:
            dataset_id = seg["category_id"]
            # Things first, as detectron2 does: in the "separated" convention the stuff
            # table holds only stuff ids.
            if dataset_id in things:
                segments.append(dict(seg, category_id=things[dataset_id], isthing=True))
            elif dataset_id in stuff:
                segments.append(dict(seg, category_id=stuff[dataset_id], isthing=False))
            else:
                raise ValueError(
                    f"{json_file}: image {image_id!r} has a segment of category id {dataset_id}, "
                    "which is in neither thing_dataset_id_to_contiguous_id nor "
                    "stuff_dataset_id_to_contiguous_id of the metadata."
                )
        record = {
            "file_name": os.path.join(image_dir, image.get("file_name", stem + ".jpg")),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_dir, ann["file_name"]),
            "segments_info": segments,
        }
        if "height" in image and "width" in image:
            record["height"], record["width"] = int(image["height"]), int(image["width"])
        if sem_seg_dir is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_dir, stem + ".png")
        records.append(record)
    return records


@dataclass(frozen=True)
class _PanopticSplit:
    image_dir: str
    panoptic_dir: str
    panoptic_json: str
    sem_seg_dir: str
    instances_json: str
    layout: str  # the expected tree, for error messages
    captions_json: str = ""  # COCO captions of the images, attached as ``captions`` when on disk

    def paths(self, root: Path) -> Dict[str, str]:
        """Metadata path keys under ``root``; the optional ones only when they exist."""
        out = {
            "image_root": str(root / self.image_dir),
            "panoptic_root": str(root / self.panoptic_dir),
            "panoptic_json": str(root / self.panoptic_json),
        }
        if (root / self.sem_seg_dir).is_dir():
            out["sem_seg_root"] = str(root / self.sem_seg_dir)
        if (root / self.instances_json).is_file():
            out["json_file"] = str(root / self.instances_json)
        return out


def attach_instance_annotations(records: List[Dict[str, Any]], instances_json: str, meta: Mapping[str, Any]) -> None:
    """Give each record the detectron2 instance ``annotations`` of its ``image_id`` in a COCO
    instances json: ``bbox`` in ``BoxMode.XYWH_ABS``, ``category_id`` contiguous through
    ``meta["thing_dataset_id_to_contiguous_id"]``, ``segmentation`` a COCO RLE dict, ``iscrowd`` 0."""
    from detectron2.structures import BoxMode

    with open(instances_json) as f:
        by_image: Dict[Any, List[Dict[str, Any]]] = {}
        for ann in json.load(f)["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
    things = meta["thing_dataset_id_to_contiguous_id"]
    for record in records:
        record["annotations"] = [
            {
                "bbox": list(ann["bbox"]),
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": things[ann["category_id"]],
                "segmentation": dict(ann["segmentation"]),
                "iscrowd": 0,
            }
            for ann in by_image.get(record["image_id"], [])
        ]


def attach_captions(records: List[Dict[str, Any]], captions_json: str) -> None:
    """Give each record the ``captions`` (list of str) of its ``image_id`` in a COCO captions json."""
    with open(captions_json) as f:
        by_image: Dict[Any, List[str]] = {}
        for ann in json.load(f)["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    for record in records:
        if record["image_id"] in by_image:
            record["captions"] = by_image[record["image_id"]]


def _coco_layout(split: str) -> str:
    return f"""\
coco/
  {split}2017/*.jpg
  panoptic_{split}2017/*.png                    (RGB panoptic PNGs)
  annotations/panoptic_{split}2017.json
  panoptic_semseg_{split}2017/*.png             (optional: contiguous ids 0..132, 255 = void; for mIoU)
  annotations/instances_{split}2017.json        (optional: for mask AP)
  annotations/captions_{split}2017.json         (optional: captions, for ODISE's caption grounding)"""


def _ade_layout(split: str, folder: str) -> str:
    return f"""\
ADEChallengeData2016/
  images/{folder}/*.jpg
  ade20k_panoptic_{split}/*.png                 (RGB panoptic PNGs)
  ade20k_panoptic_{split}.json
  annotations_detectron2/{folder}/*.png         (optional: ids 0..149, 255 = void; for mIoU)
  ade20k_instance_{split}.json                  (optional: for mask AP)"""


def _coco_split(split: str) -> _PanopticSplit:
    return _PanopticSplit(
        f"coco/{split}2017",
        f"coco/panoptic_{split}2017",
        f"coco/annotations/panoptic_{split}2017.json",
        f"coco/panoptic_semseg_{split}2017",
        f"coco/annotations/instances_{split}2017.json",
        _coco_layout(split),
        f"coco/annotations/captions_{split}2017.json",
    )


def _ade_split(split: str, folder: str) -> _PanopticSplit:
    return _PanopticSplit(
        f"ADEChallengeData2016/images/{folder}",
        f"ADEChallengeData2016/ade20k_panoptic_{split}",
        f"ADEChallengeData2016/ade20k_panoptic_{split}.json",
        f"ADEChallengeData2016/annotations_detectron2/{folder}",
        f"ADEChallengeData2016/ade20k_instance_{split}.json",
        _ade_layout(split, folder),
    )


def _all_panoptic() -> Dict[str, Tuple[_PanopticSplit, Callable[[], Dict[str, Any]]]]:
    return {
        "diffseg_coco_panoptic_train": (_coco_split("train"), coco_panoptic_metadata),
        "diffseg_coco_panoptic_val": (_coco_split("val"), coco_panoptic_metadata),
        "diffseg_ade20k_panoptic_train": (
            _ade_split("train", "training"),
            ade20k_panoptic_metadata,
        ),
        "diffseg_ade20k_panoptic_val": (_ade_split("val", "validation"), ade20k_panoptic_metadata),
    }


_SPECS = _all_panoptic()

#: Names registered by :func:`register_all_panoptic`, in a stable order.
PANOPTIC_DATASET_NAMES: Tuple[str, ...] = tuple(_SPECS)


def _paths_now(name: str) -> Dict[str, str]:
    return _SPECS[name][0].paths(datasets_root())


def load_panoptic_dataset(name: str, root: Optional[Path] = None) -> List[Dict[str, Any]]:
    """List the records of a registered ``diffseg_`` panoptic dataset (what ``DatasetCatalog.get`` calls).

    Args:
        name: one of :data:`PANOPTIC_DATASET_NAMES`.
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default ``./datasets``) now.

    Returns:
        Records as described in the module docstring; ``sem_seg_file_name`` only when
        the semantic PNG folder exists.

    Raises:
        KeyError: ``name`` is not a dataset of this module.
        FileNotFoundError: the image folder, panoptic PNG folder or panoptic json is
            missing, or the first record's image or PNG is (the message names the path,
            the dataset, the expected layout and ``DETECTRON2_DATASETS``).
    """
    if name not in _SPECS:
        raise KeyError(f"'{name}' is not one of {list(PANOPTIC_DATASET_NAMES)}")
    split, make_meta = _SPECS[name]
    root = Path(datasets_root() if root is None else root)
    image_dir, pan_dir, pan_json = (
        root / split.image_dir,
        root / split.panoptic_dir,
        root / split.panoptic_json,
    )
    for what, path, ok in (
        ("image folder", image_dir, image_dir.is_dir()),
        ("panoptic PNG folder", pan_dir, pan_dir.is_dir()),
        ("panoptic json", pan_json, pan_json.is_file()),
    ):
        if not ok:
            raise _missing(what, path, name, root, split.layout)
    sem_dir = root / split.sem_seg_dir
    has_sem = sem_dir.is_dir()
    if not has_sem:
        logger.warning(
            "'%s': no semantic PNGs at %s; records get no sem_seg_file_name and mIoU is not "
            "evaluated (see docs/datasets.md to make them).",
            name,
            sem_dir,
        )
    records = load_panoptic_json(
        str(pan_json),
        str(image_dir),
        str(pan_dir),
        make_meta(),
        str(sem_dir) if has_sem else None,
    )
    captions = root / split.captions_json if split.captions_json else None
    if captions is not None and captions.is_file():
        attach_captions(records, str(captions))
    if records:
        for what, key in (("image", "file_name"), ("panoptic PNG", "pan_seg_file_name")):
            if not os.path.isfile(records[0][key]):
                raise _missing(what, Path(records[0][key]), name, root, split.layout)
    logger.info("Loaded %d panoptic records of '%s' from %s", len(records), name, root)
    return records


def register_lazy_dataset(
    name: str,
    loader: Callable[[], List[Dict[str, Any]]],
    resolve_paths: Callable[[], Dict[str, str]],
    meta: Mapping[str, Any],
) -> None:
    """Register a dataset (panoptic or semantic) whose metadata paths are resolved when read (idempotent).

    Args:
        name: the dataset name.
        loader: returns the records (``DatasetCatalog``'s function).
        resolve_paths: returns the metadata path keys that apply now
            (see :class:`LazyPathMetadata`).
        meta: the other metadata keys (e.g. from :func:`panoptic_metadata`).
    """
    if name in DatasetCatalog.list():
        return  # already registered, e.g. when a module runs as __main__
    DatasetCatalog.register(name, loader)
    MetadataCatalog[name] = LazyPathMetadata(name=name, resolve_paths=resolve_paths).set(**meta)


def register_all_panoptic() -> None:
    """Register every dataset of :data:`PANOPTIC_DATASET_NAMES` (idempotent, lists no files)."""
    for name, (_, make_meta) in _SPECS.items():
        register_lazy_dataset(
            name,
            functools.partial(load_panoptic_dataset, name),
            functools.partial(_paths_now, name),
            make_meta(),
        )


register_all_panoptic()
