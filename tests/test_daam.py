"""The DAAM baseline on the tiny preset: joint prompt, aggregation over layers and timesteps, errors."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.diffusion import build_joint_prompt
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


def test_heat_maps_are_daams_by_hand(daam, monkeypatch):
    """castorini/daam's aggregation, computed here from each cross-attention layer's inputs: per
    (layer, head, token) the softmax probabilities summed over the UNet calls (one per timestep),
    upsampled bicubically to the finest map and clamped at 0; the mean over every (layer, head) of the
    down and up blocks (the mid block left out, as DAAM's locator does); a word's mean over its tokens."""
    names = ["square", "dining table"]
    d = daam.diffusion
    calls, inputs = [], {}
    original = d.denoise  # the denoiser call every family's substrate has

    def counting(latents, step, context, **kwargs):
        calls.append(int(step))
        return original(latents, step, context, **kwargs)

    handles = []
    for name, module in d.unet.named_modules():
        if name.endswith("attn2"):
            def keep(mod, args, kwargs, name=name):
                inputs.setdefault(name, []).append((args[0] if args else kwargs["hidden_states"],
                                                    kwargs.get("encoder_hidden_states")))
            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    monkeypatch.setattr(d, "denoise", counting)
    try:
        maps = daam.class_maps(_image(), names, [0, 1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [700, 300, 50]

    prompts, _ = daam._vocabulary_prompts(tuple(names))
    modules = dict(d.unet.named_modules())
    finest = maps.shape[-2:]
    per_head = []
    for name, seen in inputs.items():
        if name.startswith("mid_block"):
            continue
        attn, total = modules[name], 0.0
        for hidden, context in seen:
            q = attn.to_q(hidden)[0].view(-1, attn.heads, attn.inner_dim // attn.heads).transpose(0, 1)
            k = attn.to_k(context)[0].view(-1, attn.heads, attn.inner_dim // attn.heads).transpose(0, 1)
            total = total + (q @ k.transpose(1, 2) * attn.scale).softmax(-1)  # (H, N, L)
        h = w = int(round(total.shape[1] ** 0.5))  # the image is resized to an IMAGE_SIZE square first
        per_token = total.permute(0, 2, 1).reshape(-1, 1, h, w)  # (H * L, 1, h, w)
        if (h, w) != tuple(finest):
            per_token = F.interpolate(per_token, size=tuple(finest), mode="bicubic", align_corners=False).clamp(min=0)
        per_head.append(per_token.view(attn.heads, -1, *finest))
    tokens = torch.cat(per_head).mean(0)  # (L, h, w)
    expected = torch.stack([(tokens[prompts.token_index[k]] * prompts.token_weight[k][:, None, None]).sum(0)
                            for k in range(2)])
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-7)
    assert any(n.startswith("mid_block") for n in inputs)  # there was a mid block to leave out


def test_bad_timesteps_are_refused(tiny_cfg_path, _session_cache):
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.META_ARCHITECTURE", "DAAM", "MODEL.DIFFSEG.DAAM.TIMESTEPS", "[1000]"])
    with pytest.raises(ValueError, match="DAAM.TIMESTEPS"):
        build_model(cfg)
