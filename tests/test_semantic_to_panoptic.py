"""Panoptic output of the training-free segmenters, made from their semantic scores."""
import numpy as np
import pytest
import torch

from diffseg_d2.modeling.meta_arch.semantic_to_panoptic import semantic_to_panoptic
from diffseg_d2.vocabulary import STUFF, THING


def _scores(labels, classes):
    return torch.nn.functional.one_hot(torch.from_numpy(labels), classes).permute(2, 0, 1).float()


def test_stuff_is_one_segment_things_are_split_into_regions_and_small_ones_dropped():
    labels = np.zeros((20, 20), np.int64)  # class 0: stuff (background)
    labels[1:5, 1:5] = 1  # thing, region A (16 px)
    labels[10:14, 10:14] = 1  # thing, region B (16 px), not touching A
    labels[5, 5] = 1  # touches A diagonally: 8-connected, part of A
    labels[18, 0] = 1  # a lone pixel: under the minimum area
    labels[0:3, 15:20] = 2  # stuff class 2 in two places: still one segment
    labels[17:20, 15:20] = 2
    ids, segments = semantic_to_panoptic(_scores(labels, 3), [STUFF, THING, STUFF], min_area=2 / 400)
    ids = ids.numpy()
    by_class = {}
    for s in segments:
        by_class.setdefault(s["category_id"], []).append(s)
        assert s["area"] == int((ids == s["id"]).sum())
    assert [s["isthing"] for s in by_class[1]] == [True, True]
    assert sorted(s["area"] for s in by_class[1]) == [16, 17]
    assert len(by_class[2]) == 1 and by_class[2][0]["area"] == 30 and not by_class[2][0]["isthing"]
    assert len(by_class[0]) == 1
    assert ids[18, 0] == 0  # dropped: no segment
    assert ids[1, 1] == ids[5, 5] != ids[10, 10]
    assert sorted(s["id"] for s in segments) == list(range(1, len(segments) + 1))


def test_min_area_zero_keeps_everything_and_bad_shapes_are_refused():
    labels = np.array([[0, 1], [1, 0]])
    ids, segments = semantic_to_panoptic(_scores(labels, 2), [THING, THING], min_area=0.0)
    assert len(segments) == 2  # each class's two diagonal pixels are one 8-connected region
    assert (ids.numpy() > 0).all()
    with pytest.raises(ValueError, match="classes"):
        semantic_to_panoptic(_scores(labels, 2), [THING], min_area=0.0)


def test_training_free_predictor_returns_panoptic_with_the_datasets_things(tiny_cfg_path):
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultPredictor

    from diffseg_d2 import get_diffseg_cfg

    name = "test_panoptic_vocab_only_metadata"
    MetadataCatalog.get(name).set(stuff_classes=["background", "sky", "dog"], thing_classes=["dog"])
    cfg = get_diffseg_cfg(tiny_cfg_path, ["DATASETS.TEST", f"('{name}',)", "MODEL.DIFFSEG.PANOPTIC.MIN_AREA", "0.0"])
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = predictor(image)
    ids, segments = out["panoptic_seg"]
    labels = out["sem_seg"].argmax(0)
    assert ids.shape == labels.shape == (48, 64)
    for s in segments:
        own = ids == s["id"]
        assert (labels[own] == s["category_id"]).all()
        assert s["isthing"] == (s["category_id"] == 2)
    # Every pixel is in a segment (min area 0), and each stuff class is one segment.
    assert (ids > 0).all()
    stuff = [s["category_id"] for s in segments if not s["isthing"]]
    assert len(stuff) == len(set(stuff))

    cfg.defrost()
    cfg.MODEL.DIFFSEG.PANOPTIC.ENABLED = False
    assert "panoptic_seg" not in DefaultPredictor(cfg)(image)
