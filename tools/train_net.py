#!/usr/bin/env python
"""Train or evaluate a diffseg_d2 model with detectron2.

    python tools/train_net.py --config-file configs/tiny/diffsegmenter.yaml --eval-only
    python tools/train_net.py --config-file configs/diffsegmenter/voc21.yaml --eval-only MODEL.DEVICE cuda
    python tools/train_net.py --config-file configs/tiny/odise.yaml               # trains on CPU
    python tools/train_net.py --config-file configs/tiny/odise.yaml --num-gpus 2 --dist-url auto
        # on a machine without CUDA: 2 CPU processes joined by GLOO (--num-gpus counts processes)
    python tools/train_net.py --config-file configs/tiny/odise.yaml --eval-only MODEL.WEIGHTS output/tiny_odise/model_final.pth

Training-free models (DiffSegmenter, FreeDA, DAAM) only run with --eval-only.

An expected error (a missing config file or weights, an unreachable hub, an unknown dataset or
config key, a bad vocabulary, a corrupt bank or checkpoint) ends with one message and exit
status 1; --debug shows its traceback.
"""
import logging

import diffseg_d2  # noqa: F401, I001  (first: it silences fvcore's torch.jit deprecation warning)
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.checkpoint_safety import CheckpointMismatchError, UnsafeCheckpointError
from diffseg_d2.config import ConfigKeyError
from diffseg_d2.data.datasets import UnknownDatasetError
from diffseg_d2.engine import DiffSegTrainer, StrictCheckpointer
from diffseg_d2.evaluation import format_results_table
from diffseg_d2.freeda.bank import BankError
from diffseg_d2.freeda.captions import CaptionsError
from diffseg_d2.modeling.meta_arch.class_lists import ClassListError
from diffseg_d2.modeling.odise.released import ReleasedCheckpointError
from diffseg_d2.numerics import NonFiniteError
from diffseg_d2.pretrained.weights import MissingWeightsError
from diffseg_d2.vocabulary import VocabularyError

# Errors that mean the request is wrong, not the code: each carries a message that says what to do.
EXPECTED_ERRORS = (ConfigKeyError, UnknownDatasetError, MissingWeightsError, VocabularyError, BankError,
                   CaptionsError, CheckpointMismatchError, UnsafeCheckpointError, ReleasedCheckpointError,
                   NonFiniteError, ClassListError)


def setup(args):
    cfg = get_diffseg_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    try:
        return run(args)
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        raise SystemExit(f"{type(e).__name__}: {e} [tools/train_net.py --debug shows the traceback]") from None


def run(args):
    try:
        cfg = setup(args)
        model = None if not args.eval_only else DiffSegTrainer.build_model(cfg)
    except EXPECTED_ERRORS:
        raise
    except ValueError as e:  # the build-time checks of config values name the key at fault
        if args.debug:
            raise
        raise SystemExit(f"The config is not valid: {e} [tools/train_net.py --debug shows the traceback]") from None
    if not args.eval_only:
        if getattr(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), "TRAINING_FREE", False):
            raise SystemExit(f"{cfg.MODEL.META_ARCHITECTURE} is training-free: run with --eval-only.")
        trainer = DiffSegTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # The final evaluation that DefaultTrainer runs after the last iteration (its EvalHook
        # keeps the results here), printed as --eval-only prints them.
        results = getattr(trainer, "_last_eval_results", None)
        if results and comm.is_main_process():
            print(format_results_table(results), flush=True)
        return results
    training_free = getattr(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), "TRAINING_FREE", False)
    if cfg.MODEL.WEIGHTS or args.resume or not training_free:
        StrictCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    else:
        # Nothing of a training-free model is trained: its weights are the frozen models of its config,
        # so there is no checkpoint to look for (and no "initializing from scratch" to report).
        logging.getLogger("detectron2").info("%s is training-free: its weights come from its config.",
                                         cfg.MODEL.META_ARCHITECTURE)
    results = DiffSegTrainer.test(cfg, model)
    if comm.is_main_process():
        print(format_results_table(results), flush=True)
    return results


def argument_parser():
    parser = default_argument_parser(__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error")
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
