"""The UNet families on the substrate (SD 1.x, SD 2.x, SDXL): loading from saved diffusers folders,
prompt encoding and the UNet call against diffusers' own pipelines, the methods on each family."""
import json
import shutil

import numpy as np
import pytest
import torch

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.diffusion import load_diffusion
from diffseg_d2.pretrained.stable_diffusion import UnsupportedFamilyError, resolve_sd_weights
from diffseg_d2.pretrained.weights import MissingWeightsError

TINY_DIFFSEG = "configs/tiny/diffsegmenter.yaml"
# The tiny SDXL has cross- and self-attention at latent factors 2 and 4 (none at the first level).
SDXL_OPTS = ["MODEL.DIFFSEG.CROSS_ATTN_FACTORS", "[4, 2]", "MODEL.DIFFSEG.CROSS_ATTN_WEIGHTS", "[0.1, 0.1]",
             "MODEL.DIFFSEG.SELF_ATTN_FACTOR", "2"]
PROMPTS = ["a photograph of a dog", "a sofa and a cat, in a room"]


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2", "tiny-sdxl"])
def family(request, _session_cache):
    return request.param, load_diffusion(request.param)


def test_each_tiny_preset_is_its_family_read_from_its_saved_folder(family):
    name, d = family
    folder = resolve_sd_weights(name).path
    with open(f"{folder}/model_index.json") as f:
        index = json.load(f)
    expected = {"tiny": ("sd1", "StableDiffusionPipeline"), "tiny-sd2": ("sd2", "StableDiffusionPipeline"),
                "tiny-sdxl": ("sdxl", "StableDiffusionXLPipeline")}[name]
    assert (d.family.name, index["_class_name"]) == expected
    # The same folder through the path a user's download takes (a local folder, not the preset name).
    assert load_diffusion(folder).family.name == expected[0]


def _pipeline(name):
    import diffusers

    folder = resolve_sd_weights(name).path
    cls = diffusers.StableDiffusionXLPipeline if name == "tiny-sdxl" else diffusers.StableDiffusionPipeline
    return cls.from_pretrained(folder)


def test_prompts_are_encoded_as_the_familys_diffusers_pipeline_encodes_them(family):
    """SD 1.x / 2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
    states side by side and the second's projected end-of-text embedding (pooled)."""
    name, d = family
    pipe = _pipeline(name)
    ours = d.encode_text(d.tokenize(PROMPTS))
    if name == "tiny-sdxl":
        theirs, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    else:
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        assert ours.pooled is None
    torch.testing.assert_close(ours.tokens, theirs, rtol=0, atol=0)


def test_sdxl_unet_call_takes_pooled_text_and_size_ids_as_its_pipeline_does():
    d = load_diffusion("tiny-sdxl")
    pipe = _pipeline("tiny-sdxl")
    context = d.encode_text(d.tokenize(PROMPTS))
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))  # a 128x192 image
    ids = pipe._get_add_time_ids((128, 192), (0, 0), (128, 192), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        theirs = pipe.unet(latents, torch.tensor([100, 100]), encoder_hidden_states=context.tokens,
                           added_cond_kwargs={"text_embeds": context.pooled, "time_ids": ids.expand(2, -1)}).sample
    torch.testing.assert_close(d.unet_forward(latents, 100, context), theirs, rtol=0, atol=0)
    # SDXL guides against zeros, not the encoded empty prompt.
    assert not d.unconditional_context().tokens.any() and not d.unconditional_context().pooled.any()


def test_a_folder_of_another_family_is_named_with_the_supported_ones(tmp_path):
    folder = tmp_path / "cascade"
    shutil.copytree(resolve_sd_weights("tiny").path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableCascadeDecoderPipeline"}))
    with pytest.raises(UnsupportedFamilyError, match=r"holds a StableCascadeDecoderPipeline.*Stable Diffusion 1\.x"
                       r".*Stable Diffusion XL.*Stable Diffusion 3 / 3\.5.*FLUX\.1 \[dev\]"):
        load_diffusion(str(folder))
    # A folder that names a FLUX pipeline is read as FLUX: an incomplete one is named so.
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(MissingWeightsError, match=r"FLUX\.1 \[schnell\] folder .* missing transformer/config\.json"):
        load_diffusion(str(folder))
    sdxl = tmp_path / "sdxl"
    shutil.copytree(resolve_sd_weights("tiny-sdxl").path, sdxl)
    shutil.rmtree(sdxl / "text_encoder_2")
    with pytest.raises(MissingWeightsError, match=r"Stable Diffusion XL folder .* missing text_encoder_2/config\.json"):
        load_diffusion(str(sdxl))


@pytest.mark.parametrize("weights, opts", [("tiny-sd2", []), ("tiny-sdxl", SDXL_OPTS)])
def test_diffsegmenter_segments_with_each_family_through_default_predictor(weights, opts):
    from detectron2.engine import DefaultPredictor

    cfg = get_diffseg_cfg(TINY_DIFFSEG, ["MODEL.DIFFSEG.SD.WEIGHTS", weights, "DATASETS.TEST", "()",
                                         "MODEL.DIFFSEG.VOCABULARY", "['background', 'cat', 'dog']", *opts])
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    scores = predictor(image)["sem_seg"]
    assert scores.shape == (3, 48, 64) and torch.isfinite(scores).all()
    assert predictor.model.diffusion.family.name == weights.split("-")[1]


def test_sdxl_own_pass_refinement_in_several_row_blocks_equals_one_block(monkeypatch):
    """The self-attention refinement reads queries and keys in row blocks (never an N x N matrix per
    class); at SDXL sizes that is several blocks: forced here, the result is the one-block result."""
    from detectron2.modeling import build_model

    from diffseg_d2.diffusion import attention as attention_module

    cfg = get_diffseg_cfg(TINY_DIFFSEG, ["MODEL.DIFFSEG.SD.WEIGHTS", "tiny-sdxl", "DATASETS.TEST", "()",
                                         "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False", *SDXL_OPTS])
    model = build_model(cfg).eval()
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    x = [{"image": image, "vocabulary": ["background", "cat", "dog", "sofa"]}]
    with torch.no_grad():
        whole = model(x)[0]["sem_seg"]
    monkeypatch.setattr(attention_module, "_CHUNK_BYTES", 2048)  # a few rows of 64 tokens at a time
    with torch.no_grad():
        blocks = model(x)[0]["sem_seg"]
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)


def test_daam_and_the_freeda_bank_run_on_sdxl():
    from detectron2.modeling import build_model

    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    daam = build_model(get_diffseg_cfg(TINY_DIFFSEG, ["MODEL.META_ARCHITECTURE", "DAAM", "MODEL.DIFFSEG.SD.WEIGHTS",
                                                      "tiny-sdxl", "DATASETS.TEST", "()", *SDXL_OPTS])).eval()
    with torch.no_grad():
        out = daam([{"image": torch.zeros(3, 40, 40), "vocabulary": ["background", "cat", "dog"]}])[0]["sem_seg"]
    assert out.shape == (3, 40, 40) and torch.isfinite(out).all()
    builder = PrototypeBankBuilder.from_config(get_diffseg_cfg("configs/tiny/freeda.yaml", [
        "MODEL.DIFFSEG.SD.WEIGHTS", "tiny-sdxl", "MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "list",
        "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", "configs/tiny/freeda_nouns.txt", "MODEL.DIFFSEG.FREEDA.BUILD.STEPS", "2",
        "MODEL.DIFFSEG.FREEDA.BUILD.CROSS_ATTN_FACTORS", "[4, 2]"])).eval()
    rows = builder.caption_prototypes(0, "a dog on a sofa")
    assert rows.nouns and rows.image.shape == (3, builder.image_size, builder.image_size)
    assert torch.isfinite(rows.prototypes).all() and torch.isfinite(rows.keys).all()


def test_odise_runs_on_sdxl_and_names_taps_its_unet_does_not_have():
    from detectron2.modeling import build_model

    opts = ["MODEL.DIFFSEG.SD.WEIGHTS", "tiny-sdxl"]
    torch.manual_seed(0)
    model = build_model(get_diffseg_cfg("configs/tiny/odise.yaml", opts)).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 128, 128) * 255, "vocabulary": ["person", "chair"]}])[0]
    assert out["sem_seg"].shape == (2, 128, 128) and torch.isfinite(out["sem_seg"]).all()
    with pytest.raises(ValueError, match=r"The unet has 6 tappable layers \(0\.\.5\); layer 7 does not exist"):
        build_model(get_diffseg_cfg("configs/tiny/odise.yaml", opts + ["MODEL.DIFFSEG.ODISE.BACKBONE.UNET_BLOCKS", "[1, 3, 7]"]))
