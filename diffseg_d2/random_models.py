"""Random-weight models with the real architectures.

* The ``tiny`` presets, so that everything runs on a CPU with no download. They
  are saved in the real on-disk formats (a diffusers folder, an open_clip
  folder) and then loaded by the same code that loads Stable Diffusion 1.5 or a
  released CLIP, so the loading code is exercised too.
* The full-size Stable Diffusion 1.5 architecture, built in memory, for
  benchmarks: speed and memory do not depend on the weights.

Their outputs carry no meaning: random weights segment nothing.

The SD tokenizer is the real CLIP BPE vocabulary, written from the copy that
the open_clip package ships, so class names split into the same sub-word
tokens as with SD 1.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .optional_imports import require

TINY_SD_FOLDER = "tiny-stable-diffusion-v1"
TINY_CLIP_FOLDER = "tiny-open-clip-v1"
TINY_SEED = 0
# The square side the tiny SD preset works at: its VAE downsamples by 8 to a 16x16 latent.
TINY_SD_IMAGE_SIZE = 128


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer into ``folder``."""
    open_clip_tokenizer = require("open_clip.tokenizer", "open_clip_torch", "The tiny tokenizer")
    simple = open_clip_tokenizer.SimpleTokenizer()
    # open_clip names its special tokens differently from the CLIP/SD tokenizer files.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for (a, b), _ in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


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


def random_stable_diffusion(architecture: str, tokenizer, seed: int = TINY_SEED):
    """UNet, VAE, text encoder and SD 1.x's DDIM noise schedule with random weights.

    Args:
        architecture: a key of ``SD_ARCHITECTURES`` ("tiny", "micro" or "sd15").
        tokenizer: the CLIP tokenizer the text encoder is sized for.

    Returns:
        ``StableDiffusionParts`` (float32, CPU).
    """
    from .diffusion.frozen_sd import StableDiffusionParts

    diffusers = require("diffusers", "diffusers", "Random Stable Diffusion models")
    transformers = require("transformers", "transformers", "Random Stable Diffusion models")
    sizes = SD_ARCHITECTURES[architecture]
    torch.manual_seed(seed)
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


def build_tiny_open_clip(folder: Path) -> None:
    """Save a tiny open_clip model (ViT image tower, 64 px) as an open_clip local folder."""
    open_clip = require("open_clip", "open_clip_torch", "The tiny CLIP preset")
    safetensors_torch = require("safetensors.torch", "safetensors", "The tiny CLIP preset")
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    torch.manual_seed(TINY_SEED)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2), encoding="utf-8"
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(folder / "open_clip_model.safetensors"))


TINY_DINO_FOLDER = "tiny-dinov2-v1"
# timm architecture and sizes of the random DINOv2-shaped encoders built here.
DINO_ARCHITECTURES = {
    # DINOv2's ViT with patch 14, 2 blocks of width 32: a few hundred kB.
    "tiny": dict(architecture="vit_small_patch14_dinov2", img_size=56, embed_dim=32, depth=2, num_heads=2),
    # DINOv2 ViT-B/14 (86M parameters), the FreeDA reference encoder.
    "vitb14": dict(architecture="vit_base_patch14_dinov2"),
    "vitl14": dict(architecture="vit_large_patch14_dinov2"),
}


def random_dino(architecture: str, seed: int = TINY_SEED):
    """A timm DINOv2 ViT with random weights (``DINO_ARCHITECTURES`` key), accepting any input size."""
    timm = require("timm", "timm", "Random DINOv2 models")
    args = dict(DINO_ARCHITECTURES[architecture])
    name = args.pop("architecture")
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, dynamic_img_size=True, **args)


def build_tiny_dino(folder: Path) -> None:
    """Save a tiny DINOv2-shaped timm ViT as a timm local folder (config.json + model.safetensors)."""
    timm_hub = require("timm.models._hub", "timm", "The tiny DINOv2 preset")
    args = dict(DINO_ARCHITECTURES["tiny"])
    args.pop("architecture")
    model = random_dino("tiny")
    # model_args go into config.json, so timm's "local-dir:" loading rebuilds the same sizes.
    timm_hub.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)


def random_blip_large(seed: int = TINY_SEED):
    """BLIP large's captioning architecture (ViT-L/16 at 384 + BERT-base decoder, 470M parameters)
    with random weights, and a processor with a synthetic vocabulary of BLIP's size, for
    benchmarks: ``(BlipForConditionalGeneration, BlipProcessor)``, float32, CPU."""
    import tempfile

    transformers = require("transformers", "transformers", "A random BLIP model")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = ["a", "photograph", "photography", "of"]
    vocab = special + words + [f"w{i}" for i in range(30524 - len(special) - len(words))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        tokenizer = transformers.BertTokenizer(str(path))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer
    )
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(vocab), encoder_hidden_size=1024, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
    )
    torch.manual_seed(seed)
    return transformers.BlipForConditionalGeneration(config).eval(), processor
