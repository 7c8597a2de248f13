"""The micro-world as Detectron2 datasets, written once to the cache on first use.

Registered names (registration lists no files and writes nothing):

- ``diffseg_microworld_shapes_{val,test}``: semantic, 5 classes ("background" = 0, then
  :data:`~diffseg_d2.microworld.scenes.SHAPES`), ``evaluator_type`` "sem_seg".
- ``diffseg_microworld_colourshapes_{val,test}``: semantic, 17 classes ("background" = 0,
  then the 16 "<colour> <shape>" names of ``COLOUR_SHAPE_CLASSES``).
- ``diffseg_microworld_{shapes,colourshapes}_objects_{val,test}``: the same scenes and label
  files with the background pixels ignored and no "background" class (4 or 16 classes), as
  VOC20 leaves out VOC's background: how FreeDA's paper evaluates.
- ``diffseg_microworld_panoptic_{train,val}``: panoptic in the Mask2Former convention of the
  panoptic sample: the 4 shapes are things (contiguous 0..3, dataset ids 1..4), then
  "background", the one stuff class (contiguous 4, dataset id 5); ``evaluator_type``
  "coco_panoptic_seg". Records carry ``captions`` and RLE instance ``annotations``, so
  Mask2Former-style models (ODISE) train and evaluate on them through ``tools/train_net.py``.

Every record carries ``captions`` (one caption) and ``height``/``width``; ``image_id`` is the
scene's seed. How many scenes a split holds: ``$DIFFSEG_D2_MICROWORLD_COUNT`` (read when a
dataset is loaded), either one number for every split (``"64"``) or per split
(``"train=200,val=50"``); splits not named keep :data:`DEFAULT_COUNTS`. The first ``count``
seeds of the split's range are used, so a smaller count is a prefix of a larger one.

Files, under ``<cache_dir>/microworld/<split>/`` (each written atomically, the manifest last):

- ``images/<seed>.png``: RGB (lossless, so colours are exactly those rendered);
- ``shapes/<seed>.png``, ``colourshapes/<seed>.png``: label PNGs (values as the class ids);
- ``panoptic/<seed>.png``: RGB panoptic PNG, segment id = R + 256 G + 256^2 B: object
  ``i`` of the scene (caption order) is ``i + 1``, the background ``len(objects) + 1``;
- ``panoptic_semseg/<seed>.png``: contiguous panoptic ids (shapes 0..3, background 4);
- ``panoptic_<count>.json`` (COCO panoptic), ``instances_<count>.json`` (COCO instances,
  RLE), ``scenes_<count>.json`` (manifest: seeds, captions, objects, and a fingerprint of
  the generator; a manifest whose fingerprint no longer matches the generator is redone).

``<seed>`` is the seed in 7 digits. Jsons are per count because detectron2's panoptic and
COCO evaluators expect a prediction for every image of their json.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import builtin_meta as bm
from .coco_format import coco_rle, mask_bbox_xywh, save_json, save_png
from .register_panoptic import (
    attach_instance_annotations,
    load_panoptic_json,
    panoptic_metadata,
    register_lazy_dataset,
)
from .register_semseg import build_label_lut, semseg_metadata
from ...paths import cache_dir, write_atomically
from ...microworld.scenes import COLOUR_SHAPE_CLASSES, IMAGE_SIZE, SHAPES, SPLITS, Scene, render_scene, scene_seeds


__all__ = [
    "MICROWORLD_SEMSEG_DATASET_NAMES",
    "MICROWORLD_PANOPTIC_DATASET_NAMES",
    "MICROWORLD_DATASET_NAMES",
    "COUNT_ENV",
    "DEFAULT_COUNTS",
    "MicroworldFiles",
    "split_count",
    "split_folder",
    "materialize_split",
    "microworld_semseg_metadata",
    "microworld_panoptic_metadata",
    "load_microworld_semseg",
    "load_microworld_panoptic",
    "register_all_microworld",
]

logger = logging.getLogger(__name__)

#: Environment variable with the number of scenes per split (see the module docstring).
COUNT_ENV = "DIFFSEG_D2_MICROWORLD_COUNT"
#: Scenes per split when :data:`COUNT_ENV` does not say.
DEFAULT_COUNTS: Dict[str, int] = {"train": 2000, "val": 500, "test": 500}

# Semantic datasets: name -> (split, label kind, whether "background" is a class).
_SEMSEG: Dict[str, Tuple[str, str, bool]] = {
    f"diffseg_microworld_{kind}{'' if background else '_objects'}_{split}": (split, kind, background)
    for kind in ("shapes", "colourshapes")
    for background in (True, False)
    for split in ("train", "val", "test")
}
# Panoptic datasets: name -> split.
_PANOPTIC: Dict[str, str] = {f"diffseg_microworld_panoptic_{s}": s for s in ("train", "val", "test")}

#: Semantic segmentation datasets (evaluation; the train ones are for calibrating settings, never val/test).
MICROWORLD_SEMSEG_DATASET_NAMES: Tuple[str, ...] = tuple(_SEMSEG)
#: Panoptic datasets (train: for training; val, test: for evaluation).
MICROWORLD_PANOPTIC_DATASET_NAMES: Tuple[str, ...] = tuple(_PANOPTIC)
#: Every micro-world dataset name.
MICROWORLD_DATASET_NAMES: Tuple[str, ...] = (
    MICROWORLD_SEMSEG_DATASET_NAMES + MICROWORLD_PANOPTIC_DATASET_NAMES
)

_SUBDIR = "microworld"
_IMAGES, _PANOPTIC_PNG, _PANOPTIC_SEMSEG = "images", "panoptic", "panoptic_semseg"
_LABEL_KINDS = ("shapes", "colourshapes")
#: Dataset (json) category id of "background"; shapes have ``1 + SHAPES.index``.
_BACKGROUND_DATASET_ID = 5
# Bump when the files' layout or content changes without a change of the rendered scenes.
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- #
# Counts and paths
# --------------------------------------------------------------------------- #


def split_count(split: str) -> int:
    """Scenes in ``split`` now: from ``$DIFFSEG_D2_MICROWORLD_COUNT`` or :data:`DEFAULT_COUNTS`.

    Raises:
        ValueError: the variable cannot be parsed or names an unknown split.
    """

    if split not in SPLITS:
        raise KeyError(f"Unknown micro-world split {split!r}; splits: {list(SPLITS)}")
    value = os.environ.get(COUNT_ENV, "").strip()
    counts = dict(DEFAULT_COUNTS)
    if value:
        try:
            if "=" not in value:
                counts = {s: int(value) for s in SPLITS}
            else:
                for item in value.split(","):
                    key, number = (part.strip() for part in item.split("="))
                    if key not in SPLITS:
                        raise ValueError(f"unknown split {key!r}")
                    counts[key] = int(number)
        except ValueError as e:
            raise ValueError(
                f"${COUNT_ENV}={value!r}: expected a number of scenes (e.g. 64) or "
                f"split=number pairs (e.g. train=200,val=50) for splits {list(SPLITS)} ({e})"
            ) from e
    return counts[split]


def split_folder(split: str, create: bool = False) -> Path:
    """``<cache_dir>/microworld/<split>``; ``create`` makes it (False only computes the path)."""
    folder = cache_dir(create=create) / _SUBDIR / split
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class MicroworldFiles:
    """Where the files of one materialised split (of ``count`` scenes) are.

    Attributes:
        folder: ``<cache_dir>/microworld/<split>``.
        count: number of scenes (the first ``count`` seeds of the split).
    """

    folder: Path
    count: int

    @property
    def image_root(self) -> Path:
        return self.folder / _IMAGES

    def label_root(self, kind: str) -> Path:
        """Folder of the semantic PNGs of ``kind`` ("shapes" or "colourshapes")."""
        if kind not in _LABEL_KINDS:
            raise KeyError(f"Unknown micro-world label kind {kind!r}; kinds: {list(_LABEL_KINDS)}")
        return self.folder / kind

    @property
    def panoptic_root(self) -> Path:
        return self.folder / _PANOPTIC_PNG

    @property
    def panoptic_semseg_root(self) -> Path:
        return self.folder / _PANOPTIC_SEMSEG

    @property
    def panoptic_json(self) -> Path:
        return self.folder / f"panoptic_{self.count}.json"

    @property
    def instances_json(self) -> Path:
        return self.folder / f"instances_{self.count}.json"

    @property
    def manifest(self) -> Path:
        return self.folder / f"scenes_{self.count}.json"


def _files(split: str, count: Optional[int] = None, create: bool = False) -> MicroworldFiles:

    count = split_count(split) if count is None else int(count)
    scene_seeds(split, count)  # validates split and count
    return MicroworldFiles(split_folder(split, create=create), count)


def _stem(seed: int) -> str:
    return f"{seed:07d}"


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=None)
def _fingerprint(split: str) -> str:
    """A digest of the generator's output on two seeds of ``split`` (detects a changed generator);
    the generator cannot change within a process, so it is computed once per split."""
    import hashlib


    digest = hashlib.sha256(f"format {_FORMAT_VERSION}".encode())
    for seed in scene_seeds(split, 2):
        scene = render_scene(seed)
        for array in (scene.image, scene.instance_label(), scene.colour_shape_label()):
            digest.update(array.tobytes())
        digest.update(scene.caption.encode())
    return digest.hexdigest()


def _read_manifest(files: MicroworldFiles) -> Optional[Dict[str, Any]]:
    try:
        with open(files.manifest) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _bbox_xywh(bbox: Tuple[int, int, int, int]) -> List[int]:
    x0, y0, x1, y1 = bbox
    return [x0, y0, x1 - x0, y1 - y0]


def _write_scene(
    files: MicroworldFiles, scene: "Scene"
) -> Tuple[Dict[str, Any], Dict[str, Any], List[Dict[str, Any]]]:
    """Write the PNGs of one scene; return its manifest entry, panoptic annotation and instances."""
    from panopticapi.utils import id2rgb


    name = _stem(scene.seed) + ".png"
    instance = scene.instance_label()
    background = instance == 0
    segment_ids = np.where(background, len(scene.objects) + 1, instance)
    shapes = scene.shape_label()
    panoptic_semseg = np.where(background, 4, shapes.astype(np.int64) - 1)
    for folder, array in (
        (files.label_root("shapes"), shapes),
        (files.label_root("colourshapes"), scene.colour_shape_label()),
        (files.panoptic_root, id2rgb(segment_ids)),
        (files.panoptic_semseg_root, panoptic_semseg.astype(np.uint8)),
        (files.image_root, scene.image),  # last: an image implies its labels are there
    ):
        write_atomically(folder / name, save_png(array))

    segments, instances = [], []
    for i, obj in enumerate(scene.objects):
        info = {
            "id": i + 1,
            "category_id": 1 + SHAPES.index(obj.shape),
            "area": int(obj.mask.sum()),
            "bbox": _bbox_xywh(obj.bbox),
            "iscrowd": 0,
        }
        segments.append(info)
        instances.append(dict(info, image_id=scene.seed, segmentation=coco_rle(obj.mask)))
    if background.any():
        segments.append(
            {
                "id": len(scene.objects) + 1,
                "category_id": _BACKGROUND_DATASET_ID,
                "area": int(background.sum()),
                "bbox": mask_bbox_xywh(background),
                "iscrowd": 0,
            }
        )
    entry = {
        "seed": scene.seed,
        "file_name": name,
        "caption": scene.caption,
        "objects": [
            {"colour": o.colour, "shape": o.shape, "bbox": list(o.bbox)} for o in scene.objects
        ],
    }
    annotation = {"image_id": scene.seed, "file_name": name, "segments_info": segments}
    return entry, annotation, instances


def materialize_split(split: str, count: Optional[int] = None) -> MicroworldFiles:
    """Write the first ``count`` scenes of ``split`` to the cache unless they are there already.

    Idempotent and safe to run concurrently: every file is written to a temporary name and
    renamed; the manifest ``scenes_<count>.json`` is written last and marks completion. A
    manifest from a different generator (fingerprint) is redone.

    Args:
        split: "train", "val" or "test".
        count: number of scenes; None reads :func:`split_count`.

    Returns:
        The :class:`MicroworldFiles` of the split.
    """

    files = _files(split, count, create=True)
    fingerprint = _fingerprint(split)
    manifest = _read_manifest(files)
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        return files

    for folder in (files.image_root, files.panoptic_root, files.panoptic_semseg_root) + tuple(
        files.label_root(k) for k in _LABEL_KINDS
    ):
        folder.mkdir(parents=True, exist_ok=True)
    entries, annotations, instances = [], [], []
    for seed in scene_seeds(split, files.count):
        entry, annotation, scene_instances = _write_scene(files, render_scene(seed))
        entries.append(entry)
        annotations.append(annotation)
        instances.extend(scene_instances)
    for number, ann in enumerate(instances, start=1):
        ann["id"] = number  # COCO wants unique annotation ids per json
    images = [
        {"id": e["seed"], "file_name": e["file_name"], "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        for e in entries
    ]
    categories = [{"id": 1 + i, "name": s, "isthing": 1} for i, s in enumerate(SHAPES)]
    categories.append({"id": _BACKGROUND_DATASET_ID, "name": bm.BACKGROUND, "isthing": 0})
    write_atomically(
        files.instances_json,
        save_json(
            {
                "images": images,
                "annotations": instances,
                "categories": [{"id": c["id"], "name": c["name"]} for c in categories[:-1]],
            }
        ),
    )
    write_atomically(
        files.panoptic_json,
        save_json({"images": images, "annotations": annotations, "categories": categories}),
    )
    write_atomically(
        files.manifest,
        save_json(
            {
                "split": split,
                "count": files.count,
                "size": IMAGE_SIZE,
                "fingerprint": fingerprint,
                "scenes": entries,
            }
        ),
    )
    logger.info("Wrote %d micro-world %s scenes to %s", files.count, split, files.folder)
    return files


# --------------------------------------------------------------------------- #
# Metadata and records
# --------------------------------------------------------------------------- #


def microworld_semseg_metadata(kind: str, background: bool = True) -> Dict[str, Any]:
    """Metadata (paths excluded) of the semantic datasets of ``kind`` ("shapes" or "colourshapes").

    Classes are "background" (0) then the shapes (or the colour-shape names) in label order;
    the label PNG values are the class ids (``gt_label_lut`` is the identity on them). Without
    ``background`` the classes are the objects alone: PNG value ``v`` is class ``v - 1`` and the
    background pixels (0) are ignored.
    """

    names = tuple({"shapes": SHAPES, "colourshapes": COLOUR_SHAPE_CLASSES}[kind])
    if not background:
        return semseg_metadata(names, build_label_lut({i + 1: i for i in range(len(names))}), None)
    classes = (bm.BACKGROUND,) + names
    return semseg_metadata(classes, build_label_lut({i: i for i in range(len(classes))}), 0)


def microworld_panoptic_metadata() -> Dict[str, Any]:
    """Panoptic metadata (paths excluded), Mask2Former convention, things first.

    The shapes are things with contiguous ids 0..3 (dataset ids 1..4); "background" is the
    one stuff class, contiguous 4 (dataset id 5).
    """

    return panoptic_metadata(
        tuple(SHAPES) + (bm.BACKGROUND,),
        tuple(range(1, len(SHAPES) + 1)) + (_BACKGROUND_DATASET_ID,),
        (True,) * len(SHAPES) + (False,),
    )


def _manifest_scenes(files: MicroworldFiles) -> List[Dict[str, Any]]:
    manifest = _read_manifest(files)
    if manifest is None:
        raise FileNotFoundError(f"micro-world manifest {files.manifest} is missing or unreadable")
    return manifest["scenes"]


def load_microworld_semseg(split: str, kind: str) -> List[Dict[str, Any]]:
    """Records of ``diffseg_microworld_<kind>_<split>``; writes the split on first use.

    Returns:
        One record per scene: ``file_name``, ``sem_seg_file_name``, ``image_id`` (the seed),
        ``height``, ``width``, ``captions`` (one caption).
    """

    files = materialize_split(split)
    return [
        {
            "file_name": str(files.image_root / s["file_name"]),
            "sem_seg_file_name": str(files.label_root(kind) / s["file_name"]),
            "image_id": s["seed"],
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
            "captions": [s["caption"]],
        }
        for s in _manifest_scenes(files)
    ]


def load_microworld_panoptic(split: str) -> List[Dict[str, Any]]:
    """Records of ``diffseg_microworld_panoptic_<split>``; writes the split on first use.

    Returns:
        Records as the panoptic sample's: ``file_name``, ``image_id`` (the seed), ``height``,
        ``width``, ``pan_seg_file_name``, ``segments_info`` (contiguous ``category_id``,
        ``isthing``, ``id``, ``area``, ``bbox``, ``iscrowd``), ``sem_seg_file_name``
        (contiguous ids), ``captions`` (one caption) and instance ``annotations`` (``bbox`` in
        ``BoxMode.XYWH_ABS``, ``category_id`` 0..3, ``segmentation`` a COCO RLE dict,
        ``iscrowd`` 0), one per object.
    """
    files = materialize_split(split)
    meta = microworld_panoptic_metadata()
    records = load_panoptic_json(
        str(files.panoptic_json),
        str(files.image_root),
        str(files.panoptic_root),
        meta,
        str(files.panoptic_semseg_root),
    )
    attach_instance_annotations(records, str(files.instances_json), meta)
    captions = {s["seed"]: s["caption"] for s in _manifest_scenes(files)}
    for record in records:
        record["captions"] = [captions[record["image_id"]]]
    return records


def _semseg_paths(split: str, kind: str) -> Dict[str, str]:
    files = _files(split)
    return {"image_root": str(files.image_root), "sem_seg_root": str(files.label_root(kind))}


def _panoptic_paths(split: str) -> Dict[str, str]:
    files = _files(split)
    return {
        "image_root": str(files.image_root),
        "panoptic_root": str(files.panoptic_root),
        "panoptic_json": str(files.panoptic_json),
        "sem_seg_root": str(files.panoptic_semseg_root),
        "json_file": str(files.instances_json),
    }


def register_all_microworld() -> None:
    """Register :data:`MICROWORLD_DATASET_NAMES` (idempotent; lists and writes nothing).

    Path keys of the metadata (``image_root``, ``sem_seg_root``, ``panoptic_json``, ...)
    are computed when read, from ``$DIFFSEG_D2_CACHE`` and ``$DIFFSEG_D2_MICROWORLD_COUNT``.
    """
    for name, (split, kind, background) in _SEMSEG.items():
        register_lazy_dataset(
            name,
            functools.partial(load_microworld_semseg, split, kind),
            functools.partial(_semseg_paths, split, kind),
            microworld_semseg_metadata(kind, background),
        )
    for name, split in _PANOPTIC.items():
        register_lazy_dataset(
            name,
            functools.partial(load_microworld_panoptic, split),
            functools.partial(_panoptic_paths, split),
            microworld_panoptic_metadata(),
        )


register_all_microworld()
