"""PixArt-Σ's components: where they come from and how they are loaded.

A diffusers folder whose ``model_index.json`` names ``PixArtSigmaPipeline`` holds a
``PixArtTransformer2DModel``: a DiT whose blocks are diffusers' ``BasicTransformerBlock`` (self-attention
``attn1`` over the image tokens, then CROSS-attention ``attn2`` from the image tokens to the text), 2x2
patches of an SD-style 4-channel latent, a timestep read through adaptive layer norm, and an output of
twice the latent's channels (the noise, then the learned variance: the pipeline keeps the first half).
The text is T5's last hidden state (``T5EncoderModel``), 300 tokens by the pipeline's default
``max_sequence_length``, computed under the tokenizer's attention mask; the same mask is passed to the
transformer as ``encoder_attention_mask``, which turns it into a bias of -10000 on the padding keys of
every cross-attention softmax. There is no pooled text embedding. The noise schedule is a discrete
(DDPM-type) one: the loader reads its betas and prediction type from the folder's scheduler config into
a DDIM scheduler, as the UNet loader does.

What the family is, is data (``PixArtFamily``, ``PIXART_FAMILIES``); ``diffseg_d2.diffusion.frozen_pixart``
reads it, the methods never do. ``load_pixart`` reads the parts from a hub id or a local diffusers folder
(safetensors only) or the ``tiny-pixart-sigma`` preset: random weights of a small model of the real block
structure, saved as a diffusers folder by diffusers' own ``PixArtSigmaPipeline`` and read back by the same
code. Random weights segment nothing; their outputs carry no meaning.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..optional_imports import require
from .frozen import load_pretrained, random_init
from .stable_diffusion import (
    SD_WEIGHTS_KEY,
    UnsupportedFamilyError,
    FolderParts,
    check_family_folder,
    pipeline_named_by,
    random_vae,
    read_weights_json,
    resolve_pipeline_weights,
    supported_families,
)
from .tokens import t5_tokenizer_class
from .weights import WeightsLocation

__all__ = ["PIXART_FAMILIES", "PixArtFamily", "PixArtParts", "TINY_PIXART_PRESETS", "family_of_pixart_folder",
           "load_pixart", "names_pixart_family"]


@dataclass(frozen=True)
class PixArtFamily:
    """What one family of cross-attention diffusion transformers with a T5 text encoder is, as data.

    Args:
        name: the family's short name (``pixart-sigma``).
        title: how messages name it.
        pipeline: the diffusers pipeline class its folders name in ``model_index.json``.
        transformer: the diffusers class of its denoiser (folder ``transformer``).
        text_length: T5 tokens the transformer reads (the pipeline's ``max_sequence_length`` default).
        native_size: the square side the released 1024 model was trained at (the configs' IMAGE_SIZE).
    """

    name: str
    title: str
    pipeline: str
    transformer: str
    text_length: int
    native_size: int

    @property
    def required_files(self) -> Tuple[str, ...]:
        """What a local folder of this family must hold for the loader (weights as safetensors only)."""
        return ("transformer/config.json", "transformer/*.safetensors", "vae/config.json", "vae/*.safetensors",
                "text_encoder/config.json", "text_encoder/*.safetensors", "tokenizer/tokenizer_config.json",
                "scheduler/scheduler_config.json")


PIXART_FAMILIES: Dict[str, PixArtFamily] = {
    f.name: f for f in (
        PixArtFamily("pixart-sigma", "PixArt-Σ", "PixArtSigmaPipeline", "PixArtTransformer2DModel", 300, 1024),
    )
}


@dataclass
class PixArtParts:
    """The loaded components (float32 unless asked otherwise, CPU): ``text_encoder`` a ``T5EncoderModel``,
    ``tokenizer`` a fast T5 tokenizer, ``scheduler`` a DDIM scheduler of the family's noise schedule."""

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    family: PixArtFamily


def family_of_pixart_folder(model_index: Optional[dict], where: str) -> PixArtFamily:
    """The family of a diffusers folder from its ``model_index.json``.

    Raises:
        UnsupportedFamilyError: the folder holds another pipeline (the message names every supported family).
    """
    pipeline = (model_index or {}).get("_class_name")
    for family in PIXART_FAMILIES.values():
        if family.pipeline == pipeline:
            return family
    raise UnsupportedFamilyError(f"{where} holds a {pipeline or 'folder without a model_index.json'}; "
                                 f"{SD_WEIGHTS_KEY} must name a model of a supported family: {supported_families()}.")


# ----------------------------------------------------------------------------------------------- tiny preset
# PixArt-Σ in small: 2 blocks of 2 heads x 8, 2x2 patches of a 4-channel latent, the learned variance (8
# output channels), T5's caption projection, no size conditions (the Σ pipeline passes none); the VAE and
# the T5 encoder of the tiny transformer presets (T5 v1.1's shape in small).
_TINY_PIXART_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128)
PIXART_ARCHITECTURES = {
    "tiny-pixart-sigma": {
        "family": "pixart-sigma",
        "transformer": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                            num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                            norm_type="ada_norm_single", use_additional_conditions=False),
        "vae": _TINY_PIXART_VAE,
        # DDPM's linear betas over 1000 steps, epsilon prediction.
        "scheduler": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          prediction_type="epsilon"),
    },
}

# The tiny presets of MODEL.DIFFSEG.SD.WEIGHTS for PixArt: name -> (cache folder, architecture).
TINY_PIXART_PRESETS = {"tiny-pixart-sigma": ("tiny-pixart-sigma-v1", "tiny-pixart-sigma")}


def build_tiny_pixart(folder: Path, architecture: str) -> None:
    """Save a tiny diffusers folder of ``architecture`` into ``folder`` through ``PixArtSigmaPipeline``."""
    diffusers = require("diffusers", "diffusers", "The tiny PixArt preset")
    transformers = require("transformers", "transformers", "The tiny PixArt preset")
    # The T5 tokenizer and encoder sizes of the tiny diffusion-transformer presets (one home for both).
    from .diffusion_transformers import _TINY_T5, _t5_tokenizer

    sizes = PIXART_ARCHITECTURES[architecture]
    family = PIXART_FAMILIES[sizes["family"]]
    tokenizer = _t5_tokenizer(transformers)
    with random_init():
        transformer = getattr(diffusers, family.transformer)(caption_channels=_TINY_T5["d_model"], **sizes["transformer"])
        vae = random_vae(diffusers, sizes["vae"])
        config = transformers.T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, **_TINY_T5)
        text_encoder = transformers.T5EncoderModel(config)
    # The Σ pipeline's released folders name a multistep solver; any discrete scheduler of the same betas serves.
    scheduler = diffusers.DDPMScheduler(**sizes["scheduler"])
    pipe = getattr(diffusers, family.pipeline)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                               transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def resolve_pixart_weights(weights: str) -> WeightsLocation:
    """Where ``MODEL.DIFFSEG.SD.WEIGHTS`` points for PixArt (a hub id, a local folder or the tiny preset,
    built into the cache on first use)."""
    return resolve_pipeline_weights(weights, TINY_PIXART_PRESETS, build_tiny_pixart)


def names_pixart_family(weights: str, revision: Optional[str] = None) -> bool:
    """Whether ``MODEL.DIFFSEG.SD.WEIGHTS`` names a PixArt model: the tiny preset, or a folder / hub id whose
    ``model_index.json`` names a PixArt pipeline. Anything else (unreadable weights included) is left to the
    other families' loaders, whose errors say what is missing."""
    weights = (weights or "").strip()
    if weights in TINY_PIXART_PRESETS:
        return True
    return pipeline_named_by(weights, revision)[0] in {f.pipeline for f in PIXART_FAMILIES.values()}


def load_pixart(weights: str, revision: Optional[str] = None, dtype=None) -> PixArtParts:
    """Load transformer, VAE, T5 encoder and tokenizer, and the noise schedule of a PixArt model.

    Args:
        weights: hub id, local diffusers folder, or ``"tiny-pixart-sigma"``.
        revision: hub revision; ignored for local folders.
        dtype: torch dtype the weights are loaded in (None: float32).

    Raises:
        UnsupportedFamilyError: the folder holds a model of another family.
        MissingWeightsError: a missing or incomplete folder, or an unreachable hub id.
    """
    diffusers = require("diffusers", "diffusers", "Loading PixArt")
    transformers = require("transformers", "transformers", "Loading PixArt")
    location = resolve_pixart_weights(weights)
    kwargs = {} if location.is_local or not revision else {"revision": revision}

    def load() -> PixArtParts:
        family = family_of_pixart_folder(read_weights_json(location, "model_index.json", kwargs),
                                         f"{SD_WEIGHTS_KEY} = '{location.path}'")
        check_family_folder(location, family)

        part = FolderParts(location, kwargs, dtype)
        return PixArtParts(
            transformer=part.weights(getattr(diffusers, family.transformer), "transformer"),
            vae=part.weights(diffusers.AutoencoderKL, "vae"),
            text_encoder=part.weights(transformers.T5EncoderModel, "text_encoder"),
            tokenizer=part.files(t5_tokenizer_class(transformers), "tokenizer"),
            # The noise schedule (betas, prediction type) is what matters; DDIM reads the same keys.
            scheduler=part.files(diffusers.DDIMScheduler, "scheduler"),
            family=family,
        )

    return load_pretrained(location, "PixArt components", load)
