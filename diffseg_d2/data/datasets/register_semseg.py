"""Register the semantic segmentation benchmarks with detectron2's catalogs.

Every dataset is registered under a ``diffseg_`` name (see
:data:`SEMSEG_DATASET_NAMES` and ``docs/datasets.md``). Registration is lazy:
importing this module only records names and metadata; the files are listed
when ``DatasetCatalog.get(name)`` calls the loader. The loader reads the
datasets root (``$DETECTRON2_DATASETS``, see :func:`diffseg_d2.paths.datasets_root`)
at that moment, so the variable may also be set after import.

Each record holds ``file_name``, ``sem_seg_file_name`` and ``image_id`` (the
file stem); images are not opened, so ``height``/``width`` are absent.

Ground-truth PNGs are kept as the datasets ship them. Metadata
``gt_label_lut`` (256 ints) maps a raw PNG value to the contiguous class id
used for evaluation, or to 255 (ignored); the evaluator and data mappers apply
it when they read a GT file. Metadata ``background_class`` is the index of the
"background" class, or None when the dataset has none.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...paths import DATASETS_ENV, datasets_root
from . import builtin_meta as bm

__all__ = [
    "SEMSEG_DATASET_NAMES",
    "build_label_lut",
    "semseg_metadata",
    "voc_metadata",
    "load_semseg_dataset",
    "load_listed_sem_seg",
    "load_paired_sem_seg",
    "load_cityscapes_sem_seg",
    "register_all_semseg",
]

logger = logging.getLogger(__name__)


def build_label_lut(mapping: Mapping[int, int]) -> Tuple[int, ...]:
    """Make a 256-entry look-up table from raw GT values to contiguous class ids.

    Args:
        mapping: raw PNG value (0..255) -> contiguous class id. Values not in
            ``mapping`` map to 255 (ignored), so stray values in a GT file can
            never be counted as a class.

    Returns:
        A tuple ``lut`` of 256 ints with ``lut[raw] = class id or 255``.
    """
    lut = [bm.IGNORE_LABEL] * 256
    for raw, class_id in mapping.items():
        if not 0 <= raw <= 255:
            raise ValueError(f"raw GT value {raw} is outside 0..255")
        lut[raw] = int(class_id)
    return tuple(lut)


def semseg_metadata(
    classes: Sequence[str], lut: Tuple[int, ...], background_class: Optional[int]
) -> Dict[str, Any]:
    """Metadata shared by every semantic segmentation dataset here.

    Args:
        classes: class names in contiguous-id order (``stuff_classes``).
        lut: 256-entry raw GT value -> class id table (see :func:`build_label_lut`).
        background_class: index of the "background" class in ``classes``, or None.

    Returns:
        Keyword arguments for ``MetadataCatalog.get(name).set(...)`` (roots excluded).
    """
    classes = list(classes)
    if background_class is not None and classes[background_class] != bm.BACKGROUND:
        raise ValueError(
            f"class {background_class} is {classes[background_class]!r}, not background"
        )
    valid = {v for v in lut if v != bm.IGNORE_LABEL}
    if not valid <= set(range(len(classes))):
        raise ValueError(f"look-up table maps to ids {sorted(valid)} outside 0..{len(classes) - 1}")
    return {
        "stuff_classes": classes,
        "evaluator_type": "sem_seg",
        "ignore_label": bm.IGNORE_LABEL,
        "gt_label_lut": lut,
        "background_class": background_class,
    }


def voc_metadata(with_background: bool) -> Dict[str, Any]:
    """Metadata of Pascal VOC ground truth (PNG values 0 = background, 1..20, 255 = void).

    Args:
        with_background: True for 21 classes (background is class 0), False for
            the 20 object classes with background ignored.
    """
    if with_background:
        return semseg_metadata(
            (bm.BACKGROUND,) + bm.VOC_CLASSES, build_label_lut({i: i for i in range(21)}), 0
        )
    return semseg_metadata(bm.VOC_CLASSES, build_label_lut({i + 1: i for i in range(20)}), None)


def _context_metadata(with_background: bool) -> Dict[str, Any]:
    # mmsegmentation's conversion: 0 = background, 1..59 the classes.
    if with_background:
        return semseg_metadata(
            (bm.BACKGROUND,) + bm.PASCAL_CONTEXT_59_CLASSES,
            build_label_lut({i: i for i in range(60)}),
            0,
        )
    return semseg_metadata(
        bm.PASCAL_CONTEXT_59_CLASSES, build_label_lut({i + 1: i for i in range(59)}), None
    )


def _coco_object_metadata() -> Dict[str, Any]:
    # Every stuff pixel is background; unlabeled pixels (255) stay ignored.
    mapping = {raw: 0 for raw in bm.COCO_STUFF_RAW_IDS}
    mapping.update({raw: i + 1 for i, raw in enumerate(bm.COCO_THING_RAW_IDS)})
    return semseg_metadata((bm.BACKGROUND,) + bm.COCO_THING_CLASSES, build_label_lut(mapping), 0)


# --------------------------------------------------------------------------- #
# Listing files
# --------------------------------------------------------------------------- #


def _record(image: Path, gt: Path, image_id: str) -> Dict[str, Any]:
    return {"file_name": str(image), "sem_seg_file_name": str(gt), "image_id": image_id}


def _raise_missing_files(kind: str, folder: Path, missing: List[str]) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} {kind} missing in {folder}: {shown}")


def load_listed_sem_seg(
    image_dir: Path,
    gt_dir: Path,
    list_file: Path,
    image_ext: str = ".jpg",
    gt_ext: str = ".png",
) -> List[Dict[str, Any]]:
    """List the images named in a split file (Pascal VOC / Context layout).

    Args:
        image_dir: folder of ``<id><image_ext>`` images.
        gt_dir: folder of ``<id><gt_ext>`` label PNGs.
        list_file: text file with one image id per line.

    Returns:
        One record per listed id, in the file's order.

    Raises:
        FileNotFoundError: an id of the list has no image or no GT file.
    """
    ids = [line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise FileNotFoundError(f"the split file {list_file} lists no images")
    images, gts = set(os.listdir(image_dir)), set(os.listdir(gt_dir))
    _raise_missing_files(
        "images", image_dir, [i + image_ext for i in ids if i + image_ext not in images]
    )
    _raise_missing_files("GT files", gt_dir, [i + gt_ext for i in ids if i + gt_ext not in gts])
    return [_record(Path(image_dir) / (i + image_ext), Path(gt_dir) / (i + gt_ext), i) for i in ids]


def load_paired_sem_seg(
    image_dir: Path, gt_dir: Path, image_ext: str = ".jpg", gt_ext: str = ".png"
) -> List[Dict[str, Any]]:
    """List every image of a folder with the GT PNG of the same stem (COCO, ADE20K layout).

    Args:
        image_dir: folder of ``<stem><image_ext>`` images.
        gt_dir: folder of ``<stem><gt_ext>`` label PNGs.

    Returns:
        One record per image, sorted by file name.

    Raises:
        FileNotFoundError: the folder has no images, or an image has no GT file.
    """
    stems = sorted(f[: -len(image_ext)] for f in os.listdir(image_dir) if f.endswith(image_ext))
    if not stems:
        raise FileNotFoundError(f"no *{image_ext} images in {image_dir}")
    gts = set(os.listdir(gt_dir))
    _raise_missing_files("GT files", gt_dir, [s + gt_ext for s in stems if s + gt_ext not in gts])
    return [
        _record(Path(image_dir) / (s + image_ext), Path(gt_dir) / (s + gt_ext), s) for s in stems
    ]


_CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
_CITYSCAPES_GT_SUFFIX = "_gtFine_labelIds.png"


def load_cityscapes_sem_seg(image_dir: Path, gt_dir: Path) -> List[Dict[str, Any]]:
    """List Cityscapes images ``<city>/<stem>_leftImg8bit.png`` with their raw labelId PNGs.

    Args:
        image_dir: ``leftImg8bit/<split>``, holding one folder per city.
        gt_dir: ``gtFine/<split>``, holding ``<city>/<stem>_gtFine_labelIds.png``.

    Returns:
        One record per image, sorted by city then file name; ``image_id`` is the stem
        (e.g. ``frankfurt_000000_000294``).

    Raises:
        FileNotFoundError: no images, a city folder missing under ``gt_dir``, or an
        image without its GT file.
    """
    image_dir, gt_dir = Path(image_dir), Path(gt_dir)
    records: List[Dict[str, Any]] = []
    for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
        stems = sorted(
            f[: -len(_CITYSCAPES_IMAGE_SUFFIX)]
            for f in os.listdir(image_dir / city)
            if f.endswith(_CITYSCAPES_IMAGE_SUFFIX)
        )
        if not (gt_dir / city).is_dir():
            raise FileNotFoundError(
                f"GT folder {gt_dir / city} is missing (images are in {image_dir / city})"
            )
        gts = set(os.listdir(gt_dir / city))
        _raise_missing_files(
            "GT files",
            gt_dir / city,
            [s + _CITYSCAPES_GT_SUFFIX for s in stems if s + _CITYSCAPES_GT_SUFFIX not in gts],
        )
        records.extend(
            _record(
                image_dir / city / (s + _CITYSCAPES_IMAGE_SUFFIX),
                gt_dir / city / (s + _CITYSCAPES_GT_SUFFIX),
                s,
            )
            for s in stems
        )
    if not records:
        raise FileNotFoundError(f"no <city>/*{_CITYSCAPES_IMAGE_SUFFIX} images in {image_dir}")
    return records


# --------------------------------------------------------------------------- #
# The registered datasets
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _SemSegSplit:
    """Where a registered dataset's files are, relative to the datasets root."""

    image_dir: str
    gt_dir: str
    list_file: Optional[str]  # split file of ids; None = every image of image_dir
    listing: str  # "listed" | "paired" | "cityscapes"
    layout: str  # the expected tree, for error messages


_VOC2012_LAYOUT = """\
VOCdevkit/VOC2012/
  JPEGImages/*.jpg
  SegmentationClass/*.png            (palette PNGs: 0 = background, 1..20, 255 = void)
  ImageSets/Segmentation/val.txt"""
_VOC2010_LAYOUT = """\
VOCdevkit/VOC2010/
  JPEGImages/*.jpg
  SegmentationClassContext/*.png     (mmsegmentation's conversion: 0 = background, 1..59)
  ImageSets/SegmentationContext/val.txt"""
_COCO_LAYOUT = """\
coco/
  val2017/*.jpg
  stuffthingmaps_trainval2017/val2017/*.png   (raw ids 0..181, 255 = unlabeled)"""
_ADE_LAYOUT = """\
ADEChallengeData2016/
  images/validation/*.jpg
  annotations/validation/*.png       (0 = other, 1..150)"""
_CITYSCAPES_LAYOUT = """\
cityscapes/
  leftImg8bit/val/<city>/*_leftImg8bit.png
  gtFine/val/<city>/*_gtFine_labelIds.png"""

_VOC2012_VAL = _SemSegSplit(
    "VOCdevkit/VOC2012/JPEGImages",
    "VOCdevkit/VOC2012/SegmentationClass",
    "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
    "listed",
    _VOC2012_LAYOUT,
)
_CONTEXT_VAL = _SemSegSplit(
    "VOCdevkit/VOC2010/JPEGImages",
    "VOCdevkit/VOC2010/SegmentationClassContext",
    "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt",
    "listed",
    _VOC2010_LAYOUT,
)
_COCO_VAL = _SemSegSplit(
    "coco/val2017", "coco/stuffthingmaps_trainval2017/val2017", None, "paired", _COCO_LAYOUT
)
_ADE_VAL = _SemSegSplit(
    "ADEChallengeData2016/images/validation",
    "ADEChallengeData2016/annotations/validation",
    None,
    "paired",
    _ADE_LAYOUT,
)
_CITYSCAPES_VAL = _SemSegSplit(
    "cityscapes/leftImg8bit/val", "cityscapes/gtFine/val", None, "cityscapes", _CITYSCAPES_LAYOUT
)


def _all_semseg() -> Dict[str, Tuple[_SemSegSplit, Dict[str, Any]]]:
    return {
        "diffseg_voc21_val": (_VOC2012_VAL, voc_metadata(with_background=True)),
        "diffseg_voc20_val": (_VOC2012_VAL, voc_metadata(with_background=False)),
        "diffseg_context60_val": (_CONTEXT_VAL, _context_metadata(with_background=True)),
        "diffseg_context59_val": (_CONTEXT_VAL, _context_metadata(with_background=False)),
        "diffseg_coco_stuff171_val": (
            _COCO_VAL,
            semseg_metadata(
                bm.COCO_STUFF_171_CLASSES,
                build_label_lut(bm.COCO_STUFF_171_RAW_ID_TO_CONTIGUOUS),
                None,
            ),
        ),
        "diffseg_coco_object_val": (_COCO_VAL, _coco_object_metadata()),
        "diffseg_ade150_val": (
            _ADE_VAL,
            semseg_metadata(
                bm.ADE20K_150_CLASSES, build_label_lut({i + 1: i for i in range(150)}), None
            ),
        ),
        "diffseg_cityscapes_val": (
            _CITYSCAPES_VAL,
            semseg_metadata(
                bm.CITYSCAPES_CLASSES, build_label_lut(bm.CITYSCAPES_LABEL_ID_TO_TRAIN_ID), None
            ),
        ),
    }


_SPECS = _all_semseg()

#: Names registered by :func:`register_all_semseg`, in a stable order.
SEMSEG_DATASET_NAMES: Tuple[str, ...] = tuple(_SPECS)

# Datasets root recorded in MetadataCatalog at registration, per dataset name.
_registered_roots: Dict[str, Path] = {}


def _missing(what: str, path: Path, name: str, root: Path, layout: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Dataset '{name}': the {what} {path} is missing.\n"
        f"Expected layout under the datasets root {root}:\n{layout}\n"
        f"Set the {DATASETS_ENV} environment variable to the folder that holds the datasets "
        f"(see docs/datasets.md)."
    )


def load_semseg_dataset(name: str, root: Optional[Path] = None) -> List[Dict[str, Any]]:
    """List the records of a registered ``diffseg_`` semantic segmentation dataset.

    This is the function ``DatasetCatalog.get(name)`` calls.

    Args:
        name: one of :data:`SEMSEG_DATASET_NAMES`.
        root: datasets root; None reads ``$DETECTRON2_DATASETS`` (default ``./datasets``) now.

    Returns:
        Records with ``file_name``, ``sem_seg_file_name`` and ``image_id``.

    Raises:
        KeyError: ``name`` is not a dataset of this module.
        FileNotFoundError: a folder or the split file is missing (the message names it,
            shows the expected layout and the environment variable), or a listed file is.
    """
    if name not in _SPECS:
        raise KeyError(f"'{name}' is not one of {list(SEMSEG_DATASET_NAMES)}")
    split, _ = _SPECS[name]
    if root is None:
        root = datasets_root()
        registered = _registered_roots.get(name)
        if registered is not None and registered != root:
            logger.warning(
                "Loading '%s' from %s, but MetadataCatalog's image_root/sem_seg_root were set "
                "under %s at import time (%s changed after import).",
                name,
                root,
                registered,
                DATASETS_ENV,
            )
    root = Path(root)
    image_dir, gt_dir = root / split.image_dir, root / split.gt_dir
    for what, folder in (("image folder", image_dir), ("ground-truth folder", gt_dir)):
        if not folder.is_dir():
            raise _missing(what, folder, name, root, split.layout)
    if split.listing == "listed":
        list_file = root / split.list_file  # type: ignore[operator]
        if not list_file.is_file():
            raise _missing("split file", list_file, name, root, split.layout)
        records = load_listed_sem_seg(image_dir, gt_dir, list_file)
    elif split.listing == "paired":
        records = load_paired_sem_seg(image_dir, gt_dir)
    else:
        records = load_cityscapes_sem_seg(image_dir, gt_dir)
    logger.info("Listed %d images of '%s' from %s", len(records), name, root)
    return records


def register_all_semseg() -> None:
    """Register every dataset of :data:`SEMSEG_DATASET_NAMES` (idempotent, lists no files).

    ``image_root``/``sem_seg_root`` in the metadata are taken from the datasets
    root at the time of this call; the loaders read the root again when called.
    """
    root = datasets_root()
    for name, (split, meta) in _SPECS.items():
        if name in DatasetCatalog.list():
            continue  # already registered, e.g. by a module reload
        DatasetCatalog.register(name, functools.partial(load_semseg_dataset, name))
        MetadataCatalog.get(name).set(
            image_root=str(root / split.image_dir), sem_seg_root=str(root / split.gt_dir), **meta
        )
        _registered_roots[name] = root


register_all_semseg()
