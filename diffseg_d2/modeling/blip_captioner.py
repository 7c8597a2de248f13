"""Image captions from a BLIP model (transformers), for caption-augmented prompts."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..optional_imports import require
from ..weights import hub_load_error, resolve_weights

logger = logging.getLogger(__name__)

CAPTION_WEIGHTS_KEY = "MODEL.DIFFSEG.CAPTION.WEIGHTS"


class BlipCaptioner(nn.Module):
    """A frozen BLIP captioner: image (3, H, W) RGB in [0, 255] -> one caption string.

    Args:
        model: a transformers ``BlipForConditionalGeneration``.
        processor: its ``BlipProcessor``.
        max_new_tokens: longest caption, in tokens.
    """

    def __init__(self, model: nn.Module, processor, max_new_tokens: int = 20):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def from_weights(cls, weights: str, max_new_tokens: int = 20) -> "BlipCaptioner":
        transformers = require("transformers", "transformers", "Caption augmentation")
        location = resolve_weights(
            weights,
            config_key=CAPTION_WEIGHTS_KEY,
            required_files=("config.json", "*.safetensors"),
        )
        try:
            processor = transformers.BlipProcessor.from_pretrained(location.path)
            model = transformers.BlipForConditionalGeneration.from_pretrained(location.path, use_safetensors=True)
        except OSError as e:
            if location.is_local:
                raise
            raise hub_load_error(location, "captioner", e) from e
        return cls(model, processor, max_new_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> str:
        pixels = image.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        inputs = self.processor(images=pixels, return_tensors="pt").to(self.device)
        ids = self.model.generate(pixel_values=inputs.pixel_values, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()
