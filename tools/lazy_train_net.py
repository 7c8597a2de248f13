#!/usr/bin/env python
"""Evaluate a diffseg_d2 model from a LazyConfig file (Python, ``LazyCall`` of the package's classes).

    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/diffsegmenter_micro.py --eval-only
    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/diffsegmenter_micro.py --eval-only \\
        model.image_size=128 model_device=cuda

The file defines ``model``, ``dataloader.test`` and ``dataloader.evaluator`` (and ``model_device``, the device
the model runs on, and ``model_weights``, a trained checkpoint loaded as MODEL.WEIGHTS is: safe formats only,
every key matched); overrides are detectron2's ``key=value`` form. A LazyConfig file is Python and runs when
it is loaded: load your own files and the shipped ones (configs/lazy/), never one handed to you; the yacs
configs (configs/*/*.yaml) are read as data only. Training from a LazyConfig is not offered yet: the trained
method (ODISE) trains through tools/train_net.py.
"""
import argparse
import logging

import diffseg_d2  # noqa: F401, I001  (first: registers the datasets, silences fvcore's warning)
from detectron2.config import LazyConfig, instantiate
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils.logger import setup_logger

logger = logging.getLogger("diffseg_d2.lazy_train_net")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE", help="a LazyConfig file, e.g. configs/lazy/...")
    p.add_argument("--eval-only", action="store_true", help="evaluate (the only mode for the training-free methods)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="key=value", help="LazyConfig overrides")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logger(name="diffseg_d2")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if not args.eval_only:
        raise SystemExit("lazy_train_net.py: only --eval-only is offered; train ODISE with tools/train_net.py.")
    model = instantiate(cfg.model).to(cfg.get("model_device", "cpu")).eval()
    if cfg.get("model_weights"):
        from diffseg_d2.engine import StrictCheckpointer

        StrictCheckpointer(model).load(cfg.model_weights)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


if __name__ == "__main__":
    main()
