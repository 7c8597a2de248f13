"""Dense DINOv2 patch features (timm), FreeDA's visual space.

One home for the dense image encoder: the offline bank pools its features
inside noun masks, the test-time segmenter pools them inside superpixels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import require_finite
from ..optional_imports import require
from .frozen import RANDOM_SEED, FrozenModel, load_pretrained, random_init
from .weights import random_architecture, resolve_weights

DINO_WEIGHTS_KEY = "MODEL.DIFFSEG.DINO.WEIGHTS"


class DenseDINO(FrozenModel):
    """A frozen timm ViT (DINOv2) returning its patch tokens as a feature map.

    Args:
        model: a timm ``VisionTransformer`` built with ``dynamic_img_size=True``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.freeze()

    @classmethod
    def from_weights(cls, weights: str) -> "DenseDINO":
        """Load from a hub id, a local timm folder, ``"tiny"``, ``"micro"``, or ``"random:<architecture>"``
        (random weights of a ``DINO_ARCHITECTURES`` entry, e.g. ``random:vitl14``) (``MODEL.DIFFSEG.DINO.WEIGHTS``)."""
        timm = require("timm", "timm", "The DINOv2 encoder")
        architecture = random_architecture(weights, config_key=DINO_WEIGHTS_KEY, choices=DINO_ARCHITECTURES)
        if architecture is not None:
            return cls(random_dino(architecture))
        location = resolve_weights(
            weights,
            config_key=DINO_WEIGHTS_KEY,
            required_files=("config.json", "*.safetensors"),
            tiny=(TINY_DINO_FOLDER, build_tiny_dino),
            micro="dense",
        )
        name = ("local-dir:" if location.is_local else "hf-hub:") + location.path
        # dynamic_img_size: the position embedding is interpolated to each window's size.
        model = load_pretrained(location, "DINOv2 model",
                                lambda: timm.create_model(name, pretrained=True, dynamic_img_size=True),
                                errors=(OSError, RuntimeError))
        return cls(model)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.no_grad()
    def tokens_at(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Patch features of images squashed to ``size``² (bilinear, no antialias, as FreeDA's
        reference code feeds DINOv2): (B, 3, H, W) RGB in [0, 255] -> (B, D, size/p, size/p)."""
        x = images.float().to(self.device)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=False, align_corners=False)
        return self._tokens((x - self.pixel_mean) / self.pixel_std)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens :]  # (B, gh*gw, D)
        require_finite(tokens, "DINOv2 (MODEL.DIFFSEG.DINO.WEIGHTS)")
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features: (B, 3, H, W) RGB in [0, 255] -> (B, D, H', W'), H' = round(H / patch).

        The image is resized to the nearest multiple of the patch size first.
        """
        h, w = images.shape[-2:]
        p = self.patch_size
        gh, gw = max(1, round(h / p)), max(1, round(w / p))
        x = images.float().to(self.device)
        if (gh * p, gw * p) != (h, w):
            x = F.interpolate(x, size=(gh * p, gw * p), mode="bilinear", antialias=True, align_corners=False)
        return self._tokens((x - self.pixel_mean) / self.pixel_std)


TINY_DINO_FOLDER = "tiny-dinov2-v1"
# timm architecture and sizes of the random DINOv2-shaped encoders built here.
DINO_ARCHITECTURES = {
    # DINOv2's ViT with patch 14, 2 blocks of width 32: a few hundred kB.
    "tiny": dict(architecture="vit_small_patch14_dinov2", img_size=56, embed_dim=32, depth=2, num_heads=2),
    # DINOv2 ViT-B/14 (86M parameters), the FreeDA reference encoder.
    "vitb14": dict(architecture="vit_base_patch14_dinov2"),
    "vitl14": dict(architecture="vit_large_patch14_dinov2"),
}


def random_dino(architecture: str, seed: int = RANDOM_SEED):
    """A timm DINOv2 ViT with random weights (``DINO_ARCHITECTURES`` key), accepting any input size."""
    timm = require("timm", "timm", "Random DINOv2 models")
    args = dict(DINO_ARCHITECTURES[architecture])
    name = args.pop("architecture")
    with random_init(seed):
        return timm.create_model(name, pretrained=False, dynamic_img_size=True, **args)


def build_tiny_dino(folder: Path) -> None:
    """Save a tiny DINOv2-shaped timm ViT as a timm local folder (config.json + model.safetensors)."""
    timm_hub = require("timm.models._hub", "timm", "The tiny DINOv2 preset")
    args = dict(DINO_ARCHITECTURES["tiny"])
    args.pop("architecture")
    model = random_dino("tiny")
    # model_args go into config.json, so timm's "local-dir:" loading rebuilds the same sizes.
    timm_hub.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
