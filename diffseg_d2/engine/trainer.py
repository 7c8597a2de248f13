"""``DiffSegTrainer``: detectron2's DefaultTrainer with diffseg_d2's data, optimizer, checkpoints and evaluators.

* Training data: a meta-architecture that names ``TRAIN_MAPPER = "panoptic"`` (ODISE)
  gets the panoptic mapper (instances with full-image masks); others detectron2's.
* Optimizer: ``MODEL.DIFFSEG.ODISE.OPTIMIZER`` AdamW or SGD over the parameters that
  require grad (frozen Stable Diffusion and CLIP have none), with the backbone's
  learning-rate multiplier and ``SOLVER.CLIP_GRADIENTS`` (also "full_model": one norm over all gradients).
* Checkpoints: ``StrictCheckpointer`` (weights_only loading, exact key match).
* At test time each dataset in ``DATASETS.TEST`` is evaluated with its own
  vocabulary (its metadata's classes), never the training set's.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..evaluation import build_evaluator
from .checkpoint import StrictCheckpointer

logger = logging.getLogger(__name__)


def _clip_full_model_norm(optimizer: type, max_norm: float, norm_type: float) -> type:
    """``optimizer`` that clips the norm of ALL its gradients together before each step.

    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` (Mask2Former's setting); detectron2's
    own "norm" clips each parameter separately.
    """

    class FullModelClipped(optimizer):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipped.__name__ = f"FullModelClipped{optimizer.__name__}"
    return FullModelClipped


class DiffSegTrainer(DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        # Same arguments as DefaultTrainer's own checkpointer, with strict, weights_only loading.
        self.checkpointer = StrictCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )

    @classmethod
    def build_train_loader(cls, cfg):
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        if getattr(arch, "TRAIN_MAPPER", None) == "panoptic":
            from ..data.panoptic_mapper import MaskFormerPanopticMapper

            return build_detection_train_loader(cfg, mapper=MaskFormerPanopticMapper(cfg, True))
        return super().build_train_loader(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        name = cfg.MODEL.DIFFSEG.ODISE.OPTIMIZER.upper()
        if name not in ("ADAMW", "SGD"):
            raise ValueError(f"MODEL.DIFFSEG.ODISE.OPTIMIZER must be ADAMW or SGD, not {name!r}.")
        multiplier = float(cfg.MODEL.DIFFSEG.ODISE.BACKBONE_LR_MULTIPLIER)
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            lr_factor_func=lambda param_name: multiplier if param_name.startswith("backbone.") else 1.0,
        )
        if name == "SGD":
            optimizer = torch.optim.SGD
            kwargs = dict(momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
        else:
            optimizer, kwargs = torch.optim.AdamW, {}
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            optimizer = _clip_full_model_norm(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
        else:
            optimizer = maybe_add_gradient_clipping(cfg, optimizer)
        return optimizer(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(dataset_name, output_dir=output_folder, per_image=cfg.TEST.PER_IMAGE_CONFUSION)

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
