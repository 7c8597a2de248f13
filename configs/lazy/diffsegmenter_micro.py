"""DiffSegmenter with the micro-world models, as a LazyConfig: the model of configs/micro/diffsegmenter.yaml
(tests/test_lazy_config.py builds both and compares them). Every argument not written here is the
reference computation's default (see DiffSegmenter's docstring).

    from detectron2.config import LazyConfig, instantiate
    cfg = LazyConfig.load(diffseg_d2.model_zoo.get_config_file("lazy/diffsegmenter_micro.py"))
    model = instantiate(cfg.model).eval()
    model([{"image": chw_uint8_tensor, "vocabulary": ["background", "circle", "square"]}])
"""
from detectron2.config import LazyCall as L

from diffseg_d2.diffusion import load_diffusion
from diffseg_d2.modeling.meta_arch.diffsegmenter import CategoryFilter, DiffSegmenter
from diffseg_d2.modeling.meta_arch.open_vocab import dataset_classes
from diffseg_d2.pretrained.clip import OpenCLIP

from .common import semantic_test_data

DATASET = "diffseg_microworld_shapes_val"
CLIP_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a photograph of a {}."]  # MODEL.DIFFSEG.CLIP.TEMPLATES

model = L(DiffSegmenter)(
    diffusion=L(load_diffusion)(weights="micro"),
    vocabulary=L(dataset_classes)(name=DATASET),
    thing_classes=L(dataset_classes)(name=DATASET, things=True),
    panoptic_min_area=0.001,
    image_size=64,  # the micro VAE downsamples by 4: a 16x16 latent
    prompt_template="a {}",
    carrier_template="a {}",
    cross_attn_factors=[2, 1],  # the micro UNet's 8x8 and 16x16 cross-attention
    cross_attn_weights=[0.5, 0.5],
    category_filter=L(CategoryFilter)(
        clip=L(OpenCLIP.from_weights)(weights="micro", templates=CLIP_TEMPLATES), threshold=0.15),
)
model_device = "cpu"
dataloader = semantic_test_data(DATASET, output_dir="./output/lazy_micro_diffsegmenter")
