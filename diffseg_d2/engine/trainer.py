"""``DiffSegTrainer``: detectron2's DefaultTrainer with diffseg_d2's data, optimizer, checkpoints and evaluators.

* Training data: a meta-architecture that names ``TRAIN_MAPPER = "panoptic"`` (ODISE)
  gets the panoptic mapper (instances with full-image masks); others detectron2's.
* Optimizer: ``MODEL.DIFFSEG.ODISE.OPTIMIZER`` AdamW or SGD over the parameters that
  require grad (frozen Stable Diffusion and CLIP have none), with the backbone's
  learning-rate multiplier and ``SOLVER.CLIP_GRADIENTS`` (also "full_model": one norm over all gradients).
* Checkpoints: ``StrictCheckpointer`` (weights_only loading, exact key match).
* Several processes (``launch`` with GLOO on a CPU, NCCL on GPUs): the model is wrapped in
  DistributedDataParallel without ``device_ids`` when it lives on the CPU (see ``wrap_for_processes``).
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
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

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


def full_model_clipped(optimizer: type, params, *, max_norm: float, norm_type: float = 2.0, **kwargs):
    """An ``optimizer`` over ``params`` (``**kwargs`` its settings) that clips the norm of all its gradients
    together before each step: ``SOLVER.CLIP_GRADIENTS`` "full_model", for LazyConfig files."""
    return _clip_full_model_norm(optimizer, max_norm, norm_type)(params, **kwargs)


class DiffSegTrainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps in its order, with two changes: the model is wrapped by
        # ``wrap_for_processes`` (detectron2's wrapping always passes a CUDA device id, which
        # DistributedDataParallel refuses for a CPU model), and the checkpointer is a StrictCheckpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger not called yet
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.wrap_for_processes(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = StrictCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @staticmethod
    def wrap_for_processes(model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel when several processes train, else ``model`` itself.

        A CPU model gets ``device_ids=None``: DistributedDataParallel raises a ValueError for a CPU
        model given device ids, and detectron2's ``create_ddp_model`` gives the local rank's CUDA
        device by default. A GPU model keeps that default. ``broadcast_buffers=False`` as in
        DefaultTrainer.
        """
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        extra = {"device_ids": None} if on_cpu else {}
        return create_ddp_model(model, broadcast_buffers=False, **extra)

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
