import glob
import os
import subprocess
import sys

import pytest
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from diffseg_d2 import add_diffseg_config, get_diffseg_cfg

ROOT = os.path.join(os.path.dirname(__file__), "..")
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs_for_every_dataset():
    leaves = {os.path.basename(p) for p in SHIPPED if "diffsegmenter" in p}
    for name in ("voc21", "voc20", "context59", "context60", "coco_object", "coco_stuff171", "ade150", "cityscapes"):
        assert f"{name}.yaml" in leaves


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, ROOT) for p in SHIPPED])
def test_every_shipped_config_parses(path):
    cfg = get_diffseg_cfg(path)
    assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY
    d = cfg.MODEL.DIFFSEG
    assert len(d.CROSS_ATTN_FACTORS) == len(d.CROSS_ATTN_WEIGHTS) > 0
    assert d.CONDITIONING in ("shared", "per_class")
    from detectron2.data import DatasetCatalog

    for name in cfg.DATASETS.TEST:
        assert name in DatasetCatalog.list()


def test_sd15_configs_carry_the_reference_settings():
    cfg = get_diffseg_cfg(os.path.join(ROOT, "configs", "diffsegmenter", "voc21.yaml"))
    d = cfg.MODEL.DIFFSEG
    assert d.SD.WEIGHTS == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (d.IMAGE_SIZE, d.NOISE_STEP) == (512, 100)
    assert list(d.CROSS_ATTN_FACTORS) == [8, 4, 2, 1]
    assert list(d.CROSS_ATTN_WEIGHTS) == [0.3, 0.5, 0.1, 0.1]
    assert d.PROMPT_TEMPLATE == "a photograph of {}"
    assert cfg.DATASETS.TEST == ("diffseg_voc21_val",)
    # the reference computation (its code, not our departures)
    assert (d.CONDITIONING, d.REFINEMENT, d.VAE_LATENT, d.RESIZE_ANTIALIAS) == ("per_class", "own", "sample", False)
    assert (d.CLASS_TOKEN_WEIGHT, d.TOKEN_SELECTION, d.ING_RULE) == (1.21, "first", True)
    assert d.CAPTION.ENABLED and d.CAPTION.CONDITIONED and d.CAPTION.WEIGHTS == "Salesforce/blip-image-captioning-large"
    # the reference prompts only each image's listed classes; the CLIP filter stands in for its label files
    assert d.CATEGORY_FILTER.ENABLED and d.CATEGORY_FILTER.THRESHOLD == 0.02
    assert "dining table=table" in d.PROMPT_NAMES and "person=people" in d.PROMPT_NAMES
    coco = get_diffseg_cfg(os.path.join(ROOT, "configs", "diffsegmenter", "coco_object.yaml")).MODEL.DIFFSEG
    assert (coco.PROMPT_TEMPLATE, coco.TOKEN_SELECTION) == ("a photography of {}", "last")


def test_add_config_is_idempotent_and_coexists_with_other_projects():
    cfg = get_cfg()
    cfg.MODEL.OTHER_PROJECT = CN({"KEY": 1})  # another project's add_*_config
    add_diffseg_config(cfg)
    cfg.MODEL.DIFFSEG.NOISE_STEP = 250
    add_diffseg_config(cfg)  # a second call must not reset values
    assert cfg.MODEL.DIFFSEG.NOISE_STEP == 250
    assert cfg.MODEL.OTHER_PROJECT.KEY == 1
    frozen = get_cfg()
    frozen.freeze()
    add_diffseg_config(frozen)
    assert frozen.is_frozen() and "DIFFSEG" in frozen.MODEL


def test_opts_override_and_unknown_keys_are_refused(tiny_cfg_path):
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.NOISE_STEP", "300"])
    assert cfg.MODEL.DIFFSEG.NOISE_STEP == 300
    with pytest.raises(KeyError, match="NOT_A_KEY"):
        get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.NOT_A_KEY", "1"])


def test_every_key_has_a_comment_and_is_declared_once():
    """Each key is declared once, in its method's module (diffseg_d2/config/*.py), with a comment over it;
    every key of the config was declared that way (none set elsewhere)."""
    import glob
    import re

    declared = []
    for path in sorted(glob.glob(os.path.join(ROOT, "diffseg_d2", "config", "*.py"))):
        src = open(path).read().splitlines()
        for i, line in enumerate(src):
            m = re.match(r'\s*k(?:\.top)?\("([A-Z0-9_.]+)"', line)
            if m:
                declared.append(m.group(1))
                assert src[i - 1].strip().startswith("#"), f"no comment over: {line.strip()} ({path})"
    assert len(declared) == len(set(declared)), sorted(k for k in declared if declared.count(k) > 1)
    cfg = get_diffseg_cfg()

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    ours = set(leaves(cfg.MODEL.DIFFSEG))
    assert ours == {k for k in declared if k.split(".")[0] not in ("TEST", "INPUT")}


def test_import_registers_without_heavy_imports():
    code = (
        "import sys, diffseg_d2\n"
        "from detectron2.modeling import META_ARCH_REGISTRY\n"
        "from detectron2.data import DatasetCatalog\n"
        "assert 'DiffSegmenter' in META_ARCH_REGISTRY and 'FreeDA' in META_ARCH_REGISTRY\n"
        "assert 'diffseg_sample_voc' in DatasetCatalog.list()\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'faiss', 'timm', 'skimage', 'nltk')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("leaf, architecture, image_size", [("voc21_sd21.yaml", "sd21", 512), ("voc21_sdxl.yaml", "sdxl", 1024)])
def test_family_configs_read_layers_their_architecture_has(leaf, architecture, image_size):
    """The SD 2.1 / SDXL configs' attention factors exist in the real UNet of that family (built on
    the meta device: its structure, no weights) and tile its latent at the config's image size."""
    import diffusers
    import torch

    from diffseg_d2.diffusion import available_factors
    from diffseg_d2.pretrained.stable_diffusion import SD_ARCHITECTURES

    d = get_diffseg_cfg(os.path.join(ROOT, "configs", "diffsegmenter", leaf)).MODEL.DIFFSEG
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **SD_ARCHITECTURES[architecture]["unet"])
    assert set(d.CROSS_ATTN_FACTORS) <= set(available_factors(unet, "cross"))
    assert d.SELF_ATTN_FACTOR == min(available_factors(unet, "self"))  # the finest self-attention, as the reference
    assert d.IMAGE_SIZE == image_size and (d.IMAGE_SIZE // 8) % max(d.CROSS_ATTN_FACTORS) == 0


@pytest.mark.parametrize("leaf, family, blocks", [("voc21_sd3.yaml", "sd3", 24), ("voc21_flux.yaml", "flux-dev", 57)])
def test_transformer_configs_read_blocks_their_model_has(leaf, family, blocks):
    """The SD3 / FLUX configs' blocks exist in the released transformer of that family (built on the meta
    device: its structure, no weights), and the image size tiles its patches."""
    import diffusers
    import torch

    from diffseg_d2.diffusion import joint_attention_layers
    from diffseg_d2.pretrained.diffusion_transformers import RELEASED_TRANSFORMERS, TRANSFORMER_FAMILIES

    d = get_diffseg_cfg(os.path.join(ROOT, "configs", "diffsegmenter", leaf)).MODEL.DIFFSEG
    cls = getattr(diffusers, TRANSFORMER_FAMILIES[family].transformer)
    with torch.device("meta"):
        transformer = cls(**RELEASED_TRANSFORMERS[family])
    layers = joint_attention_layers(transformer)
    assert len(layers) == blocks
    assert set(d.TRANSFORMER.BLOCKS) <= set(layers) and set(d.TRANSFORMER.REFINE_BLOCKS) <= set(layers)
    assert d.TRANSFORMER.REFINE_BLOCKS and d.IMAGE_SIZE == TRANSFORMER_FAMILIES[family].native_size
    assert d.IMAGE_SIZE % 16 == 0
