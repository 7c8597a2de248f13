"""ODISE's implicit captioner: an image's CLIP embedding turned into UNet text conditioning.

The frozen CLIP image encoder gives one embedding per image; a linear layer maps
it into the text encoder's token space, a learned positional embedding spreads it
over the context positions, and the result is added to the encoded empty prompt
through a ``tanh`` gate that starts at zero, so training starts from exactly the
empty-prompt conditioning. Only the linear layer, the positional embedding and the
gate train.
"""
from __future__ import annotations

import torch
from torch import nn

from .clip import OpenCLIP


class ImplicitCaptioner(nn.Module):
    """
    Args:
        clip: frozen CLIP; its image embedding (dimension ``clip.embed_dim``) is the input.
        context_length: positions of the UNet's text conditioning (77 for SD).
        text_dim: width of the UNet's text conditioning (768 for SD 1.5).
    """

    def __init__(self, clip: OpenCLIP, context_length: int, text_dim: int):
        super().__init__()
        self.clip = clip
        self.project = nn.Linear(clip.embed_dim, text_dim)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_dim) * text_dim**-0.5)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, empty_context: torch.Tensor) -> torch.Tensor:
        """UNet conditioning for each image.

        Args:
            images: (B, 3, H, W) RGB in [0, 255].
            empty_context: (1, L, D) the encoded empty prompt.

        Returns:
            (B, L, D) ``empty_context + tanh(gate) * (project(clip(image)) + positional)``.
        """
        embedding = self.clip.encode_image(images)  # (B, E), frozen, no graph
        tokens = self.project(embedding.to(self.project.weight.dtype))[:, None] + self.positional_embedding
        return empty_context + torch.tanh(self.gate) * tokens.to(empty_context.dtype)
