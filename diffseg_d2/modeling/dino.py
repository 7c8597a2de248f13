"""Dense DINOv2 patch features (timm), FreeDA's visual space.

One home for the dense image encoder: the offline bank pools its features
inside noun masks, the test-time segmenter pools them inside superpixels.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import require_finite
from ..optional_imports import require
from ..random_models import TINY_DINO_FOLDER, build_tiny_dino
from ..weights import hub_load_error, resolve_weights

logger = logging.getLogger(__name__)

DINO_WEIGHTS_KEY = "MODEL.DIFFSEG.DINO.WEIGHTS"


class DenseDINO(nn.Module):
    """A frozen timm ViT (DINOv2) returning its patch tokens as a feature map.

    Args:
        model: a timm ``VisionTransformer`` built with ``dynamic_img_size=True``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    @classmethod
    def from_weights(cls, weights: str) -> "DenseDINO":
        """Load from a hub id, a local timm folder, or ``"tiny"`` (``MODEL.DIFFSEG.DINO.WEIGHTS``)."""
        timm = require("timm", "timm", "The DINOv2 encoder")
        location = resolve_weights(
            weights,
            config_key=DINO_WEIGHTS_KEY,
            required_files=("config.json", "*.safetensors"),
            tiny=(TINY_DINO_FOLDER, build_tiny_dino),
            micro="dense",
        )
        name = ("local-dir:" if location.is_local else "hf-hub:") + location.path
        logger.info("loading DINOv2 from %s", location.path)
        try:
            # dynamic_img_size: the position embedding is interpolated to each window's size.
            model = timm.create_model(name, pretrained=True, dynamic_img_size=True)
        except (OSError, RuntimeError) as e:
            if location.is_local:
                raise
            raise hub_load_error(location, "DINOv2 model", e) from e
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
