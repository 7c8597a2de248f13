"""ODISE with the micro-world models, as a LazyConfig: the model of configs/micro/odise.yaml (the frozen micro
diffusion UNet as the backbone with its implicit captioner, the micro CLIP, a small Mask2Former-style head),
evaluated with the micro-world panoptic val split. tests/test_lazy_config.py builds both and compares them.
Train the head and evaluate it (the training settings of configs/micro/odise.yaml; the yacs route is
tools/train_net.py), or evaluate a trained one:

    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/odise_micro.py
    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/odise_micro.py --eval-only \\
        model_weights=output/lazy_micro_odise/model_final.pth

One CLIP model serves the captioner, the classifier and the inference ensemble: the backbone builds the
captioner around ``captioner_clip``, and ODISE takes the backbone's CLIP when ``clip`` is not given.
"""
import torch
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.transforms import RandomFlip, ResizeShortestEdge
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import LinearParamScheduler

from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper

from diffseg_d2.diffusion import load_diffusion
from diffseg_d2.engine.trainer import full_model_clipped
from diffseg_d2.modeling.backbone.diffusion_unet import DiffusionUNetBackbone, level_shapes
from diffseg_d2.modeling.heads.criterion import SetCriterion
from diffseg_d2.modeling.heads.matcher import HungarianMatcher
from diffseg_d2.modeling.heads.pixel_decoder import DeformablePixelDecoder
from diffseg_d2.modeling.heads.transformer_decoder import MaskedAttentionDecoder
from diffseg_d2.modeling.meta_arch.odise import ODISE
from diffseg_d2.modeling.meta_arch.open_vocab import dataset_classes
from diffseg_d2.pretrained.clip import OpenCLIP

DATASET = "diffseg_microworld_panoptic_val"
TRAIN_DATASET = "diffseg_microworld_panoptic_train"
LEVELS, WIDTH = ["res2", "res3", "res4", "res5"], 64  # the backbone's outputs, read by the pixel decoder
MASK_DIM = 64
LOSS = dict(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=1024)  # of the 4096 pixels of a scene

model = L(ODISE)(
    backbone=L(DiffusionUNetBackbone)(
        diffusion=L(load_diffusion)(weights="micro"),
        captioner_clip=L(OpenCLIP.from_weights)(weights="micro", templates=["a {}", "a photo of a {}."]),
        # The last layer of each UNet up block and of the last two VAE levels (see configs/micro/odise.yaml).
        taps={"unet": [1, 3], "vae_encoder": [1, 2], "vae_decoder": [1, 3]},
        out_features=LEVELS,
        out_channels=WIDTH,
        window=64,  # a whole scene
    ),
    pixel_decoder=L(DeformablePixelDecoder)(
        input_shape=L(level_shapes)(out_features=LEVELS, out_channels=WIDTH),
        conv_dim=64, mask_dim=MASK_DIM, num_layers=2, num_heads=4, ffn_dim=128,
    ),
    decoder=L(MaskedAttentionDecoder)(
        in_channels=64, hidden_dim=64, num_queries=16, num_heads=4, ffn_dim=128, num_layers=3,
        mask_dim=MASK_DIM, embed_dim=MASK_DIM,
    ),
    criterion=L(SetCriterion)(
        matcher=L(HungarianMatcher)(**LOSS),
        weight_dict={"loss_ce": LOSS["cost_class"], "loss_mask": LOSS["cost_mask"], "loss_dice": LOSS["cost_dice"]},
        num_points=LOSS["num_points"],
    ),
    pixel_mean=[127.5, 127.5, 127.5],
    pixel_std=[127.5, 127.5, 127.5],
    train_classes=L(dataset_classes)(name=TRAIN_DATASET),
    vocabulary=L(dataset_classes)(name=DATASET),
    thing_classes=L(dataset_classes)(name=DATASET, things=True),
)
model_device = "cpu"
model_weights = ""  # a trained head (tools/lazy_train_net.py loads it with detectron2's checkpointer)
dataloader = dict(
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=DATASET, filter_empty=False),
        mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format="RGB"),
        num_workers=0,
    ),
    evaluator=L(COCOPanopticEvaluator)(dataset_name=DATASET, output_dir="./output/lazy_micro_odise"),
)

# Training the head (tools/lazy_train_net.py without --eval-only), as configs/micro/odise.yaml trains it.
dataloader["train"] = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names=TRAIN_DATASET),
    mapper=L(MaskFormerPanopticMapper)(is_train=True, image_format="RGB", augmentations=[
        L(ResizeShortestEdge)(short_edge_length=(64,), max_size=64, sample_style="choice"), L(RandomFlip)()]),
    total_batch_size=8,
    num_workers=0,
)
optimizer = L(full_model_clipped)(  # Base-ODISE.yaml's AdamW with the whole model's gradient norm clipped at 0.01
    optimizer=torch.optim.AdamW,
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=5e-4, weight_decay=0.05, max_norm=0.01,
)
lr_multiplier = L(WarmupParamScheduler)(  # constant after a linear warm-up of 50 iterations from 0.067
    # (fvcore's ConstantParamScheduler refuses the scheduler's last step, where = 1.0; a flat line does not)
    scheduler=L(LinearParamScheduler)(start_value=1.0, end_value=1.0), warmup_length=50 / 3000, warmup_factor=0.067)
train = dict(output_dir="./output/lazy_micro_odise", init_checkpoint="", max_iter=3000, amp=dict(enabled=False),
             checkpointer=dict(period=500, max_to_keep=2), log_period=20)
