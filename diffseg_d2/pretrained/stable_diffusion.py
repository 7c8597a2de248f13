"""Stable Diffusion's five components: where they come from and how they are loaded.

``load_stable_diffusion`` reads UNet, VAE, text encoder, tokenizer and scheduler
from a hub id, a local diffusers folder (safetensors only, through
``from_pretrained``), the ``tiny`` preset (random weights of a small SD-1.x-shaped
model, saved as a diffusers folder and read back by the same code), the ``micro``
preset (the micro-world model trained by the project), or ``random:<architecture>``
(random weights of a real architecture built in memory, for benchmarks).
``diffseg_d2.diffusion.FrozenStableDiffusion`` wraps the parts for the methods.

Random weights segment nothing; their outputs carry no meaning.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..optional_imports import require
from .frozen import RANDOM_SEED, load_pretrained, random_init
from .tokens import write_clip_tokenizer_files
from .weights import TINY, WeightsLocation, random_architecture, resolve_weights

SD_WEIGHTS_KEY = "MODEL.DIFFSEG.SD.WEIGHTS"
# What a local SD folder must hold for the loader below (weights as safetensors only).
SD_REQUIRED_FILES = (
    "unet/config.json",
    "unet/*.safetensors",
    "vae/config.json",
    "vae/*.safetensors",
    "text_encoder/config.json",
    "text_encoder/*.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
TINY_SD_FOLDER = "tiny-stable-diffusion-v1"
# The square side the tiny SD preset works at: its VAE downsamples by 8 to a 16x16 latent.
TINY_SD_IMAGE_SIZE = 128


@dataclass
class StableDiffusionParts:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


# UNet, VAE and text-encoder sizes of each architecture built here.
SD_ARCHITECTURES = {
    # 3 UNet levels (latent factors 1, 2, 4) with cross-attention at factors 1, 2 and in the
    # mid block (4); a VAE downsampling by 8; a 2-layer 32-wide CLIP text transformer.
    "tiny": {
        "unet": dict(
            sample_size=TINY_SD_IMAGE_SIZE // 8, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        ),
        "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                    sample_size=TINY_SD_IMAGE_SIZE),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    },
    # The micro-world model (diffseg_d2.microworld), trained by the project on CPU: 64x64 images,
    # a VAE downsampling by 4 to a 16x16 latent, cross-attention at 16x16 (factor 1) and 8x8
    # (factor 2, and the mid block), a 2-layer 64-wide text encoder trained with it.
    "micro": {
        "unet": dict(
            sample_size=16, layers_per_block=1, block_out_channels=(64, 96),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
        ),
        "vae": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    },
    # Stable Diffusion 1.5: UNet 860M, VAE 84M, text encoder 123M parameters, 512x512.
    "sd15": {
        "unet": dict(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    },
}


def random_stable_diffusion(architecture: str, tokenizer, seed: int = RANDOM_SEED):
    """UNet, VAE, text encoder and SD 1.x's DDIM noise schedule with random weights.

    Args:
        architecture: a key of ``SD_ARCHITECTURES`` ("tiny", "micro" or "sd15").
        tokenizer: the CLIP tokenizer the text encoder is sized for.

    Returns:
        ``StableDiffusionParts`` (float32, CPU).
    """
    diffusers = require("diffusers", "diffusers", "Random Stable Diffusion models")
    transformers = require("transformers", "transformers", "Random Stable Diffusion models")
    sizes = SD_ARCHITECTURES[architecture]
    with random_init(seed):
        unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["unet"])
        n_vae = len(sizes["vae"]["block_out_channels"])
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
            **sizes["vae"],
        )
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes["text"],
            )
        )
    # SD 1.x's training noise schedule.
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler)


def build_tiny_stable_diffusion(folder: Path) -> None:
    """Save the tiny SD-1.x-shaped diffusers pipeline folder (about 18 MB) into ``folder``."""
    diffusers = require("diffusers", "diffusers", "The tiny Stable Diffusion preset")
    transformers = require("transformers", "transformers", "The tiny Stable Diffusion preset")
    # Written as SD 1.5's tokenizer folder is (vocab.json, merges.txt, tokenizer_config.json)
    # and read back through from_pretrained.
    tok_dir = folder / "tokenizer"
    write_clip_tokenizer_files(tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    parts = random_stable_diffusion("tiny", tokenizer)
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def resolve_sd_weights(weights: str) -> WeightsLocation:
    """Where ``MODEL.DIFFSEG.SD.WEIGHTS`` points (a hub id, a local folder, or the tiny or micro preset)."""
    return resolve_weights(
        weights,
        config_key=SD_WEIGHTS_KEY,
        required_files=SD_REQUIRED_FILES,
        tiny=(TINY_SD_FOLDER, build_tiny_stable_diffusion),
        micro="diffusion",
    )


def load_stable_diffusion(weights: str, revision: Optional[str] = None) -> StableDiffusionParts:
    """Load UNet, VAE, text encoder, tokenizer and a DDIM scheduler (float32, CPU).

    Args:
        weights: hub id, local diffusers folder, ``"tiny"``, ``"micro"``, or ``"random:<architecture>"``
            (random weights of a ``SD_ARCHITECTURES`` entry, built in memory: for speed and memory
            measurements, they segment nothing). See ``MODEL.DIFFSEG.SD.WEIGHTS``.
        revision: hub revision; ignored for local folders.
    """
    diffusers = require("diffusers", "diffusers", "Loading Stable Diffusion")
    transformers = require("transformers", "transformers", "Loading Stable Diffusion")
    architecture = random_architecture(weights, config_key=SD_WEIGHTS_KEY, choices=SD_ARCHITECTURES)
    if architecture is not None:
        # The real CLIP BPE vocabulary, from the tiny preset's folder.
        tokenizer_folder = resolve_sd_weights(TINY).path
        return random_stable_diffusion(
            architecture, transformers.CLIPTokenizer.from_pretrained(tokenizer_folder, subfolder="tokenizer"))
    location = resolve_sd_weights(weights)
    kwargs = {} if location.is_local or not revision else {"revision": revision}

    def load() -> StableDiffusionParts:
        return StableDiffusionParts(
            unet=diffusers.UNet2DConditionModel.from_pretrained(
                location.path, subfolder="unet", use_safetensors=True, **kwargs
            ),
            vae=diffusers.AutoencoderKL.from_pretrained(
                location.path, subfolder="vae", use_safetensors=True, **kwargs
            ),
            text_encoder=transformers.CLIPTextModel.from_pretrained(
                location.path, subfolder="text_encoder", use_safetensors=True, **kwargs
            ),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(location.path, subfolder="tokenizer", **kwargs),
            # SD 1.5 ships a PNDM scheduler config; the noise schedule (betas) is what matters
            # here and DDIM reads the same keys.
            scheduler=diffusers.DDIMScheduler.from_pretrained(location.path, subfolder="scheduler", **kwargs),
        )

    return load_pretrained(location, "Stable Diffusion components", load)
