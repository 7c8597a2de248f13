"""``DiffSegTrainer``: detectron2's DefaultTrainer with diffseg_d2's evaluators and vocabularies.

At test time each dataset in ``DATASETS.TEST`` is evaluated with its own
vocabulary (its metadata's ``stuff_classes``), never the training set's.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..evaluation import build_evaluator

logger = logging.getLogger(__name__)


class DiffSegTrainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every dataset of ``cfg.DATASETS.TEST``; returns {dataset: results}."""
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty: name the dataset(s) to evaluate on.")
        results = OrderedDict()
        inner = model.module if hasattr(model, "module") else model
        for name in cfg.DATASETS.TEST:
            if hasattr(inner, "set_vocabulary_from_dataset"):
                inner.set_vocabulary_from_dataset(name)
            loader = cls.build_test_loader(cfg, name)
            evaluator = cls.build_evaluator(cfg, name)
            results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info("Evaluation results for %s in csv format:", name)
                print_csv_format(results[name])
        return results
