"""The diffusion-transformer families on the substrate (SD3 / SD3.5, FLUX.1): loading from saved diffusers
folders, prompt encoding, noising, the transformer call and generation against diffusers' own pipelines on the
same folder, and joint-attention recording during the substrate's transformer call."""
import json
import math
import shutil

import pytest
import torch

from diffseg_d2.diffusion.frozen_transformer import FrozenDiffusionTransformer
from diffseg_d2.diffusion.joint_attention import JointAttentionStore, joint_attention_layers, record_joint_attention
from diffseg_d2.pretrained.diffusion_transformers import (
    family_of_transformer_folder,
    load_diffusion_transformer,
    resolve_transformer_weights,
)
from diffseg_d2.pretrained.stable_diffusion import UnsupportedFamilyError
from diffseg_d2.pretrained.tokens import token_mean_table
from diffseg_d2.pretrained.weights import MissingWeightsError

PROMPTS = ["a photograph of a dog", "a sofa and a cat, in a room"]
PIPELINES = {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}
# A non-square latent (a 96x160 image): the transformers' 2x2 patches tile it as 6x10 tokens.
LATENT = (2, 16, 12, 20)
STEP = 150


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def family(request, _session_cache):
    """(preset name, substrate, the family's diffusers pipeline loaded from the same folder)."""
    import diffusers

    name = request.param
    substrate = FrozenDiffusionTransformer(load_diffusion_transformer(name))
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(resolve_transformer_weights(name).path)
    return name, substrate, pipe


def _latents(seed=0):
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))


def _pipeline_schedule(pipe, u, image_tokens):
    """The pipeline's scheduler set to the unshifted sigma ``u`` as the pipeline sets its schedule
    (FLUX: with the resolution-dependent mu of its own ``calculate_shift``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    kwargs = {}
    if config.use_dynamic_shifting:
        kwargs["mu"] = calculate_shift(image_tokens, config.base_image_seq_len, config.max_image_seq_len,
                                       config.base_shift, config.max_shift)
    pipe.scheduler.set_timesteps(sigmas=[u], **kwargs)
    return pipe.scheduler, kwargs.get("mu")


def _pipeline_prompts(name, pipe, prompts):
    """(tokens, pooled) of the pipeline's encode_prompt."""
    if name == "tiny-sd3":
        tokens, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    else:
        tokens, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
    return tokens, pooled


def test_each_tiny_preset_is_its_family_read_from_its_saved_folder(family):
    name, d, _ = family
    folder = resolve_transformer_weights(name).path
    with open(f"{folder}/model_index.json", encoding="utf-8") as f:
        index = json.load(f)
    expected = {"tiny-sd3": ("sd3", "StableDiffusion3Pipeline"), "tiny-flux": ("flux-dev", "FluxPipeline")}[name]
    assert (d.family.name, index["_class_name"]) == expected
    # The same folder through the path a user's download takes (a local folder, not the preset name).
    assert load_diffusion_transformer(folder).family.name == expected[0]
    # The real block structure: SD3 joint blocks (image first), FLUX double- and single-stream blocks (text first).
    layers = joint_attention_layers(d.transformer)
    if name == "tiny-sd3":
        assert sorted(layers) == ["transformer_blocks.0", "transformer_blocks.1"] and all(layers.values())
    else:
        assert sorted(layers) == ["single_transformer_blocks.0", "single_transformer_blocks.1",
                                  "transformer_blocks.0", "transformer_blocks.1"] and not any(layers.values())
    assert d.text_layout.image_first == (name == "tiny-sd3")


def test_prompts_are_encoded_as_the_familys_pipeline_encodes_them(family):
    """SD3: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's 256 tokens;
    pooled = both projected end-of-text embeddings. FLUX dev: T5's 512 tokens; pooled = CLIP's pooler output."""
    name, d, pipe = family
    ids = d.tokenize(PROMPTS)
    ours = d.encode_text(ids)
    # Without gradients, as the pipeline's __call__ encodes (CPU attention kernels differ in the last bits with them).
    with torch.no_grad():
        tokens, pooled = _pipeline_prompts(name, pipe, PROMPTS)
    if name == "tiny-sd3":
        assert tuple(d.text_layout.segments.items()) == (("clip", slice(0, 77)), ("t5", slice(77, 333)))
        clip_width = sum(e.config.hidden_size for e in d.clip_encoders)
        assert clip_width < tokens.shape[-1] and not ours.tokens[:, :77, clip_width:].any()
    else:
        assert tuple(d.text_layout.segments.items()) == (("t5", slice(0, 512)),)
    assert ours.tokens.shape[1] == d.text_layout.length == tokens.shape[1]
    torch.testing.assert_close(ours.tokens, tokens, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    # A word's tokens are found in every segment of the text sequence that holds them.
    positions = d.word_positions(ids, 0, "dog")
    assert sorted(positions) == sorted(d.text_layout.segments)
    for segment, where in positions.items():
        tokenizer = d.t5_tokenizer if segment == "t5" else d.clip_tokenizers[0]
        assert tokenizer.decode(ids.sequence[0, where]).strip() == "dog"


def test_emphasis_pushes_a_words_states_away_from_the_empty_prompts(family):
    _, d, _ = family
    ids = d.tokenize(PROMPTS[:1])
    plain = d.encode_text(ids)
    emphasis = torch.zeros(ids.sequence.shape, dtype=torch.bool)
    for where in d.word_positions(ids, 0, "dog").values():
        emphasis[0, where] = True
    weighted = d.encode_text(ids, emphasis, 1.21)
    empty = d.empty_prompt_context().tokens
    torch.testing.assert_close(weighted.tokens[emphasis], (empty + 1.21 * (plain.tokens - empty))[emphasis])
    assert torch.equal(weighted.tokens[~emphasis], plain.tokens[~emphasis]) and torch.equal(weighted.pooled, plain.pooled)


def test_images_are_encoded_with_the_familys_shift_and_scaling(family):
    _, d, pipe = family
    images = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean = pipe.vae.encode(images).latent_dist.mean
    expected = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert pipe.vae.config.shift_factor != 0
    torch.testing.assert_close(d.encode_images(images), expected, rtol=0, atol=0)


def test_add_noise_is_the_schedulers_scale_noise_at_the_same_sigma(family):
    """x_t = (1 - sigma) x0 + sigma * noise, sigma the schedule's shifted sigma at u = step / 1000: SD3 by its
    constant shift 3, FLUX dev by the pipeline's resolution-dependent mu."""
    name, d, pipe = family
    latents = _latents()
    n_img = d.image_tokens(latents.shape)
    assert n_img == 6 * 10
    noisy = d.add_noise(latents, STEP, torch.Generator().manual_seed(7))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    scheduler, mu = _pipeline_schedule(pipe, STEP / 1000, n_img)
    theirs = scheduler.scale_noise(latents, scheduler.timesteps[:1].expand(2), noise)
    torch.testing.assert_close(noisy, theirs, rtol=0, atol=0)
    u = STEP / 1000
    sigma = 3 * u / (1 + 2 * u) if name == "tiny-sd3" else math.exp(mu) / (math.exp(mu) + 1 / u - 1)
    assert d.noise_level(STEP, latents.shape)[0].item() == pytest.approx(sigma, rel=1e-6)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise, rtol=1e-5, atol=1e-5)
    # Step 0 is the clean latent; FLUX dev noises a larger image more at the same step, SD3 does not.
    assert torch.equal(d.add_noise(latents, 0, torch.Generator().manual_seed(7)), latents)
    larger = d.noise_level(STEP, (64, 64))[0]
    assert (larger > d.noise_level(STEP, latents.shape)[0]) == (name == "tiny-flux")
    with pytest.raises(ValueError, match=r"must be a timestep in \[0, 999\]"):
        d.add_noise(latents, 1000, torch.Generator())


def test_denoise_is_the_transformer_call_the_pipeline_builds(family):
    """SD3: the latent as it is, timestep sigma * 1000, the joint text sequence and pooled vector. FLUX dev:
    the latent packed 2x2, image and text position ids, timestep / 1000, guidance 3.5; output unpacked."""
    from diffusers import FluxPipeline

    name, d, pipe = family
    latents = _latents(1)
    context = d.encode_text(d.tokenize(PROMPTS))
    B, C, h, w = latents.shape
    scheduler, _ = _pipeline_schedule(pipe, STEP / 1000, d.image_tokens(latents.shape))
    t = scheduler.timesteps[0].expand(B)
    with torch.no_grad():
        if name == "tiny-sd3":
            theirs = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=context.tokens,
                                      pooled_projections=context.pooled, return_dict=False)[0]
        else:
            _, _, txt_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")  # zeros, one row per text token
            packed = FluxPipeline._pack_latents(latents, B, C, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32)
            guidance = torch.full([1], 3.5, dtype=torch.float32).expand(B)
            out = pipe.transformer(hidden_states=packed, timestep=t.to(latents.dtype) / 1000, guidance=guidance,
                                   pooled_projections=context.pooled, encoder_hidden_states=context.tokens,
                                   txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            theirs = FluxPipeline._unpack_latents(out, h * 8, w * 8, pipe.vae_scale_factor)
    ours = d.denoise(latents, STEP, context)
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_joint_attention_is_recorded_during_denoise_without_changing_it(family):
    """Every joint block of the substrate's transformer gives (K, N_img) maps of image-to-text probabilities
    for the class words found through ``text_layout``; the prediction is bit-identical with and without."""
    _, d, _ = family
    latents = _latents(2)[:1]
    ids = d.tokenize(["a photograph of a dog on a sofa"])
    context = d.encode_text(ids)
    # Each word's T5 tokens (both families have them in their text sequence).
    positions = [d.word_positions(ids, 0, word)["t5"] for word in ("dog", "sofa")]
    index, weight = token_mean_table(positions)
    plain = d.denoise(latents, STEP, context)
    layers = list(joint_attention_layers(d.transformer))
    store = JointAttentionStore(index, weight)
    with record_joint_attention(d.transformer, store, layers, d.text_layout.length):
        recorded = d.denoise(latents, STEP, context)
    assert torch.equal(recorded, plain)
    assert sorted(store.counts) == sorted(layers) and set(store.counts.values()) == {1}
    maps = store.maps()
    assert maps.shape == (2, d.image_tokens(latents.shape)) == (2, 60)
    assert torch.isfinite(maps).all() and (maps > 0).all() and (maps < 1).all()


def test_generate_follows_the_familys_pipeline(family):
    """Two Euler steps from the same initial noise: FLUX dev with its guidance input, SD3 with classifier-free
    guidance against the empty prompt. Ours is rounded to [0, 255], the pipeline's in [0, 1]."""
    name, d, pipe = family
    context = d.encode_text(d.tokenize(PROMPTS[:1]))
    ours = d.generate(context, image_size=64, steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
    assert ours.shape == (1, 3, 64, 64)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                  prompt_embeds=context.tokens, pooled_prompt_embeds=context.pooled)
    if name == "tiny-sd3":
        empty = d.unconditional_context()
        kwargs.update(sigmas=[1.0, 0.5], latents=noise, negative_prompt_embeds=empty.tokens,
                      negative_pooled_prompt_embeds=empty.pooled)
    else:
        kwargs.update(latents=pipe._pack_latents(noise, 1, 16, 8, 8))
    theirs = pipe(**kwargs).images * 255
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.51)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_bfloat16_substrate_computes_in_bfloat16_close_to_float32(name, _session_cache):
    full = FrozenDiffusionTransformer(load_diffusion_transformer(name))
    half = FrozenDiffusionTransformer(load_diffusion_transformer(name), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = full.tokenize(PROMPTS[:1])
    latents = _latents(4)[:1]
    ours = half.denoise(latents, STEP, half.encode_text(ids))
    reference = full.denoise(latents, STEP, full.encode_text(ids))
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_flux_schnell_and_other_pipelines_are_told_apart(tmp_path, _session_cache):
    schnell = family_of_transformer_folder({"_class_name": "FluxPipeline"}, {"guidance_embeds": False}, "x")
    assert (schnell.name, schnell.t5_length, schnell.guidance) == ("flux-schnell", 256, None)
    folder = tmp_path / "pixart"
    shutil.copytree(resolve_transformer_weights("tiny-flux").path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(UnsupportedFamilyError, match=r"holds a PixArtAlphaPipeline.*Stable Diffusion XL.*Stable Diffusion 3"
                                                     r".*FLUX\.1 \[dev\].*PixArt-Σ \(PixArtSigmaPipeline\)"):
        load_diffusion_transformer(str(folder))
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(MissingWeightsError, match=r"FLUX\.1 \[dev\] folder .* missing text_encoder_2/config\.json"):
        load_diffusion_transformer(str(folder))


@pytest.mark.parametrize("architecture, transformer_params", [("sd3", 2_028_328_000), ("flux-dev", 11_901_408_320)])
def test_random_presets_are_the_released_transformers_with_text_encoders_of_the_released_widths(
        architecture, transformer_params, _session_cache):
    """Built on the meta device (no memory): the released parameter counts (SD3-medium 2.03 B, FLUX.1-dev
    11.9 B) and the widths the transformer reads from its text encoders."""
    from diffseg_d2.pretrained.diffusion_transformers import (
        RELEASED_TRANSFORMERS, load_diffusion_transformer, names_transformer_family)

    assert names_transformer_family(f"random:{architecture}") and not names_transformer_family("random:sd15")
    with torch.device("meta"):
        parts = load_diffusion_transformer(f"random:{architecture}")
    assert parts.family.name == architecture
    assert sum(p.numel() for p in parts.transformer.parameters()) == transformer_params
    config = parts.transformer.config
    assert {k: config[k] for k in RELEASED_TRANSFORMERS[architecture]} == RELEASED_TRANSFORMERS[architecture]
    assert parts.t5_encoder.config.d_model == config.joint_attention_dim == 4096
    pooled = sum(c.config.projection_dim if architecture == "sd3" else c.config.hidden_size for c in parts.clip_encoders)
    assert pooled == config.pooled_projection_dim
    assert parts.vae.config.latent_channels == 16 and len(parts.vae.config.block_out_channels) == 4


def test_a_latent_the_patches_do_not_tile_is_refused_with_the_image_multiple(family):
    """SD3's 2x2 patches and FLUX's 2x2 packing: a 16 x 13 latent (an image side not a multiple of 16 px) is
    an error naming the sides and the pixel multiple, before the transformer runs."""
    _, substrate, _ = family
    with pytest.raises(ValueError, match=r"16x13 latent is not tiled .* multiples of 16 pixels"):
        substrate.denoise(torch.zeros(1, 16, 16, 13), STEP, substrate.empty_prompt_context())
    assert substrate.image_tokens((16, 12)) == 8 * 6
