"""FreeDA with the micro-world models, as a LazyConfig: the model of configs/micro/freeda.yaml
(tests/test_lazy_config.py builds it and the yacs one and compares them). Its bank is built first:

    .venv/bin/python tools/build_freeda_bank.py --config-file configs/micro/freeda.yaml \\
        --captions output/micro_freeda/captions.txt --output output/micro_freeda/bank

(README, "Micro-world", says how the captions are made). Every argument not written here is the reference
computation's default (see FreeDA's docstring). The index is searched on the CPU (``index_on_device`` moves
it to a GPU where the yacs route's INDEX_DEVICE auto would).
"""
from detectron2.config import LazyCall as L

from diffseg_d2.freeda.released import load_bank
from diffseg_d2.modeling.meta_arch.freeda import FreeDA
from diffseg_d2.modeling.meta_arch.open_vocab import dataset_classes
from diffseg_d2.pretrained.clip import OpenCLIP
from diffseg_d2.pretrained.dino import DenseDINO

from .common import semantic_test_data

DATASET = "diffseg_microworld_shapes_val"
CLIP_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a photograph of a {}."]  # MODEL.DIFFSEG.CLIP.TEMPLATES
TOP_K = 100  # a 600-caption bank has some 300 rows per shape noun

model = L(FreeDA)(
    bank=L(load_bank)(folder="output/micro_freeda/bank", top_k=TOP_K, ef_search=50000, nprobe=16),
    clip=L(OpenCLIP.from_weights)(weights="micro", templates=CLIP_TEMPLATES),
    dino=L(DenseDINO.from_weights)(weights="micro"),
    vocabulary=L(dataset_classes)(name=DATASET),
    thing_classes=L(dataset_classes)(name=DATASET, things=True),
    panoptic_min_area=0.001,
    top_k=TOP_K,
    short_side=64,
    window=64,  # the whole scene in one window: an 8x8 patch grid
    stride=32,
    dino_size=0,  # the window as it is: 8x8 patches of the micro dense encoder
    superpixel=(50.0, 0.5, 10),
)
model_device = "cpu"
dataloader = semantic_test_data(DATASET, output_dir="./output/lazy_micro_freeda")
