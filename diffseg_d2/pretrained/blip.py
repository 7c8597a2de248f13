"""Image captions from a BLIP model (transformers), for DiffSegmenter's caption-augmented prompts."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..optional_imports import require
from .frozen import RANDOM_SEED, FrozenModel, load_pretrained, random_init
from .weights import random_architecture, resolve_weights

CAPTION_WEIGHTS_KEY = "MODEL.DIFFSEG.CAPTION.WEIGHTS"


class BlipCaptioner(FrozenModel):
    """A frozen BLIP captioner: image (3, H, W) RGB in [0, 255] -> one caption string.

    Args:
        model: a transformers ``BlipForConditionalGeneration``.
        processor: its ``BlipProcessor``.
        max_new_tokens: longest caption, in tokens.
    """

    def __init__(self, model: nn.Module, processor, max_new_tokens: int = 20):
        super().__init__()
        self.model = model
        self.processor = processor
        self.max_new_tokens = int(max_new_tokens)
        self.freeze()

    @classmethod
    def from_weights(cls, weights: str, max_new_tokens: int = 20) -> "BlipCaptioner":
        """Load from a hub id, a local transformers folder, or ``"random:large"`` (BLIP large's
        architecture with random weights) (``MODEL.DIFFSEG.CAPTION.WEIGHTS``)."""
        transformers = require("transformers", "transformers", "Caption augmentation")
        if random_architecture(weights, config_key=CAPTION_WEIGHTS_KEY, choices=("large",)) is not None:
            return cls(*random_blip_large(), max_new_tokens)
        location = resolve_weights(
            weights,
            config_key=CAPTION_WEIGHTS_KEY,
            required_files=("config.json", "*.safetensors"),
        )
        processor, model = load_pretrained(
            location, "captioner",
            lambda: (transformers.BlipProcessor.from_pretrained(location.path),
                     transformers.BlipForConditionalGeneration.from_pretrained(location.path, use_safetensors=True)),
        )
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


def random_blip_large(seed: int = RANDOM_SEED):
    """BLIP large's captioning architecture (ViT-L/16 at 384 + BERT-base decoder, 470M parameters)
    with random weights, and a processor with a synthetic vocabulary of BLIP's size, for
    benchmarks: ``(BlipForConditionalGeneration, BlipProcessor)``, float32, CPU."""
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
    with random_init(seed):
        model = transformers.BlipForConditionalGeneration(config)
    return model.eval(), processor
