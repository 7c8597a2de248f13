"""CLIP image and text embeddings (open_clip), with prompt templates and a text cache.

One home for CLIP in the package: the category filter uses it now, later
methods (FreeDA keys, ODISE classification) reuse it.
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..optional_imports import require
from ..random_models import TINY_CLIP_FOLDER, build_tiny_open_clip
from ..weights import hub_load_error, resolve_weights

logger = logging.getLogger(__name__)

CLIP_WEIGHTS_KEY = "MODEL.DIFFSEG.CLIP.WEIGHTS"


class OpenCLIP(nn.Module):
    """A frozen open_clip model.

    Args:
        model: an open_clip ``CLIP``.
        tokenizer: its tokenizer (``list[str] -> (N, L)`` ids).
        templates: prompt templates with ``{}``; a class's text embedding is the
            normalised mean over them.
    """

    def __init__(self, model: nn.Module, tokenizer, templates: Sequence[str]):
        super().__init__()
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"MODEL.DIFFSEG.CLIP.TEMPLATES must be templates with '{{}}', got {list(templates)}.")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.templates = list(templates)
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self._text_cache: Dict[Tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_weights(cls, weights: str, templates: Sequence[str]) -> "OpenCLIP":
        """Load from a hub id, a local open_clip folder, or ``"tiny"`` (``MODEL.DIFFSEG.CLIP.WEIGHTS``)."""
        open_clip = require("open_clip", "open_clip_torch", "The CLIP model")
        location = resolve_weights(
            weights,
            config_key=CLIP_WEIGHTS_KEY,
            required_files=("open_clip_config.json", "*.safetensors"),
            tiny=(TINY_CLIP_FOLDER, build_tiny_open_clip),
        )
        name = ("local-dir:" if location.is_local else "hf-hub:") + location.path
        try:
            model = open_clip.create_model(name, weights_only=True, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(name)
        except (OSError, RuntimeError) as e:
            if location.is_local:
                raise
            raise hub_load_error(location, "CLIP model", e) from e
        return cls(model, tokenizer, templates)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def clear_cache(self) -> None:
        self._text_cache.clear()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings: (B, 3, H, W) RGB in [0, 255] -> (B, D).

        The whole image is resized to the model's input square (no crop), so
        nothing at the borders is missed by the filter.
        """
        x = F.interpolate(images.float().to(self.device), size=self.image_size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 255) - self.pixel_mean) / self.pixel_std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_class_names(self, names: Sequence[str]) -> torch.Tensor:
        """L2-normalised template-averaged text embeddings: K names -> (K, D). Cached per vocabulary."""
        key = tuple(names)
        if key not in self._text_cache:
            prompts = [t.format(n) for n in names for t in self.templates]
            ids = self.tokenizer(prompts).to(self.device)
            emb = F.normalize(self.model.encode_text(ids).float(), dim=-1)
            emb = emb.view(len(names), len(self.templates), -1).mean(1)
            self._text_cache[key] = F.normalize(emb, dim=-1)
        return self._text_cache[key]

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Softmax over the K names of the image-text similarity: (B, 3, H, W) -> (B, K)."""
        img = self.encode_image(images)
        txt = self.encode_class_names(names)
        scale = self.model.logit_scale.exp().float() if hasattr(self.model, "logit_scale") else 100.0
        return (scale * img @ txt.T).softmax(dim=-1)


class CategoryFilter(nn.Module):
    """Drops classes that CLIP judges absent from the image.

    A class is kept when its CLIP probability (softmax over the candidate
    classes) is at least ``threshold``; at most ``top_k`` classes are kept
    (0 = no cap); the most probable class is always kept.
    """

    def __init__(self, clip: OpenCLIP, threshold: float, top_k: int = 0):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"MODEL.DIFFSEG.CATEGORY_FILTER.THRESHOLD must be in [0, 1], got {threshold}.")
        if top_k < 0:
            raise ValueError(f"MODEL.DIFFSEG.CATEGORY_FILTER.TOP_K must be >= 0, got {top_k}.")
        self.clip = clip
        self.threshold = float(threshold)
        self.top_k = int(top_k)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Which names to keep: image (3, H, W) RGB in [0, 255] -> bool (K,)."""
        probs = self.clip.class_probabilities(image[None], names)[0]
        keep = probs >= self.threshold
        if self.top_k and int(keep.sum()) > self.top_k:
            keep = torch.zeros_like(keep)
            keep[probs.topk(self.top_k).indices] = True
        keep[probs.argmax()] = True
        return keep.cpu()
