"""Synonyms in every method: a class "sofa, couch" scores the best of its synonyms, each prompted as a
class of its own; a vocabulary without synonyms computes what it computed before."""
import numpy as np
import pytest
import torch

from diffseg_d2 import get_diffseg_cfg

SYNONYMS = ["background", "person, people", "dog", "sofa, couch, settee"]
FLAT = ["background", "person", "people", "dog", "sofa", "couch", "settee"]
MEMBERS = [[0], [1, 2], [3], [4, 5, 6]]


def test_synonym_classes_and_display_names():
    from diffseg_d2.vocabulary import display_name, synonym_classes

    assert synonym_classes(SYNONYMS) == (FLAT, MEMBERS)
    assert synonym_classes(["cat", "dog"]) == (["cat", "dog"], [[0], [1]])
    assert synonym_classes(["cat", "kitty, cat"]) == (["cat", "kitty"], [[0], [1, 0]])
    assert display_name("sofa, couch") == "sofa"


@pytest.fixture(scope="module", params=["DiffSegmenter", "DAAM", "FreeDA"])
def method(request, tiny_cfg_path, tiny_freeda_cfg_path):
    from detectron2.modeling import build_model

    if request.param == "FreeDA":
        bank = request.getfixturevalue("freeda_bank")
        cfg = get_diffseg_cfg(tiny_freeda_cfg_path, ["MODEL.DIFFSEG.FREEDA.BANK", str(bank.path), "DATASETS.TEST", "()"])
    else:
        cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.META_ARCHITECTURE", request.param, "DATASETS.TEST", "()"])
    return build_model(cfg).eval()


def test_a_class_scores_its_best_synonym(method):
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 48, 64), dtype=np.uint8))
    with torch.no_grad():
        got = method([{"image": image, "vocabulary": SYNONYMS}])[0]["sem_seg"]
        each = method.segment(method._rgb(image), FLAT, (48, 64))
    expected = torch.stack([each[idx].amax(0) for idx in MEMBERS])
    assert got.shape == (4, 48, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_repeated_synonym_is_the_class_itself(method):
    """The symptom a user met: "circle;circle" lost every pixel of the circle, the whole string being
    one prompt. A synonym list of one word is that word."""
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (3, 40, 40), dtype=np.uint8))
    with torch.no_grad():
        once = method([{"image": image, "vocabulary": ["background", "dog", "sofa"]}])[0]["sem_seg"]
        twice = method([{"image": image, "vocabulary": ["background", "dog, dog", "sofa"]}])[0]["sem_seg"]
    torch.testing.assert_close(twice, once, rtol=0, atol=0)


def test_overlay_legends_show_a_class_by_its_first_name():
    from diffseg_d2.visualize import render_overlay

    rgb = np.zeros((32, 32, 3), np.uint8)
    label = np.zeros((32, 32), np.int64)
    label[:, 16:] = 1
    with_synonyms = render_overlay(rgb, label, ["background", "sofa, couch"])
    first_only = render_overlay(rgb, label, ["background", "sofa"])
    assert np.array_equal(with_synonyms, first_only)
