#!/usr/bin/env python
"""Train or evaluate a diffseg_d2 model from a LazyConfig file (Python, ``LazyCall`` of the package's classes).

    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/diffsegmenter_micro.py --eval-only
    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/diffsegmenter_micro.py --eval-only \\
        model.image_size=128 model_device=cuda
    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/odise_micro.py            # train ODISE's head
    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/odise_micro.py --resume   # continue it

Evaluation reads ``model``, ``dataloader.test`` and ``dataloader.evaluator`` (and ``model_device``, the device the
model runs on, and ``model_weights``, a trained checkpoint loaded as MODEL.WEIGHTS is: safe formats only, every
key matched). Training (the trained method, ODISE) also reads ``dataloader.train``, ``optimizer`` (its ``params``
get the model), ``lr_multiplier`` and ``train`` (``output_dir``, ``max_iter``, ``amp.enabled``,
``checkpointer.period``, ``log_period``, ``init_checkpoint``), the fields of detectron2's own LazyConfig
training; checkpoints are written and read by the strict checkpointer, and the final model is evaluated.
Overrides are detectron2's ``key=value`` form. A LazyConfig file is Python and runs when it is loaded: load
your own files and the shipped ones (configs/lazy/), never one handed to you; the yacs configs
(configs/*/*.yaml) are read as data only.
"""
import argparse
import logging

import diffseg_d2  # noqa: F401, I001  (first: registers the datasets, silences fvcore's warning)
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from diffseg_d2.engine import DiffSegTrainer, StrictCheckpointer

logger = logging.getLogger("diffseg_d2.lazy_train_net")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE", help="a LazyConfig file, e.g. configs/lazy/...")
    p.add_argument("--eval-only", action="store_true", help="evaluate (the only mode for the training-free methods)")
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint in train.output_dir")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="key=value", help="LazyConfig overrides")
    return p.parse_args(argv)


def evaluate(cfg, model) -> dict:
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def train(cfg, model, resume: bool) -> None:
    """detectron2's training loop on the LazyConfig's pieces, with the strict checkpointer."""
    if "train" not in cfg.dataloader or "optimizer" not in cfg:
        raise SystemExit("lazy_train_net.py: this config has no dataloader.train / optimizer (a training-free "
                         "method): run it with --eval-only.")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = DiffSegTrainer.wrap_for_processes(model)
    t = cfg.train
    trainer = (AMPTrainer if t.get("amp", {}).get("enabled", False) else SimpleTrainer)(model, loader, optimizer)
    checkpointer = StrictCheckpointer(model, t.output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **t.checkpointer) if main else None,
        hooks.PeriodicWriter(default_writers(t.output_dir, t.max_iter), period=t.get("log_period", 20)) if main else None,
    ])
    checkpointer.resume_or_load(t.get("init_checkpoint", ""), resume=resume)
    start = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start, t.max_iter)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logger(name="diffseg_d2")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = instantiate(cfg.model).to(cfg.get("model_device", "cpu"))
    if args.eval_only:
        if cfg.get("model_weights"):
            StrictCheckpointer(model).load(cfg.model_weights)
        return evaluate(cfg, model.eval())
    train(cfg, model, args.resume)
    return evaluate(cfg, model.eval())


if __name__ == "__main__":
    main()
