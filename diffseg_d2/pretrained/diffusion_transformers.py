"""Diffusion transformers' components (SD3 / SD3.5's MMDiT, FLUX.1): where they come from and how they are loaded.

A **family** is what a diffusers folder's ``model_index.json`` names (``_class_name``), read with its
transformer's config where one pipeline class holds two families:

* Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``): an ``SD3Transformer2DModel`` that cuts the
  latent into 2x2 patches itself; two CLIP text encoders with projections whose penultimate hidden
  states, side by side and zero-padded to T5's width, come before the T5 tokens in the text sequence,
  and whose projected end-of-text embeddings, side by side, are the pooled condition; a 16-channel VAE
  with a scaling and a shift factor; a flow-matching schedule shifted by a constant.
* FLUX.1 dev and schnell (``FluxPipeline``): a ``FluxTransformer2DModel`` that reads latents the pipeline
  packed into 2x2 patches with rotary position ids; the text sequence is T5's alone (512 tokens for dev,
  256 for schnell), the CLIP text encoder gives only the pooled condition; dev is guidance-distilled (the
  guidance scale is an input of the transformer) and shifts its schedule with the image's token count.

What differs between them is data, one ``TransformerFamily`` record each (``TRANSFORMER_FAMILIES``);
``diffseg_d2.diffusion.frozen_transformer.FrozenDiffusionTransformer`` reads it, the methods never do.

``load_diffusion_transformer`` reads the parts from a hub id or a local diffusers folder (safetensors
only), or a tiny preset (``tiny-sd3``, ``tiny-flux``: random weights of a small model of the family's
real block structure, saved as a diffusers folder by diffusers' own pipeline class and read back by the
same code). Random weights segment nothing; their outputs carry no meaning.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..optional_imports import require
from .frozen import load_pretrained, random_init
from .stable_diffusion import (
    SD_WEIGHTS_KEY,
    TINY_SD_PRESETS,
    UnsupportedFamilyError,
    check_family_folder,
    FolderParts,
    pipeline_named_by,
    read_weights_json,
    resolve_pipeline_weights,
    clip_text_encoder,
    random_vae,
    write_clip_tokenizer,
    supported_families,
    supported_pipelines,
)
from .tokens import t5_tokenizer_class
from .weights import MICRO, RANDOM_PREFIX, TINY, MissingWeightsError, WeightsLocation, random_architecture

__all__ = ["DiffusionTransformerParts", "TRANSFORMER_FAMILIES", "TINY_TRANSFORMER_PRESETS", "TransformerFamily",
           "RELEASED_TRANSFORMERS", "MICRO_TRANSFORMER_PRESETS", "family_of_transformer_folder", "load_diffusion_transformer", "names_transformer_family",
           "resolve_transformer_weights"]


@dataclass(frozen=True)
class TransformerFamily:
    """What one family of diffusion-transformer text-to-image models is, as data.

    Args:
        name: the family's short name (``sd3``, ``flux-dev``, ``flux-schnell``).
        title: how messages name it.
        pipeline: the diffusers pipeline class its folders name in ``model_index.json``.
        transformer: the diffusers class of its denoiser (folder ``transformer``).
        clip_encoders: the folders of its CLIP text encoders, in the order their states are joined; the
            tokenizer of ``text_encoder_N`` is ``tokenizer_N``.
        clip_class: the transformers class of those encoders.
        clip_hidden_layer: the CLIP hidden state that is part of the text sequence (-2: the penultimate),
            or None when the sequence holds no CLIP states (FLUX: CLIP gives only the pooled vector).
        pooled_output: the CLIP output that is the pooled condition: ``text_embeds`` (projected end-of-text
            embedding) or ``pooler_output`` (unprojected).
        t5_encoder: the folder of its T5 encoder; its tokenizer's folder is named as for CLIP.
        t5_length: T5 tokens in the text sequence (the pipeline's ``max_sequence_length`` default), at most
            the T5 tokenizer's ``model_max_length`` (see ``text_lengths``).
        image_first: whether the joint attention sequence puts the image tokens before the text tokens.
        packing: latent cells per side that the pipeline packs into one token before the transformer
            (FLUX: 2, with rotary position ids for image and text tokens); 1 when the transformer
            patches the latent itself (SD3).
        timestep_divisor: None when the transformer reads the scheduler's timestep (sigma * 1000) as it is
            (SD3); else the pipeline casts it to the compute dtype and divides it by this (FLUX: 1000).
        guidance: the guidance scale a guidance-distilled transformer reads as an input (FLUX dev: the
            pipeline's default 3.5), or None for a family guided by classifier-free guidance or not at all.
        native_size: the square side the released models were trained at.
    """

    name: str
    title: str
    pipeline: str
    transformer: str
    clip_encoders: Tuple[str, ...]
    clip_class: str
    clip_hidden_layer: Optional[int]
    pooled_output: str
    t5_encoder: str
    t5_length: int
    image_first: bool
    packing: int
    timestep_divisor: Optional[float]
    guidance: Optional[float]
    native_size: int

    @staticmethod
    def tokenizer_of(encoder_folder: str) -> str:
        """The tokenizer folder of a text encoder folder (``text_encoder_2`` -> ``tokenizer_2``)."""
        return encoder_folder.replace("text_encoder", "tokenizer")

    def text_lengths(self, clip_tokenizers, t5_tokenizer) -> Tuple[int, int]:
        """(CLIP, T5) tokens of the text sequence for these tokenizers: the first CLIP tokenizer's
        ``model_max_length`` (0 when no CLIP states are in the sequence), and ``t5_length`` capped at the T5
        tokenizer's ``model_max_length``. The released models' tokenizers take 512 T5 tokens, so their
        sequences are the pipelines' defaults; the micro-world model's tokenizers are shorter."""
        clip = int(clip_tokenizers[0].model_max_length) if self.clip_hidden_layer is not None else 0
        return clip, min(self.t5_length, int(t5_tokenizer.model_max_length))

    @property
    def required_files(self) -> Tuple[str, ...]:
        """What a local folder of this family must hold for the loader (weights as safetensors only)."""
        encoders = self.clip_encoders + (self.t5_encoder,)
        return (("transformer/config.json", "transformer/*.safetensors", "vae/config.json", "vae/*.safetensors")
                + tuple(f for e in encoders for f in (f"{e}/config.json", f"{e}/*.safetensors"))
                + tuple(f"{self.tokenizer_of(e)}/tokenizer_config.json" for e in encoders)
                + ("scheduler/scheduler_config.json",))


TRANSFORMER_FAMILIES: Dict[str, TransformerFamily] = {
    f.name: f for f in (
        TransformerFamily("sd3", "Stable Diffusion 3 / 3.5", "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                          ("text_encoder", "text_encoder_2"), "CLIPTextModelWithProjection", -2, "text_embeds",
                          "text_encoder_3", 256, True, 1, None, None, 1024),
        TransformerFamily("flux-dev", "FLUX.1 [dev]", "FluxPipeline", "FluxTransformer2DModel",
                          ("text_encoder",), "CLIPTextModel", None, "pooler_output",
                          "text_encoder_2", 512, False, 2, 1000.0, 3.5, 1024),
        TransformerFamily("flux-schnell", "FLUX.1 [schnell]", "FluxPipeline", "FluxTransformer2DModel",
                          ("text_encoder",), "CLIPTextModel", None, "pooler_output",
                          "text_encoder_2", 256, False, 2, 1000.0, None, 1024),
    )
}


def family_of_transformer_folder(model_index: Optional[dict], transformer_config: Optional[dict],
                                 where: str) -> TransformerFamily:
    """The family of a diffusers folder from its ``model_index.json`` and its transformer's config
    (FLUX dev has a guidance embedding, schnell none).

    Raises:
        UnsupportedFamilyError: the folder holds another pipeline (the message names every supported family).
    """
    pipeline = (model_index or {}).get("_class_name")
    if pipeline == "StableDiffusion3Pipeline":
        return TRANSFORMER_FAMILIES["sd3"]
    if pipeline == "FluxPipeline":
        guided = bool((transformer_config or {}).get("guidance_embeds", False))
        return TRANSFORMER_FAMILIES["flux-dev" if guided else "flux-schnell"]
    raise UnsupportedFamilyError(
        f"{where} holds a {pipeline or 'folder without a model_index.json'}; {SD_WEIGHTS_KEY} must name a model of "
        f"a supported family: {supported_families()}."
    )


@dataclass
class DiffusionTransformerParts:
    """The loaded components of one diffusion transformer (float32 unless asked otherwise, CPU).

    ``clip_encoders`` / ``clip_tokenizers`` follow ``family.clip_encoders``; ``t5_encoder`` /
    ``t5_tokenizer`` are the family's T5 (``T5EncoderModel``, a fast T5 tokenizer).
    """

    transformer: Any
    vae: Any
    scheduler: Any
    clip_encoders: Tuple[Any, ...]
    clip_tokenizers: Tuple[Any, ...]
    t5_encoder: Any
    t5_tokenizer: Any
    family: TransformerFamily


# ----------------------------------------------------------------------------------------------- tiny presets
# Sentences the tiny T5 tokenizer's unigram vocabulary is trained on: the words of the tests' and tiny
# configs' prompts, so that they tokenise to a few pieces each.
_T5_CORPUS = (
    "a photograph of a dog", "a photo of a cat on a sofa in a room", "a person riding a horse on the grass",
    "an aeroplane and a bird above the sea", "a bus, a car, a train and a bicycle on the road",
    "a table with a bottle, a chair and a potted plant", "a boat, a sheep and a cow near the trees",
    "a motorbike next to a tv monitor", "the sky, a building, a wall and the floor", "background",
)
_TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128,
                 latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
# T5 v1.1's shape in small (gated GELU); 80 wide, more than the 64 of SD3's two CLIP states side by side,
# so that SD3's zero padding of the CLIP states is exercised.
_TINY_T5 = dict(d_model=80, d_kv=8, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
#: The released transformers' shapes (their diffusers configs): what the configs' block names must exist in,
#: and what tools/benchmark.py's ``sd3`` / ``flux`` presets build with random weights.
RELEASED_TRANSFORMERS = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 joint blocks of 24 heads x 64.
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
    # black-forest-labs/FLUX.1-dev: 19 double- and 38 single-stream blocks of 24 heads x 128.
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
}


_FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096)
# The released SD3 / FLUX VAE (16 latent channels, four levels of two layers).
_RELEASED_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, latent_channels=16,
                     use_quant_conv=False, use_post_quant_conv=False)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12, projection_dim=768)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=1, num_attention_heads=20, projection_dim=1280)
_T5_XXL_ONE_LAYER = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                         is_encoder_decoder=False)
TRANSFORMER_ARCHITECTURES = {
    # SD3's MMDiT in small: two joint blocks, 2 heads of 8, 2x2 patches of a 16-channel latent.
    "tiny-sd3": {
        "family": "sd3",
        "transformer": dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=_TINY_T5["d_model"],
                            caption_projection_dim=16, pooled_projection_dim=2 * _TINY_CLIP["projection_dim"],
                            pos_embed_max_size=32),
        "vae": dict(_TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    },
    # FLUX.1 dev in small: 2 double- and 2 single-stream blocks, 2 heads of 8 (rotary axes 2+2+4), a
    # guidance embedding, the resolution-dependent schedule shift.
    "tiny-flux": {
        "family": "flux-dev",
        "transformer": dict(patch_size=1, in_channels=4 * _TINY_VAE["latent_channels"], num_layers=2,
                            num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                            joint_attention_dim=_TINY_T5["d_model"], pooled_projection_dim=_TINY_CLIP["hidden_size"],
                            guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        "vae": dict(_TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        "scheduler": _FLUX_SCHEDULER,
    },
    # random:sd3 / random:flux-dev: the released transformers and VAEs (their diffusers configs) with random
    # weights, for speed and memory measurements. Their text encoders have the released OUTPUT widths
    # (CLIP-L 768, CLIP-G 1280, T5-XXL 4096) but one layer each (T5-XXL alone is 4.7 B parameters): text is
    # encoded once per vocabulary, so an image's cost is the transformer's and the VAE's.
    "sd3": {
        "family": "sd3",
        "transformer": RELEASED_TRANSFORMERS["sd3"],
        "vae": dict(_RELEASED_VAE, scaling_factor=1.5305, shift_factor=0.0609),
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
        "clip": [_CLIP_L, _CLIP_G],
        "t5": _T5_XXL_ONE_LAYER,
    },
    "flux-dev": {
        "family": "flux-dev",
        "transformer": RELEASED_TRANSFORMERS["flux-dev"],
        "vae": dict(_RELEASED_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        "scheduler": _FLUX_SCHEDULER,
        "clip": [{k: v for k, v in _CLIP_L.items() if k != "projection_dim"}],
        "t5": _T5_XXL_ONE_LAYER,
    },
}
#: The architectures of ``random:<architecture>`` weights.
RANDOM_TRANSFORMERS = ("sd3", "flux-dev")


def _t5_tokenizer(transformers):
    """A T5 tokenizer (unigram pieces, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended) whose vocabulary is
    trained here on ``_T5_CORPUS`` with the ``tokenizers`` library: T5's own needs a download."""
    tokenizers = require("tokenizers", "tokenizers", "The tiny diffusion-transformer presets")
    trainer = tokenizers.trainers.UnigramTrainer(vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"],
                                                 unk_token="<unk>", show_progress=False)
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
    # T5's pre-tokenisation: split on whitespace, "▁" before every word.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.WhitespaceSplit(),
        tokenizers.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    tok.train_from_iterator(_T5_CORPUS, trainer)
    pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    return _t5_from_pieces(transformers, pieces, model_max_length=512)


def _t5_from_pieces(transformers, pieces, model_max_length: int):
    """A T5 tokenizer over unigram ``pieces`` ((piece, log-probability), ``<pad>`` ``</s>`` ``<unk>`` first): the
    fast class builds T5's normaliser-free pipeline around them; no sentinel tokens."""
    return t5_tokenizer_class(transformers)(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def t5_word_tokenizer(transformers, words, model_max_length: int):
    """A T5 tokenizer (as ``_t5_tokenizer``) whose unigram vocabulary is given: one piece per word of ``words``
    (log-probability -1) and one per character of them (-10), so a known word is one token and anything
    else is spelt out. For the micro-world model, whose words are few and known."""
    words = sorted(set(words))
    chars = sorted({c for w in words for c in w} | {",", "."})
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -10.0)] + [(f"\u2581{w}", -1.0) for w in words]
              + [(c, -10.0) for c in chars])
    return _t5_from_pieces(transformers, pieces, model_max_length)


def random_diffusion_transformer(architecture: str, clip_tokenizers, t5_tokenizer) -> DiffusionTransformerParts:
    """Transformer, VAE, text encoders and flow-matching scheduler of ``architecture`` (a key of
    ``TRANSFORMER_ARCHITECTURES``) with random weights, sized for the given tokenizers (float32, CPU)."""
    diffusers = require("diffusers", "diffusers", "Random diffusion transformers")
    transformers = require("transformers", "transformers", "Random diffusion transformers")
    sizes = TRANSFORMER_ARCHITECTURES[architecture]
    family = TRANSFORMER_FAMILIES[sizes["family"]]
    projected = family.clip_class == "CLIPTextModelWithProjection"
    tiny_clip = dict(_TINY_CLIP) if projected else {k: v for k, v in _TINY_CLIP.items() if k != "projection_dim"}
    clips = sizes.get("clip", [tiny_clip] * len(clip_tokenizers))
    with random_init():
        transformer = getattr(diffusers, family.transformer)(**sizes["transformer"])
        vae = random_vae(diffusers, sizes["vae"])
        clip_encoders = tuple(clip_text_encoder(transformers, t, c, with_projection=projected)
                              for t, c in zip(clip_tokenizers, clips))
        t5_config = transformers.T5Config(vocab_size=len(t5_tokenizer), pad_token_id=t5_tokenizer.pad_token_id,
                                          eos_token_id=t5_tokenizer.eos_token_id, **sizes.get("t5", _TINY_T5))
        t5_encoder = transformers.T5EncoderModel(t5_config)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**sizes["scheduler"])
    return DiffusionTransformerParts(transformer, vae, scheduler, clip_encoders, tuple(clip_tokenizers),
                                     t5_encoder, t5_tokenizer, family)


def build_tiny_diffusion_transformer(folder: Path, architecture: str) -> None:
    """Save a tiny diffusers folder of ``architecture``'s family into ``folder`` through diffusers' own
    pipeline class of that family (``StableDiffusion3Pipeline`` / ``FluxPipeline``)."""
    diffusers = require("diffusers", "diffusers", "The tiny diffusion-transformer presets")
    transformers = require("transformers", "transformers", "The tiny diffusion-transformer presets")
    family = TRANSFORMER_FAMILIES[TRANSFORMER_ARCHITECTURES[architecture]["family"]]
    # SD3's second CLIP tokenizer pads with "!" (OpenCLIP's convention), the first with end-of-text.
    clip_tokenizers = [write_clip_tokenizer(transformers, folder / family.tokenizer_of(e), pad_token="!" if i else None)
                       for i, e in enumerate(family.clip_encoders)]
    parts = random_diffusion_transformer(architecture, clip_tokenizers, _t5_tokenizer(transformers))
    components = dict(transformer=parts.transformer, vae=parts.vae, scheduler=parts.scheduler)
    for encoder, tokenizer, name in zip(parts.clip_encoders + (parts.t5_encoder,),
                                        parts.clip_tokenizers + (parts.t5_tokenizer,),
                                        family.clip_encoders + (family.t5_encoder,)):
        components[name] = encoder
        components[family.tokenizer_of(name)] = tokenizer
    pipe = getattr(diffusers, family.pipeline)(**components)
    pipe.save_pretrained(str(folder), safe_serialization=True)


# The tiny presets of MODEL.DIFFSEG.SD.WEIGHTS for diffusion transformers: name -> (cache folder, architecture).
TINY_TRANSFORMER_PRESETS = {
    "tiny-sd3": ("tiny-stable-diffusion-3-v1", "tiny-sd3"),
    "tiny-flux": ("tiny-flux-1-dev-v1", "tiny-flux"),
}


# The micro-world diffusion transformers (diffseg_d2/microworld/train_transformer.py), shipped with the package:
# name -> (folder under diffseg_d2/microworld/weights/, the trainer's options that made it).
MICRO_TRANSFORMER_PRESETS = {
    "micro-sd3": ("diffusion_sd3", ""),
    "micro-sd3-plain": ("diffusion_sd3_plain", " --align-weight 0"),  # without the attention-alignment loss
}


def resolve_transformer_weights(weights: str) -> WeightsLocation:
    """Where ``MODEL.DIFFSEG.SD.WEIGHTS`` points for a diffusion transformer (a hub id, a local folder, a
    micro-world preset, or a tiny preset, built into the cache on first use)."""
    weights = (weights or "").strip()
    if weights in MICRO_TRANSFORMER_PRESETS:
        name, options = MICRO_TRANSFORMER_PRESETS[weights]
        folder = Path(__file__).resolve().parent.parent / "microworld" / "weights" / name
        if not folder.is_dir():
            raise MissingWeightsError(
                f"{SD_WEIGHTS_KEY} = '{weights}': the micro-world weights are not in {folder}. They ship with the "
                f"repository; to rebuild them run `python tools/train_microworld.py --threads 1 transformer "
                f"--output {folder}{options}`.")
        weights = str(folder)
    return resolve_pipeline_weights(weights, TINY_TRANSFORMER_PRESETS, build_tiny_diffusion_transformer)


def names_transformer_family(weights: str, revision: Optional[str] = None) -> bool:
    """Whether ``MODEL.DIFFSEG.SD.WEIGHTS`` names a diffusion transformer: a tiny transformer preset, or a
    folder / hub id whose ``model_index.json`` names a transformer family's pipeline. The UNet presets and
    unreadable weights are left to the UNet loader (its errors say what is missing).

    Raises:
        UnsupportedFamilyError: the ``model_index.json`` names a pipeline of no supported family (the message
            names every supported family, UNet and transformer).
    """
    weights = (weights or "").strip()
    if weights in TINY_TRANSFORMER_PRESETS or weights in MICRO_TRANSFORMER_PRESETS:
        return True
    if weights.startswith(RANDOM_PREFIX):
        return weights[len(RANDOM_PREFIX):] in RANDOM_TRANSFORMERS
    if not weights or weights in (TINY, MICRO, *TINY_SD_PRESETS):
        return False
    pipeline, where = pipeline_named_by(weights, revision)
    if pipeline in {f.pipeline for f in TRANSFORMER_FAMILIES.values()}:
        return True
    if pipeline is not None and pipeline not in supported_pipelines():
        raise UnsupportedFamilyError(
            f"{SD_WEIGHTS_KEY} = '{where}' holds a {pipeline}; it must name a model of a supported family: "
            f"{supported_families()}.")
    return False


def load_diffusion_transformer(weights: str, revision: Optional[str] = None,
                               dtype=None) -> DiffusionTransformerParts:
    """Load transformer, VAE, CLIP and T5 text encoders, tokenizers and the flow-matching scheduler of the
    family the weights name (see the module docstring).

    Args:
        weights: hub id, local diffusers folder, a tiny preset (``"tiny-sd3"``, ``"tiny-flux"``), a micro-world
            preset (``"micro-sd3"``, ``"micro-sd3-plain"``) or ``"random:sd3"`` / ``"random:flux-dev"`` (the released
            transformer and VAE with random weights, one-layer text encoders of the released widths:
            ``TRANSFORMER_ARCHITECTURES``; they segment nothing).
        revision: hub revision; ignored for local folders.
        dtype: torch dtype the weights are loaded in (None: float32). Real FLUX / SD3 weights are several
            GB per part: loading them in bfloat16 halves the memory a float32 load needs on the way.

    Raises:
        UnsupportedFamilyError: the folder holds a model of another family (the message names the supported ones).
        MissingWeightsError: a missing or incomplete folder, or an unreachable hub id.
    """
    diffusers = require("diffusers", "diffusers", "Loading a diffusion transformer")
    transformers = require("transformers", "transformers", "Loading a diffusion transformer")
    architecture = random_architecture(weights, config_key=SD_WEIGHTS_KEY, choices=RANDOM_TRANSFORMERS)
    if architecture is not None:
        # The family's tokenizers (the real CLIP BPE vocabulary), from its tiny preset's folder.
        family = TRANSFORMER_FAMILIES[TRANSFORMER_ARCHITECTURES[architecture]["family"]]
        with torch.device("cpu"):  # the tiny folder is built with real tensors, also for a build on the meta device
            folder = resolve_transformer_weights("tiny-sd3" if family.name == "sd3" else "tiny-flux").path
        clip_tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder, subfolder=family.tokenizer_of(e))
                           for e in family.clip_encoders]
        t5_tokenizer = t5_tokenizer_class(transformers).from_pretrained(folder, subfolder=family.tokenizer_of(family.t5_encoder))
        parts = random_diffusion_transformer(architecture, clip_tokenizers, t5_tokenizer)
        if dtype is not None:
            for module in (parts.transformer, parts.vae, *parts.clip_encoders, parts.t5_encoder):
                module.to(dtype)
        return parts
    location = resolve_transformer_weights(weights)
    kwargs = {} if location.is_local or not revision else {"revision": revision}

    def load() -> DiffusionTransformerParts:
        family = family_of_transformer_folder(read_weights_json(location, "model_index.json", kwargs),
                                              read_weights_json(location, "transformer/config.json", kwargs),
                                              f"{SD_WEIGHTS_KEY} = '{location.path}'")
        check_family_folder(location, family)

        part = FolderParts(location, kwargs, dtype)
        clip_cls = getattr(transformers, family.clip_class)
        return DiffusionTransformerParts(
            transformer=part.weights(getattr(diffusers, family.transformer), "transformer"),
            vae=part.weights(diffusers.AutoencoderKL, "vae"),
            scheduler=part.files(diffusers.FlowMatchEulerDiscreteScheduler, "scheduler"),
            clip_encoders=tuple(part.weights(clip_cls, e) for e in family.clip_encoders),
            clip_tokenizers=tuple(part.files(transformers.CLIPTokenizer, family.tokenizer_of(e)) for e in family.clip_encoders),
            t5_encoder=part.weights(transformers.T5EncoderModel, family.t5_encoder),
            t5_tokenizer=part.files(t5_tokenizer_class(transformers), family.tokenizer_of(family.t5_encoder)),
            family=family,
        )

    return load_pretrained(location, "diffusion transformer components", load)
