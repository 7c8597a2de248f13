#!/usr/bin/env python
"""Panoptic FPN, detectron2's own architecture, on diffseg_d2's diffusion backbone.

The import of diffseg_d2 registers the backbone (``build_diffusion_unet_fpn_backbone``)
and the datasets, and adds the ``MODEL.DIFFSEG`` config keys. Model, losses, training
loop and evaluation are detectron2's. Two lines of safety besides: the config file is
read as data (``merge_config_file``: a Python tag in it is refused), and checkpoints are
read by a ``SafeCheckpointer`` (weights-only; ``--resume`` included).

    python projects/diffusion_panoptic_fpn/train_net.py --config-file projects/diffusion_panoptic_fpn/configs/tiny.yaml
    python projects/diffusion_panoptic_fpn/train_net.py --config-file projects/diffusion_panoptic_fpn/configs/tiny.yaml \
        --eval-only MODEL.WEIGHTS output/diffusion_panoptic_fpn_tiny/model_final.pth
"""
import os

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators

import diffseg_d2
from diffseg_d2.engine import SafeCheckpointer


class Trainer(DefaultTrainer):
    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before it asks for the hooks (the
        # periodic checkpointer keeps it): make it one that never unpickles what --resume finds.
        self.checkpointer = SafeCheckpointer.like(self.checkpointer)
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators([
            COCOPanopticEvaluator(dataset_name, output_folder),
            COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder),
        ])


def setup(args):
    cfg = get_cfg()
    diffseg_d2.add_diffseg_config(cfg)
    diffseg_d2.merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
