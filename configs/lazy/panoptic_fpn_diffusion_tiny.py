"""The diffusion backbone under a stock detectron2 architecture, as a LazyConfig: detectron2's own Panoptic FPN
LazyConfig (``common/models/panoptic_fpn.py`` of its model zoo) with ``DiffusionUNetBackbone`` as the FPN's
bottom-up network, sized as projects/diffusion_panoptic_fpn/configs/tiny.yaml (tiny random-weight SD preset,
the one-image VOC panoptic sample: a code-path check, not a quality figure). tests/test_lazy_config.py builds
both and compares them.

    .venv/bin/python tools/lazy_train_net.py --config-file configs/lazy/panoptic_fpn_diffusion_tiny.py --eval-only
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators
from detectron2.layers import ShapeSpec

from diffseg_d2.diffusion import load_diffusion
from diffseg_d2.modeling.backbone.diffusion_unet import DiffusionUNetBackbone

DATASET = "diffseg_sample_voc_panoptic_separated"
WIDTH = 64  # the backbone's and the FPN's channels

model = model_zoo.get_config("common/models/panoptic_fpn.py").model
model.backbone.bottom_up = L(DiffusionUNetBackbone)(
    diffusion=L(load_diffusion)(weights="tiny"),
    # The last layer of each UNet up block and of the last two VAE levels (see the yacs config).
    taps={"unet": [1, 3, 5], "vae_encoder": [2, 3], "vae_decoder": [1, 3]},
    out_features=["res2", "res3", "res4", "res5"],
    out_channels=WIDTH,
    window=128,
)
model.backbone.out_channels = WIDTH
# The diffusion backbone reads RGB in [-1, 1].
model.pixel_mean, model.pixel_std, model.input_format = [127.5] * 3, [127.5] * 3, "RGB"
rpn = model.proposal_generator
rpn.head.in_channels = WIDTH
rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
rpn.post_nms_topk = (200, 100)
roi = model.roi_heads
roi.num_classes, roi.batch_size_per_image = 20, 64
roi.box_head.input_shape = ShapeSpec(channels=WIDTH, height=7, width=7)
roi.box_head.fc_dims = [128, 128]
roi.box_predictor.input_shape = ShapeSpec(channels=128)
roi.mask_head.input_shape = ShapeSpec(channels=WIDTH, width=14, height=14)
roi.mask_head.conv_dims = [64, 64, 64]  # 2 convolutions and the deconvolution (yacs NUM_CONV 2)
model.sem_seg_head.num_classes = 2  # things + background
model.sem_seg_head.conv_dims = 64
model.sem_seg_head.loss_weight = 1.0  # the yacs default (detectron2's LazyConfig says 0.5)

model_device = "cpu"
dataloader = dict(
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=DATASET, filter_empty=False),
        mapper=L(DatasetMapper)(is_train=False, image_format="RGB",
                                augmentations=[L(ResizeShortestEdge)(short_edge_length=128, max_size=512)]),
        num_workers=0,
    ),
    evaluator=L(DatasetEvaluators)(evaluators=[
        L(COCOPanopticEvaluator)(dataset_name=DATASET, output_dir="./output/lazy_panoptic_fpn_tiny"),
        L(COCOEvaluator)(dataset_name=DATASET, tasks=("segm",), output_dir="./output/lazy_panoptic_fpn_tiny"),
    ]),
)
