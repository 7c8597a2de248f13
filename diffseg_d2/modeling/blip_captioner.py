"""Image captions from a BLIP model (transformers), for caption-augmented prompts."""
from __future__ import annotations

import logging
from typing import Optional

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

    def _inputs(self, image: torch.Tensor, text: Optional[str] = None):
        pixels = image.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return self.processor(images=pixels, text=text, return_tensors="pt").to(self.device)

    def _generate(self, inputs) -> str:
        # 0 = the model's own generation settings (the reference calls generate() without any).
        kwargs = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens > 0 else {}
        ids = self.model.generate(**inputs, **kwargs)
        return self.processor.decode(ids[0], skip_special_tokens=True)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> str:
        """A caption of ``image`` (3, H, W) RGB in [0, 255]."""
        return self._generate(self._inputs(image)).strip()

    @torch.no_grad()
    def continue_prompt(self, image: torch.Tensor, prompt: str) -> str:
        """What BLIP writes after ``prompt`` when captioning ``image`` starting from it: the
        decoded caption with the prompt's length cut off, as the reference does (usually a text
        starting with a space; empty when BLIP adds nothing)."""
        return self._generate(self._inputs(image, prompt))[len(prompt):]
