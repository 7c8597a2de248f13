"""Pieces the LazyConfig files share: the test loader and evaluator of a semantic-segmentation dataset.

Each LazyConfig file defines ``model`` (and ``dataloader``); ``tools/lazy_train_net.py`` evaluates one:

    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/diffsegmenter_micro.py --eval-only
"""
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import SemSegEvaluator
from omegaconf import OmegaConf


def semantic_test_data(dataset: str, image_format: str = "RGB", output_dir: str = "./output/lazy"):
    """``dataloader`` with ``test`` (images as they are, batch 1) and ``evaluator`` (mIoU) of ``dataset``."""
    return OmegaConf.create({
        "test": L(build_detection_test_loader)(
            dataset=L(get_detection_dataset_dicts)(names=dataset, filter_empty=False),
            mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format=image_format),
            num_workers=0,
        ),
        "evaluator": L(SemSegEvaluator)(dataset_name=dataset, distributed=True, output_dir=output_dir),
    })
