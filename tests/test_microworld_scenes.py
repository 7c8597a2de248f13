"""The micro-world scene generator, its Detectron2 datasets and tools/make_microworld.py.

CPU only, no network, a few seconds. Datasets are written to a per-test cache
(``$DIFFSEG_D2_CACHE``) with a handful of scenes per split
(``$DIFFSEG_D2_MICROWORLD_COUNT``); evaluator checks feed the ground truth as the
prediction (mIoU / PQ / AP must be 100) and a wrong one (clearly lower).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ground_truth import png, prediction_from_ground_truth  # tests/ground_truth.py

import diffseg_d2  # noqa: F401  (registers the datasets)
from diffseg_d2 import microworld
from diffseg_d2.data import MaskFormerPanopticMapper
from diffseg_d2.evaluation import build_evaluator
from diffseg_d2.data.datasets import register_microworld as mwd
from diffseg_d2.microworld import scenes as mw
from diffseg_d2.microworld.scenes import (
    COLOURS,
    COLOUR_RGB,
    IMAGE_SIZE,
    MIN_VISIBLE_FRACTION,
    SHAPES,
    SPLITS,
    Scene,
    render_scene,
    scene_seeds,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDS = list(range(120)) + list(scene_seeds("val", 40))  # enough to see every case, fast
_CAPTION_PART = re.compile(r"a (\w+) (\w+)")


@pytest.fixture(scope="module")
def many_scenes() -> List[Scene]:
    return [render_scene(s) for s in SEEDS]


@pytest.fixture
def cache(cache, monkeypatch) -> Path:
    """The shared fresh cache, with small splits."""
    monkeypatch.setenv(mwd.COUNT_ENV, "train=3,val=4,test=2")
    return cache


def _digest(scene: Scene) -> str:
    h = hashlib.sha256()
    for array in (scene.image, scene.instance_label(), scene.colour_shape_label()):
        h.update(array.tobytes())
    h.update(scene.caption.encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- #
# Scenes
# --------------------------------------------------------------------------- #


def test_same_seed_gives_the_same_scene_and_seeds_differ():
    a, b = render_scene(7), render_scene(7)
    assert a.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.image.dtype == np.uint8
    np.testing.assert_array_equal(a.image, b.image)
    assert a.caption == b.caption and a.seed == b.seed == 7
    for x, y in zip(a.objects, b.objects):
        assert (x.shape, x.colour, x.bbox) == (y.shape, y.colour, y.bbox)
        np.testing.assert_array_equal(x.mask, y.mask)
    others = [render_scene(s) for s in (8, 9)]
    assert all((o.image != a.image).mean() > 0.5 for o in others)  # not a shifted copy


def test_scenes_are_pinned_across_machines():
    # Digests of image, instance and colour-shape labels and caption. A change here means the
    # generator changed: every cached split is then redone (the fingerprint) and models trained
    # on the old scenes see a different world. Update on purpose only.
    assert {s: _digest(render_scene(s)) for s in (0, 1_000_000, 2_000_001)} == {
        0: "7b45abca5f9df1c8",
        1_000_000: "95c2c53f05ec7078",
        2_000_001: "bf08c70f32202542",
    }


def test_masks_are_exact_and_consistent(many_scenes):
    for scene in many_scenes:
        shape_label, colour_label = scene.shape_label(), scene.colour_shape_label()
        instances = scene.instance_label()
        assert shape_label.dtype == np.uint8 and colour_label.dtype == np.uint8
        assert instances.dtype == np.int32
        assert 1 <= len(scene.objects) <= 3
        stacked = np.stack([o.mask for o in scene.objects])
        assert stacked.dtype == bool and (stacked.sum(0) <= 1).all()  # disjoint
        np.testing.assert_array_equal(stacked.any(0), shape_label > 0)
        np.testing.assert_array_equal(instances > 0, shape_label > 0)
        for i, obj in enumerate(scene.objects):
            assert obj.mask.any()
            ys, xs = np.nonzero(obj.mask)
            assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert (instances[obj.mask] == i + 1).all()
            assert (shape_label[obj.mask] == 1 + SHAPES.index(obj.shape)).all()
            expected = 1 + COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
            assert (colour_label[obj.mask] == expected).all()
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)  # a colour-shape pair at most once
    counts = {len(s.objects) for s in many_scenes}
    assert counts == {1, 2, 3}


def test_colours_belong_to_objects_only(many_scenes):
    names = list(COLOUR_RGB)
    named = np.array([COLOUR_RGB[c] for c in names], dtype=np.float64)
    for scene in many_scenes:
        rgb = scene.image.astype(np.int64)
        chroma = rgb.max(-1) - rgb.min(-1)
        background = scene.shape_label() == 0
        # No saturated pixel in the background: the colour words are about objects only.
        assert chroma[background].max() <= mw.BACKGROUND_MAX_CHROMA
        for obj in scene.objects:
            pixels = rgb[obj.mask]
            assert chroma[obj.mask].min() >= mw.OBJECT_MIN_CHROMA
            nearest = ((pixels[:, None, :] - named[None]) ** 2).sum(-1).argmin(-1)
            assert (nearest == names.index(obj.colour)).all(), (scene.seed, obj.colour)
            assert pixels.std(0).max() > 2  # per-pixel noise: not flat
    backgrounds = [s.image[s.shape_label() == 0].std(0).max() for s in many_scenes]
    assert min(backgrounds) > 2  # textured, never flat


def test_every_object_keeps_the_visibility_floor(monkeypatch):
    full_masks: Dict[int, Dict[Tuple[str, str], np.ndarray]] = {}
    place = mw._place_objects

    def recording(rng, pairs, size):
        placed = place(rng, pairs, size)
        full_masks[len(full_masks)] = {(c, s): m for c, s, m in placed}
        return placed

    monkeypatch.setattr(mw, "_place_objects", recording)
    fractions = []
    for i, seed in enumerate(SEEDS):
        scene = render_scene(seed)
        full = full_masks[i]
        assert len(full) == len(scene.objects)
        for mask in full.values():
            ys, xs = np.nonzero(mask)
            assert 14 <= max(np.ptp(xs), np.ptp(ys)) + 1 <= 28  # object sizes at 64 px
        for obj in scene.objects:  # visible part / the full (unoccluded) shape
            owner = full[obj.colour, obj.shape]
            assert (obj.mask <= owner).all()
            fractions.append(obj.mask.sum() / owner.sum())
    assert min(fractions) >= MIN_VISIBLE_FRACTION
    assert min(fractions) < 0.9  # occlusion does happen in these scenes


def test_caption_lists_objects_left_to_right(many_scenes):
    assert mw.caption_of(["red circle"]) == "a red circle"
    assert mw.caption_of(["red circle", "blue square"]) == "a red circle and a blue square"
    assert (
        mw.caption_of(["red circle", "blue square", "green cross"])
        == "a red circle, a blue square and a green cross"
    )
    for scene in many_scenes:
        parts = _CAPTION_PART.findall(scene.caption)
        assert parts == [(o.colour, o.shape) for o in scene.objects]
        assert scene.caption == mw.caption_of([o.name for o in scene.objects])
        xs = [np.nonzero(o.mask)[1].mean() for o in scene.objects]
        assert xs == sorted(xs)


def test_word_masks_map_words_to_their_objects_and_unite_shared_words(many_scenes):
    shared = 0
    for scene in many_scenes:
        words = scene.word_masks()
        expected_words = {w for o in scene.objects for w in (o.colour, o.shape)}
        assert set(words) == expected_words
        for word, mask in words.items():
            union = np.zeros_like(mask)
            named = [o for o in scene.objects if word in (o.colour, o.shape)]
            for o in named:
                union |= o.mask
            np.testing.assert_array_equal(mask, union)
            shared += len(named) > 1
        # word_masks hands out copies: changing one leaves the scene alone.
        next(iter(words.values()))[:] = True
        assert not all(o.mask.all() for o in scene.objects)
    assert shared > 10  # shared colour or shape words are common


def test_mentions_leave_out_colour_words_and_their_masks(many_scenes):
    scene = next(s for s in many_scenes if len(s.objects) == 3 and len({o.colour for o in s.objects}) == 3)
    assert scene.mentions([True] * 3)[0] == scene.caption
    first, second, third = scene.objects
    caption, masks = scene.mentions([False, True, False])
    assert caption == f"a {first.shape}, a {second.name} and a {third.shape}"
    assert first.colour not in masks and third.colour not in masks
    np.testing.assert_array_equal(masks[second.colour], second.mask)
    np.testing.assert_array_equal(masks[first.shape], scene.word_masks()[first.shape])
    with pytest.raises(ValueError, match="3 objects"):
        scene.mentions([True])
    # A partial caption names some objects; a said word still covers every object it fits.
    caption, masks = scene.mentions([True, False, True], named=[False, True, False])
    assert caption == f"a {second.shape}"
    assert set(masks) == {second.shape}
    np.testing.assert_array_equal(masks[second.shape], scene.word_masks()[second.shape])


def test_partial_captions_name_at_least_one_object(many_scenes):
    from diffseg_d2.microworld.train_diffusion import partial_mention

    rng = np.random.default_rng(0)
    counts = [sum(partial_mention(s, rng, 0.5)) for s in many_scenes for _ in range(5)]
    assert min(counts) >= 1 and max(counts) == 3
    assert all(partial_mention(s, rng, 1.0) == [True] * len(s.objects) for s in many_scenes)


def test_splits_are_disjoint_seed_ranges():
    ranges = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert scene_seeds("val") == range(1_000_000, 1_000_500)
    assert scene_seeds("test", 3) == range(2_000_000, 2_000_003)
    assert len(scene_seeds("train")) == 1_000_000
    with pytest.raises(KeyError, match="train"):
        scene_seeds("validation")
    with pytest.raises(ValueError, match="500"):
        scene_seeds("val", 501)
    assert microworld.render_scene is render_scene and microworld.SPLITS is SPLITS


def test_render_scales_with_size():
    small = render_scene(3, size=32)
    assert small.image.shape == (32, 32, 3) and small.shape_label().shape == (32, 32)
    with pytest.raises(ValueError, match="16"):
        render_scene(3, size=8)


# --------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------- #


def test_registration_is_lazy_and_paths_follow_the_environment(cache):
    assert set(mwd.MICROWORLD_DATASET_NAMES) <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("diffseg_microworld_panoptic_val")
    assert meta.panoptic_json == str(cache / "microworld" / "val" / "panoptic_4.json")
    assert MetadataCatalog.get("diffseg_microworld_shapes_test").sem_seg_root == str(
        cache / "microworld" / "test" / "shapes"
    )
    assert not cache.exists()  # reading metadata writes nothing


def test_count_environment_variable(monkeypatch):
    monkeypatch.setenv(mwd.COUNT_ENV, "7")
    assert [mwd.split_count(s) for s in ("train", "val", "test")] == [7, 7, 7]
    monkeypatch.setenv(mwd.COUNT_ENV, "train=20, val=5")
    assert [mwd.split_count(s) for s in ("train", "val", "test")] == [20, 5, 500]
    monkeypatch.delenv(mwd.COUNT_ENV)
    assert mwd.split_count("train") == 2000
    monkeypatch.setenv(mwd.COUNT_ENV, "vali=5")
    with pytest.raises(ValueError, match=mwd.COUNT_ENV):
        mwd.split_count("val")


@pytest.mark.parametrize(
    "kind,label", [("shapes", "shape_label"), ("colourshapes", "colour_shape_label")]
)
def test_semantic_records_agree_with_render_scene(cache, kind, label):
    records = DatasetCatalog.get(f"diffseg_microworld_{kind}_val")
    assert [r["image_id"] for r in records] == list(scene_seeds("val", 4))
    for record in records:
        scene = render_scene(record["image_id"])
        np.testing.assert_array_equal(png(record["file_name"]), scene.image)
        np.testing.assert_array_equal(png(record["sem_seg_file_name"]), getattr(scene, label)())
        assert record["captions"] == [scene.caption]
        assert (record["height"], record["width"]) == (IMAGE_SIZE, IMAGE_SIZE)
    meta = MetadataCatalog.get(f"diffseg_microworld_{kind}_val")
    assert meta.evaluator_type == "sem_seg" and meta.background_class == 0
    assert meta.stuff_classes[0] == "background"
    n = len(meta.stuff_classes)
    assert n == {"shapes": 5, "colourshapes": 17}[kind]
    assert list(meta.gt_label_lut[:n]) == list(range(n)) and set(meta.gt_label_lut[n:]) == {255}
    if kind == "colourshapes":
        assert meta.stuff_classes[1:] == [f"{c} {s}" for c in COLOURS for s in SHAPES]


def test_panoptic_records_agree_with_render_scene(cache):
    from panopticapi.utils import rgb2id
    import pycocotools.mask as mask_util

    records = DatasetCatalog.get("diffseg_microworld_panoptic_val")
    meta = MetadataCatalog.get("diffseg_microworld_panoptic_val")
    assert meta.stuff_classes == list(SHAPES) + ["background"]
    assert meta.thing_classes == list(SHAPES)
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert len(records) == 4
    for record in records:
        scene = render_scene(record["image_id"])
        pan = rgb2id(png(record["pan_seg_file_name"]).astype(np.uint32))
        instances = scene.instance_label()
        background = len(scene.objects) + 1
        np.testing.assert_array_equal(pan, np.where(instances == 0, background, instances))
        segs = {s["id"]: s for s in record["segments_info"]}
        assert set(segs) == set(range(1, len(scene.objects) + 2))
        for i, obj in enumerate(scene.objects):
            assert segs[i + 1]["category_id"] == SHAPES.index(obj.shape) and segs[i + 1]["isthing"]
            assert segs[i + 1]["area"] == obj.mask.sum()
        assert segs[background]["category_id"] == 4 and not segs[background]["isthing"]
        sem = png(record["sem_seg_file_name"])
        np.testing.assert_array_equal(sem, np.where(instances == 0, 4, scene.shape_label() - 1))
        assert record["captions"] == [scene.caption]
        anns = record["annotations"]
        assert [a["category_id"] for a in anns] == [SHAPES.index(o.shape) for o in scene.objects]
        for ann, obj in zip(anns, scene.objects):
            np.testing.assert_array_equal(
                mask_util.decode(ann["segmentation"]).astype(bool), obj.mask
            )
            x0, y0, x1, y1 = obj.bbox
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]


def test_panoptic_train_records_feed_the_panoptic_mapper(cache):
    records = DatasetCatalog.get("diffseg_microworld_panoptic_train")
    assert [r["image_id"] for r in records] == [0, 1, 2]
    mapper = MaskFormerPanopticMapper(is_train=True, augmentations=[], image_format="RGB")
    out = mapper(records[0])
    scene = render_scene(0)
    assert out["captions"] == [scene.caption]
    assert out["instances"].gt_classes.tolist() == [
        SHAPES.index(o.shape) for o in scene.objects
    ] + [4]
    for mask, obj in zip(out["instances"].gt_masks, scene.objects):
        np.testing.assert_array_equal(mask.numpy(), obj.mask)


def _semantic_prediction(record: Dict[str, Any], num_classes: int, wrong: bool) -> Dict[str, Any]:
    gt = torch.as_tensor(png(record["sem_seg_file_name"]).astype(np.int64))
    if wrong:
        gt = torch.zeros_like(gt)  # all background
    return {"sem_seg": torch.nn.functional.one_hot(gt, num_classes).permute(2, 0, 1).float()}


@pytest.mark.parametrize(
    "name", ["diffseg_microworld_shapes_val", "diffseg_microworld_colourshapes_test"]
)
def test_semantic_evaluator_scores_ground_truth_100(cache, name):
    num_classes = len(MetadataCatalog.get(name).stuff_classes)
    results = {}
    for wrong in (False, True):
        evaluator = build_evaluator(name, distributed=False)
        evaluator.reset()
        for record in DatasetCatalog.get(name):
            evaluator.process([record], [_semantic_prediction(record, num_classes, wrong)])
        results[wrong] = evaluator.evaluate()["sem_seg"]
    assert results[False]["mIoU"] == pytest.approx(100.0)
    assert results[True]["mIoU"] < 60 and results[True]["IoU-background"] < 100


@pytest.mark.parametrize("kind, classes", [("shapes", 4), ("colourshapes", 16)])
def test_objects_only_splits_ignore_the_background(cache, kind, classes):
    """``*_objects_*``: the same scenes and label files, no "background" class and its pixels ignored
    (as VOC20): a prediction of the objects alone scores 100 whatever it says on the background."""
    name = f"diffseg_microworld_{kind}_objects_val"
    meta = MetadataCatalog.get(name)
    assert len(meta.stuff_classes) == classes and "background" not in meta.stuff_classes
    full = MetadataCatalog.get(f"diffseg_microworld_{kind}_val").stuff_classes
    assert list(meta.stuff_classes) == list(full[1:])
    evaluator = build_evaluator(name, distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        raw = torch.as_tensor(png(record["sem_seg_file_name"]).astype(np.int64))
        objects = (raw - 1).clamp(min=0)  # background pixels: any class, they are ignored
        evaluator.process([record], [{"sem_seg": torch.nn.functional.one_hot(objects, classes).permute(2, 0, 1).float()}])
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_panoptic_evaluators_score_ground_truth_100(cache):
    name = "diffseg_microworld_panoptic_val"
    results = {}
    for key, relabel in (("perfect", {}), ("wrong", {0: 1, 1: 2, 2: 3, 3: 0})):
        evaluator = build_evaluator(name, distributed=False)
        evaluator.reset()
        for record in DatasetCatalog.get(name):
            inputs = [{k: record[k] for k in ("file_name", "image_id", "height", "width")}]
            evaluator.process(inputs, [prediction_from_ground_truth(record, 5, relabel)])
        results[key] = evaluator.evaluate()
    perfect, wrong = results["perfect"], results["wrong"]
    assert perfect["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert perfect["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert perfect["segm"]["AP"] == pytest.approx(100.0)
    assert wrong["panoptic_seg"]["PQ_th"] == pytest.approx(0.0)  # every shape mislabelled
    assert wrong["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)  # background untouched
    assert wrong["segm"]["AP"] < 10


def _tree(folder: Path) -> Dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def test_materialisation_is_idempotent_and_leaves_no_temporary_files(cache):
    files = mwd.materialize_split("val", 3)
    folder = cache / "microworld" / "val"
    assert files.folder == folder and files.count == 3
    first = _tree(folder)
    assert not [p for p in first if os.path.basename(p).startswith(".")]
    assert sorted(p for p in first if p.endswith(".json")) == [
        "instances_3.json",
        "panoptic_3.json",
        "scenes_3.json",
    ]
    assert sorted(p for p in first if p.startswith("images/")) == [
        f"images/{s:07d}.png" for s in scene_seeds("val", 3)
    ]
    for sub in ("shapes", "colourshapes", "panoptic", "panoptic_semseg"):
        assert len([p for p in first if p.startswith(sub + "/")]) == 3
    assert mwd.materialize_split("val", 3) == files
    assert _tree(folder) == first  # nothing rewritten

    # A smaller count gets its own jsons, listing only its scenes.
    mwd.materialize_split("val", 2)
    with open(folder / "panoptic_2.json") as f:
        assert [a["image_id"] for a in json.load(f)["annotations"]] == list(scene_seeds("val", 2))

    # A manifest from another generator is redone.
    manifest = json.loads((folder / "scenes_3.json").read_text())
    manifest["fingerprint"] = "an older generator"
    (folder / "scenes_3.json").write_text(json.dumps(manifest))
    mwd.materialize_split("val", 3)
    assert json.loads((folder / "scenes_3.json").read_text())["fingerprint"] != "an older generator"
    assert not [p for p in _tree(folder) if os.path.basename(p).startswith(".")]


# --------------------------------------------------------------------------- #
# tools/make_microworld.py
# --------------------------------------------------------------------------- #


def test_make_microworld_writes_splits_and_contact_sheet(cache, tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import make_microworld
    finally:
        sys.path.remove(str(REPO_ROOT / "tools"))
    sheet = tmp_path / "sheet" / "mw.png"
    written = make_microworld.main(
        [
            "--splits",
            "test",
            "--count",
            "2",
            "--contact-sheet",
            str(sheet),
            "--sheet-scenes",
            "3",
            "--scale",
            "2",
        ]
    )
    assert written == [str(cache / "microworld" / "test"), str(sheet)]
    out = capsys.readouterr().out
    assert "test: 2 scenes in" in out and str(sheet) in out
    assert (cache / "microworld" / "test" / "scenes_2.json").is_file()
    image = np.asarray(Image.open(sheet))
    assert image.shape == (3 * (128 + 14 + 4) + 4, 3 * 128 + 16, 3)
    # The first panel of the first row is the first val scene (--sheet-split's default), scaled by 2.
    np.testing.assert_array_equal(
        image[4 : 4 + 128 : 2, 4 : 4 + 128 : 2], render_scene(1_000_000).image
    )
