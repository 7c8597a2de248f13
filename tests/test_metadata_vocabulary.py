"""A vocabulary given the Detectron2 way: a metadata-only entry (no DatasetCatalog registration) with
stuff_classes or thing_classes as DATASETS.TEST[0], through DefaultPredictor."""
import os

import numpy as np
import pytest
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.vocabulary import VocabularyError, vocabulary_from_metadata

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)  # BGR, as DefaultPredictor takes it


def test_diffsegmenter_takes_stuff_classes_of_a_metadata_only_entry(image):
    MetadataCatalog.get("test_vocab_stuff").set(stuff_classes=["background", "cat", "sofa, couch"])
    cfg = get_diffseg_cfg(os.path.join(ROOT, "configs", "tiny", "diffsegmenter.yaml"),
                          ["DATASETS.TEST", "('test_vocab_stuff',)", "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False"])
    out = DefaultPredictor(cfg)(image)
    assert out["sem_seg"].shape == (3, 96, 128)


def test_odise_takes_thing_classes_of_a_metadata_only_entry(image):
    MetadataCatalog.get("test_vocab_things").set(thing_classes=["person", "chair"])
    cfg = get_diffseg_cfg(os.path.join(ROOT, "configs", "tiny", "odise.yaml"), ["DATASETS.TEST", "('test_vocab_things',)"])
    predictor = DefaultPredictor(cfg)
    assert predictor.model.vocabulary == ["person", "chair"]
    out = predictor(image)
    assert out["sem_seg"].shape[0] == 2
    assert all(s["isthing"] for s in out["panoptic_seg"][1])


def test_names_with_neither_metadata_nor_data_and_entries_without_classes_are_refused():
    with pytest.raises(KeyError, match="not registered"):
        vocabulary_from_metadata("test_vocab_nowhere")
    MetadataCatalog.get("test_vocab_empty").set(evaluator_type="sem_seg")
    with pytest.raises(VocabularyError, match="no stuff_classes or thing_classes"):
        vocabulary_from_metadata("test_vocab_empty")


def test_command_line_vocabularies_express_synonyms_inline_and_in_a_file(tmp_path):
    from diffseg_d2.vocabulary import vocabulary_from_command_line

    assert vocabulary_from_command_line("person, sofa;couch ,dog") == ["person", "sofa, couch", "dog"]
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\nperson\nsofa, couch   # synonyms\n\ndog\n", encoding="utf-8")
    assert vocabulary_from_command_line(f"@{path}") == ["person", "sofa, couch", "dog"]
    with pytest.raises(VocabularyError, match="Cannot read the vocabulary file"):
        vocabulary_from_command_line(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(VocabularyError, match="empty synonym"):
        vocabulary_from_command_line("sofa;;couch")
    with pytest.raises(VocabularyError, match="more than once"):
        vocabulary_from_command_line("cat,Cat")
