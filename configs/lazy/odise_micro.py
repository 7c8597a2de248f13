"""ODISE with the micro-world models, as a LazyConfig: the model of configs/micro/odise.yaml (the frozen micro
diffusion UNet as the backbone with its implicit captioner, the micro CLIP, a small Mask2Former-style head),
evaluated with the micro-world panoptic val split. tests/test_lazy_config.py builds both and compares them.
The head is trained by tools/train_net.py (configs/micro/odise.yaml); evaluate a trained one with

    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/odise_micro.py --eval-only \\
        model_weights=output/micro_odise/model_final.pth

One CLIP model serves the captioner, the classifier and the inference ensemble: the backbone builds the
captioner around ``captioner_clip``, and ODISE takes the backbone's CLIP when ``clip`` is not given.
"""
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOPanopticEvaluator

from diffseg_d2.diffusion import load_diffusion
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
