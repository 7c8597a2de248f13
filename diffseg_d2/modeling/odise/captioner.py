"""ODISE's implicit captioner: an image's CLIP embedding turned into UNet conditioning.

The frozen CLIP image encoder gives one embedding per image (not normalised). A
linear layer maps it into the text encoder's token space and a learned positional
embedding spreads it over the context positions; the result is added to the
encoded empty prompt through a per-element ``tanh`` gate that starts at zero. A
second linear layer (with its own gate) maps the embedding to the UNet's time-
embedding width, and is added to the time embedding. Both gates start at zero, so
training starts from exactly the empty-prompt UNet. Only the linear layers, the
positional embeddings and the gates train.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ...pretrained.clip import OpenCLIP


class ImplicitCaptioner(nn.Module):
    """
    Args:
        clip: frozen CLIP; its image embedding (dimension ``clip.embed_dim``) is the input.
        context_length: positions of the UNet's text conditioning (77 for SD).
        text_dim: width of the UNet's text conditioning (768 for SD 1.5).
        time_embed_dim: width of the UNet's time embedding (1280 for SD 1.5), or None for no
            time-embedding path.
    """

    @classmethod
    def for_diffusion(cls, clip: OpenCLIP, diffusion, time_embedding: bool = True) -> "ImplicitCaptioner":
        """The captioner of a UNet substrate: as many tokens as its text context, its cross-attention width,
        and (``time_embedding``) its time-embedding width."""
        unet = diffusion.unet
        time_dim = int(unet.time_embedding.linear_2.out_features) if time_embedding else None
        return cls(clip, diffusion.context_length, int(unet.config.cross_attention_dim), time_dim)

    def __init__(self, clip: OpenCLIP, context_length: int, text_dim: int, time_embed_dim: Optional[int] = None):
        super().__init__()
        self.clip = clip
        self.project = nn.Linear(clip.embed_dim, text_dim)
        self.positional_embedding = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, context_length, text_dim), std=0.02))
        self.gate = nn.Parameter(torch.zeros(1, context_length, text_dim))
        self.time_project = None
        if time_embed_dim:
            self.time_project = nn.Linear(clip.embed_dim, time_embed_dim)
            self.time_positional_embedding = nn.Parameter(
                nn.init.trunc_normal_(torch.zeros(1, time_embed_dim), std=0.02)
            )
            self.time_gate = nn.Parameter(torch.zeros(time_embed_dim))

    def forward(self, images: torch.Tensor, empty_context: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """UNet conditioning for each image.

        Args:
            images: (B, 3, H, W) RGB in [0, 255] (resized to CLIP's input square, not clamped).
            empty_context: (1, L, D) the encoded empty prompt.

        Returns:
            ``(context, time)``: (B, L, D) ``empty + tanh(gate) * (project(e) + positional)``, and
            (B, T) ``tanh(time_gate) * (time_project(e) + time_positional)`` to add to the UNet's
            time embedding (None without that path); ``e`` is CLIP's image embedding.
        """
        embedding = self.clip.encode_image(images, clamp=False, normalize=False)  # (B, E), frozen, no graph
        embedding = embedding.to(self.project.weight.dtype)
        tokens = self.project(embedding)[:, None] + self.positional_embedding
        context = empty_context + torch.tanh(self.gate) * tokens.to(empty_context.dtype)
        if self.time_project is None:
            return context, None
        time = torch.tanh(self.time_gate) * (self.time_project(embedding) + self.time_positional_embedding)
        return context, time
