"""The DAAM baseline on the tiny preset: joint prompt, aggregation over layers and timesteps, errors."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.diffusion import AttentionStore, build_joint_prompt, record_attention
from diffseg_d2.modeling.meta_arch import DAAM
from diffseg_d2.vocabulary import VocabularyError

VOCAB = ["background", "square", "red square", "dining table"]


@pytest.fixture(scope="module")
def daam(_session_cache, tiny_cfg_path):
    cfg = get_diffseg_cfg(
        tiny_cfg_path, ["MODEL.META_ARCHITECTURE", "DAAM", "MODEL.DIFFSEG.DAAM.TIMESTEPS", "[700, 300, 50]"]
    )
    model = build_model(cfg)
    model.eval()
    return model


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 96, 128), generator=g).float()


def test_joint_prompt_finds_each_name_at_its_own_place(tiny_sd):
    tok = tiny_sd.tokenizer
    prompts = build_joint_prompt(tok, ["square", "red square", "dining table"], "a photo of {}.")
    ids = prompts.input_ids[0].tolist()
    assert prompts.prompts == ["a photo of square, red square, dining table."] * 3
    assert torch.equal(prompts.input_ids[0], prompts.input_ids[2])
    square = tok("square", add_special_tokens=False).input_ids
    red_square = tok("red square", add_special_tokens=False).input_ids
    first = prompts.token_index[0][prompts.token_weight[0] > 0].tolist()
    second = prompts.token_index[1][prompts.token_weight[1] > 0].tolist()
    assert [ids[i] for i in first] == square
    assert [ids[i] for i in second] == red_square
    assert min(second) > max(first)  # "square" inside "red square" is not taken for the first class


def test_joint_prompt_longer_than_the_context_is_refused(tiny_sd):
    names = [f"thing number {i}" for i in range(40)]
    with pytest.raises(VocabularyError, match="more than the text encoder's context"):
        build_joint_prompt(tiny_sd.tokenizer, names, "a photo of {}.")


def test_output_channels_and_background(daam):
    assert isinstance(daam, DAAM)
    assert daam.category_filter is None and not daam.refine
    out = daam([{"image": _image(), "height": 48, "width": 64, "vocabulary": VOCAB}])[0]["sem_seg"]
    assert out.shape == (4, 48, 64)
    assert torch.all(out[0] == daam.background_threshold)
    for channel in out[1:]:
        assert channel.min() == 0 and abs(float(channel.max()) - 1) < 1e-5


def test_every_cross_attention_layer_and_timestep_is_summed(daam, monkeypatch):
    names = ["square", "dining table"]
    calls = []
    original = daam.diffusion.unet_forward

    def counting(latents, step, context):
        calls.append(int(step))
        return original(latents, step, context)

    monkeypatch.setattr(daam.diffusion, "unet_forward", counting)
    maps = daam.class_maps(_image(), names, [0, 1])
    assert calls == [700, 300, 50]
    assert maps.shape[0] == 2

    # The same sum by hand: per timestep, per factor, bicubic to the finest map, clamped, added.
    d = daam.diffusion
    prompts = build_joint_prompt(d.tokenizer, names, daam.carrier_template)
    context = d.encode_text(prompts.input_ids[:1])
    latents = daam.encode(_image(), torch.Generator().manual_seed(daam.seed))
    expected = 0.0
    for t in (700, 300, 50):
        store = AttentionStore(latents.shape[-2:], prompts.token_index, prompts.token_weight, context.expand(2, -1, -1))
        with record_attention(d.unet, store, daam.cross_attn_factors):
            g = torch.Generator().manual_seed(daam.seed)
            original(d.add_noise(latents, t, g), t, context)
        target = store.resolution(min(daam.cross_attn_factors))
        for f in daam.cross_attn_factors:
            m = store.cross_sum(f)
            if tuple(m.shape[-2:]) != target:
                m = F.interpolate(m[None], size=target, mode="bicubic", align_corners=False)[0].clamp(min=0)
            expected = expected + m
    assert torch.allclose(maps, expected, atol=1e-5)
    assert len(daam.cross_attn_factors) == len(set(daam.cross_attn_factors)) >= 2  # all resolutions, not one


def test_bad_timesteps_are_refused(tiny_cfg_path, _session_cache):
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.META_ARCHITECTURE", "DAAM", "MODEL.DIFFSEG.DAAM.TIMESTEPS", "[1000]"])
    with pytest.raises(ValueError, match="DAAM.TIMESTEPS"):
        build_model(cfg)
