"""PixArt-Σ on the substrate: loading a saved PixArtSigmaPipeline folder, the substrate operations against
the pipeline's own, the cross-attention read-out against the materialised masked softmax of the same layer
(square and non-square), unchanged outputs while recording, and DiffSegmenter / DAAM / the FreeDA builder
through the config."""
import json
import shutil

import numpy as np
import pytest
import torch

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.diffusion import AttentionStore, FrozenPixArt, attention_blocks, load_diffusion, minmax_per_map
from diffseg_d2.diffusion import record_attention
from diffseg_d2.diffusion.substrate import substrate_kind
from diffseg_d2.pretrained.pixart import resolve_pixart_weights
from diffseg_d2.pretrained.stable_diffusion import UnsupportedFamilyError
from diffseg_d2.pretrained.weights import MissingWeightsError

PRESET = "tiny-pixart-sigma"
NAMES = ["cat", "dog", "red car"]
STEP = 150


@pytest.fixture(scope="module")
def pixart(_session_cache):
    return load_diffusion(PRESET)


def _cfg(*opts):
    return get_diffseg_cfg("configs/tiny/diffsegmenter.yaml", [
        "MODEL.DIFFSEG.SD.WEIGHTS", PRESET, "DATASETS.TEST", "()", "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False",
        *opts])


def _image(seed=0, shape=(3, 64, 64)):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8))


class _Inputs:
    """The inputs of every call of the hooked attention layers (``name -> [(hidden_states, context)]``)."""

    def __init__(self, model, names):
        self.calls = {n: [] for n in names}
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n), with_kwargs=True)
                        for n in names]

    def _hook(self, name):
        def hook(module, args, kwargs):
            states = args[0] if args else kwargs["hidden_states"]
            self.calls[name].append((states.detach().clone(), kwargs.get("encoder_hidden_states")))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _probs(attn, hidden, context, mask=None):
    """The materialised (B, H, N, L) softmax of ``attn`` over the keys of ``context`` where ``mask`` (B, L) is
    true: the masked keys take no part in the normalisation."""
    q = attn.to_q(hidden).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = attn.to_k(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def _class_maps(probs, token_index, token_weight):
    """(K, N): each class's mass on its word's tokens, mean over the tokens and heads; probs (K or 1, H, N, L)."""
    idx = token_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
    return (probs.expand(len(token_index), -1, -1, -1).gather(-1, idx) * token_weight[:, None, None, :]).sum(-1).mean(1)


# ------------------------------------------------------------------------------------------------ loading
def test_a_pixart_sigma_folder_loads_as_its_family_and_broken_ones_are_named(tmp_path, pixart):
    folder = tmp_path / "pixart"
    shutil.copytree(resolve_pixart_weights(PRESET).path, folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    assert substrate_kind(str(folder)) == "pixart"
    loaded = load_diffusion(str(folder))
    assert isinstance(loaded, FrozenPixArt) and loaded.family.name == "pixart-sigma"
    # the same weights as the preset's
    for (name, a), (_, b) in zip(loaded.state_dict().items(), pixart.state_dict().items()):
        assert torch.equal(a, b), name
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(UnsupportedFamilyError, match=r"holds a PixArtAlphaPipeline.*Stable Diffusion 1\.x.*"
                                                     r"FLUX\.1 \[dev\].*PixArt-Σ \(PixArtSigmaPipeline\)"):
        load_diffusion(str(folder))
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"PixArt-Σ folder .* missing text_encoder/\*\.safetensors"):
        load_diffusion(str(folder))


def test_the_tiny_preset_has_the_real_block_structure(pixart):
    t = pixart.transformer
    assert type(t).__name__ == "PixArtTransformer2DModel" and type(pixart.text_encoder).__name__ == "T5EncoderModel"
    assert t.config.out_channels == 2 * t.config.in_channels == 8  # learned sigma
    assert attention_blocks(t, "cross") == attention_blocks(t, "self") == ["transformer_blocks.0", "transformer_blocks.1"]
    assert [type(b).__name__ for b in t.transformer_blocks] == ["BasicTransformerBlock"] * 2
    assert pixart.context_length == 300 and pixart.patch == 2 and pixart.latent_factor == 8


# ------------------------------------------------------------------------------------------------ substrate
def test_text_latents_noise_and_transformer_call_follow_the_pipeline(pixart, _session_cache):
    import diffusers

    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(resolve_pixart_weights(PRESET).path)
    prompts = ["a photograph of a dog", "a sofa and a cat, in a room"]
    ids = pixart.tokenize(prompts)
    context = pixart.encode_text(ids)
    with torch.no_grad():  # as ours (autograd's kernels round differently)
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu")
    assert torch.equal(context.mask, mask.bool()) and 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(context.tokens, embeds)
    # DDPM's forward process at the step, on a non-square latent
    latents = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    noisy = pixart.add_noise(latents, STEP, torch.Generator().manual_seed(1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    alpha = pixart.scheduler.alphas_cumprod[STEP]
    torch.testing.assert_close(noisy, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise)
    # the transformer call as the pipeline makes it, keeping the noise half of the learned-sigma output
    with torch.no_grad():
        theirs = pipe.transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                  timestep=torch.tensor([STEP]).expand(2),
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert torch.equal(pixart.denoise(noisy, STEP, context), theirs.chunk(2, dim=1)[0])
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        pixart.denoise(noisy[..., :11], STEP, context)


def test_generate_follows_the_pipeline(pixart, _session_cache):
    """Two DDIM steps from the same initial noise with classifier-free guidance against the empty prompt."""
    import diffusers

    path = resolve_pixart_weights(PRESET).path
    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(path, scheduler=diffusers.DDIMScheduler.from_config(
        pixart.scheduler.config))
    context = pixart.encode_text(pixart.tokenize(["a photograph of a dog"]))
    ours = pixart.generate(context, image_size=64, steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
    empty = pixart.unconditional_context()
    theirs = pipe(height=64, width=64, num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                  use_resolution_binning=False, prompt_embeds=context.tokens, prompt_attention_mask=context.mask.long(),
                  negative_prompt=None, negative_prompt_embeds=empty.tokens,
                  negative_prompt_attention_mask=empty.mask.long(),
                  generator=torch.Generator().manual_seed(5)).images * 255
    assert ours.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.51)


def test_class_prompts_read_the_class_words_t5_pieces(pixart):
    prompts = pixart.class_prompts(NAMES, "a photograph of {}")
    assert prompts.input_ids.shape == (3, 300)
    for k, name in enumerate(NAMES):
        idx = prompts.token_index[k][prompts.token_weight[k] > 0]
        pieces = pixart.tokenizer.convert_ids_to_tokens(prompts.input_ids[k, idx].tolist())
        assert "".join(pieces).replace("\u2581", " ").strip() == name
        assert pixart.word_positions(prompts.input_ids, k, name) == {"t5": idx.tolist()}


# ------------------------------------------------------------------------------------------------ read-out
@pytest.mark.parametrize("latent", [(16, 16), (16, 12)])
def test_recorded_class_maps_are_the_masked_softmax_of_the_layer(pixart, latent):
    """Each class prompt's pass: the recorded map of a block is the class word's probability (mean over its
    tokens and the heads) in the layer's softmax over the UNMASKED keys, within 1e-5; the padding keys'
    mask matters (without it the maps are far off); recording leaves the output unchanged bit for bit."""
    d = pixart
    block = "transformer_blocks.1"
    prompts = d.class_prompts(NAMES, "a photograph of {}", selection="mean")
    context = d.encode_text(prompts.input_ids)
    latents = torch.randn(3, 4, *latent, generator=torch.Generator().manual_seed(2))
    plain = d.denoise(latents, STEP, context)
    store = AttentionStore(latent, prompts.token_index, prompts.token_weight, own_self_attention=True)
    inputs = _Inputs(d.transformer, [f"{block}.attn2"])
    try:
        with record_attention(d.transformer, store, cross_blocks=[block], self_blocks=attention_blocks(d.transformer, "self")):
            recorded = d.denoise(latents, STEP, context)
    finally:
        inputs.remove()
    assert torch.equal(recorded, plain)
    assert store.cross_factors() == [2]
    ours = store.cross_maps(2).flatten(1)  # one layer, one call: the mean is that layer's maps
    assert ours.shape == (3, (latent[0] // 2) * (latent[1] // 2))
    (hidden, keys), = inputs.calls[f"{block}.attn2"]
    attn = d.transformer.get_submodule(f"{block}.attn2")
    with torch.no_grad():
        masked = _class_maps(_probs(attn, hidden, keys, context.mask), prompts.token_index, prompts.token_weight)
        unmasked = _class_maps(_probs(attn, hidden, keys), prompts.token_index, prompts.token_weight)
    assert (ours - masked).abs().max() < 1e-5
    assert (ours - unmasked).abs().max() > 1e-2


def test_read_out_against_other_prompts_uses_their_mask(pixart):
    """Shared conditioning: one pass on a carrier prompt, the classes read against their own prompts' keys
    (through the transformer's caption projection) and masks."""
    d = pixart
    block = "transformer_blocks.0"
    prompts = d.class_prompts(NAMES, "a photograph of {}", selection="mean")
    context = d.encode_text(prompts.input_ids)
    carrier = d.encode_text(d.tokenize(["a photograph of cat, dog, red car."]))
    latents = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    plain = d.denoise(latents, STEP, carrier)
    store = AttentionStore((16, 12), prompts.token_index, prompts.token_weight,
                           readout_context=d.cross_attention_states(context))
    inputs = _Inputs(d.transformer, [f"{block}.attn2"])
    try:
        with record_attention(d.transformer, store, cross_blocks=[block]):
            recorded = d.denoise(latents, STEP, carrier)
    finally:
        inputs.remove()
    assert torch.equal(recorded, plain)
    (hidden, _), = inputs.calls[f"{block}.attn2"]
    attn = d.transformer.get_submodule(f"{block}.attn2")
    with torch.no_grad():
        keys = d.transformer.caption_projection(context.tokens)
        expected = _class_maps(_probs(attn, hidden.expand(3, -1, -1), keys, context.mask), prompts.token_index,
                               prompts.token_weight)
    assert (store.cross_maps(2).flatten(1) - expected).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ methods
def test_diffsegmenter_segments_with_pixart_through_default_predictor():
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(_cfg("MODEL.DIFFSEG.VOCABULARY", "['background', 'cat', 'dog']",
                                      "MODEL.DIFFSEG.TRANSFORMER.REFINE_BLOCKS", "['transformer_blocks.1']"))
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)  # not square
    scores = predictor(image)["sem_seg"]
    assert scores.shape == (3, 48, 80) and torch.isfinite(scores).all()
    model = predictor.model
    assert isinstance(model.diffusion, FrozenPixArt)
    assert model.recorded_layers == {"cross_blocks": ("transformer_blocks.0", "transformer_blocks.1"),
                                     "self_blocks": ("transformer_blocks.1",)}
    assert torch.all(scores[0] == 0.4)
    torch.testing.assert_close(scores[1:].amax((1, 2)), torch.ones(2))


def test_diffsegmenter_maps_are_each_class_pass_masked_attention_refined_by_its_own_self_attention():
    """Two chunks (2 + 1 classes): class k's map is the mean over both blocks of its word's masked cross-attention
    probabilities, min-max normalised, times the head-mean self-attention of block 1 in its own pass."""
    from detectron2.modeling import build_model

    model = build_model(_cfg("MODEL.DIFFSEG.TRANSFORMER.REFINE_BLOCKS", "['transformer_blocks.1']",
                             "MODEL.DIFFSEG.CLASS_CHUNK_SIZE", "2", "MODEL.DIFFSEG.TOKEN_SELECTION", "mean")).eval()
    t = model.diffusion.transformer
    layers = ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2", "transformer_blocks.1.attn1"]
    inputs = _Inputs(t, layers)
    try:
        with torch.no_grad():
            maps = model.class_maps(_image(), NAMES, [0, 1, 2])
    finally:
        inputs.remove()
    prompts, context = model._vocabulary_prompts(tuple(NAMES))
    expected = []
    with torch.no_grad():
        for chunk, rows in enumerate([slice(0, 2), slice(2, 3)]):
            cross = sum(_class_maps(_probs(t.get_submodule(n), *inputs.calls[n][chunk], context.mask[rows]),
                                    prompts.token_index[rows], prompts.token_weight[rows]) for n in layers[:2]) / 2
            hidden, _ = inputs.calls[layers[2]][chunk]
            self_attn = _probs(t.get_submodule(layers[2]), hidden, hidden).mean(1)  # (k, N, N)
            expected.append(torch.einsum("knm,km->kn", self_attn, minmax_per_map(cross)))
    assert maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps.flatten(1), torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_pixart_settings_are_checked():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match=r"BLOCKS names \['transformer_blocks.9'\].*cross-attention blocks are "
                                         r"\['transformer_blocks.0', 'transformer_blocks.1'\]"):
        build_model(_cfg("MODEL.DIFFSEG.TRANSFORMER.BLOCKS", "['transformer_blocks.9']"))
    with pytest.raises(ValueError, match=r"PixArt-Σ reads its text through cross-attention.*DIRECTION 'image_to_text'"):
        build_model(_cfg("MODEL.DIFFSEG.TRANSFORMER.DIRECTION", "text_to_image"))
    with pytest.raises(ValueError, match="IMAGE_SIZE = 120 must be a positive multiple of 16"):
        build_model(_cfg("MODEL.DIFFSEG.IMAGE_SIZE", "120"))
    with pytest.raises(ValueError, match=r"ODISE's backbone taps a UNet's decoder blocks.*'tiny-pixart-sigma' is a "
                                         r"diffusion transformer"):
        build_model(get_diffseg_cfg("configs/tiny/odise.yaml", ["MODEL.DIFFSEG.SD.WEIGHTS", PRESET]))


def test_daam_and_the_freeda_builder_run_on_pixart():
    """DAAM: every block's cross-attention of one prompt naming every class, per head, summed over the
    timesteps; the bank builder localises the caption's nouns in its T5 tokens while generating."""
    from detectron2.modeling import build_model

    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    daam = build_model(_cfg("MODEL.META_ARCHITECTURE", "DAAM", "MODEL.DIFFSEG.DAAM.TIMESTEPS", "[700, 300]")).eval()
    with torch.no_grad():
        maps = daam.class_maps(_image(), NAMES, [0, 1, 2])
    assert maps.shape == (3, 8, 8) and torch.isfinite(maps).all() and not torch.allclose(maps[0], maps[1])
    builder = PrototypeBankBuilder.from_config(get_diffseg_cfg("configs/tiny/freeda.yaml", [
        "MODEL.DIFFSEG.SD.WEIGHTS", PRESET, "MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "list",
        "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", "configs/tiny/freeda_nouns.txt", "MODEL.DIFFSEG.FREEDA.BUILD.STEPS", "2",
        "MODEL.DIFFSEG.FREEDA.BUILD.IMAGE_SIZE", "128"])).eval()
    rows = builder.caption_prototypes(0, "a dog on a sofa")
    assert rows.nouns == ["dog", "sofa"] and rows.image.shape == (3, 128, 128)
    assert torch.isfinite(rows.prototypes).all() and rows.masks.shape == (2, 16, 16)
    assert builder.spec(["a dog on a sofa"])["build"]["transformer_blocks"] == ["transformer_blocks.0",
                                                                                 "transformer_blocks.1"]


def test_the_pixart_config_reads_blocks_the_released_size_has():
    """voc21_pixart.yaml's blocks exist in a PixArtTransformer2DModel of diffusers' default (XL) size, built on
    the meta device (its structure, no weights), and its image size is the family's native one."""
    import diffusers

    from diffseg_d2.pretrained.pixart import PIXART_FAMILIES

    d = get_diffseg_cfg("configs/diffsegmenter/voc21_pixart.yaml").MODEL.DIFFSEG
    with torch.device("meta"):
        transformer = diffusers.PixArtTransformer2DModel(sample_size=128, caption_channels=4096)
    blocks = attention_blocks(transformer, "cross")
    assert len(blocks) == 28 and attention_blocks(transformer, "self") == blocks
    assert set(d.TRANSFORMER.BLOCKS) <= set(blocks) and d.TRANSFORMER.REFINE_BLOCKS[0] in blocks
    assert d.IMAGE_SIZE == PIXART_FAMILIES["pixart-sigma"].native_size and d.IMAGE_SIZE % 16 == 0
    assert 0 <= d.NOISE_STEP < 1000


def test_a_latent_the_patches_do_not_tile_is_refused_with_the_image_multiple(pixart):
    channels, multiple = pixart.vae.config.latent_channels, pixart.patch * pixart.latent_factor
    with pytest.raises(ValueError, match=rf"8x5 latent is not tiled .* multiples of {multiple} pixels"):
        pixart.denoise(torch.zeros(1, channels, 8, 5), STEP, pixart.empty_prompt_context())
