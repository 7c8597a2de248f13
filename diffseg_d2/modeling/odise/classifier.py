"""Open-vocabulary classification of mask embeddings against projected CLIP text embeddings."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def max_over_synonyms(scores: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class scores from per-synonym scores: (..., S) -> (..., K), the max over each class's synonyms."""
    out = scores.new_full((*scores.shape[:-1], num_classes), float("-inf"))
    return out.scatter_reduce(-1, owner.expand_as(scores), scores, reduce="amax", include_self=True)


class OpenVocabClassifier(nn.Module):
    """ODISE's category head: cosine similarity of mask embeddings with class text embeddings that a
    trainable linear layer maps from CLIP's space into the mask-embedding space, plus "no object".

    Args:
        text_dim: dimension of CLIP's text embeddings (768 for ViT-L/14).
        embed_dim: dimension of the mask embeddings (the head's ``MASK_DIM``, 256).
        null_text: (text_dim,) CLIP's embedding of the empty text, where the learned "no object"
            embedding starts (as in the reference); None = no "no object" column (ODISE's
            caption-trained model takes it from a class-agnostic head).
        init_temperature: initial softmax temperature (the logit scale is learned as its log inverse).
    """

    def __init__(self, text_dim: int, embed_dim: int, null_text: Optional[torch.Tensor], init_temperature: float = 0.07):
        super().__init__()
        if null_text is not None and null_text.shape != (text_dim,):
            raise ValueError(f"null_text must have shape ({text_dim},), got {tuple(null_text.shape)}.")
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.null_embed = None if null_text is None else nn.Parameter(null_text.detach().clone().float())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @classmethod
    def for_clip(cls, clip, embed_dim: int, no_object: bool = True) -> "OpenVocabClassifier":
        """The classifier reading ``clip``'s text embeddings: its "no object" embedding starts at CLIP's
        embedding of the empty text, or there is none (``no_object`` False: the caption-trained variant,
        whose class-agnostic head says what is an object)."""
        return cls(clip.embed_dim, embed_dim, clip.encode_texts([""])[0].cpu() if no_object else None)

    def scale(self) -> torch.Tensor:
        # Capped at 100 as CLIP's own scale, so logits cannot blow up early in training.
        return self.logit_scale.exp().clamp(max=100.0)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        """(S, text_dim) CLIP text embeddings as they come -> (S, embed_dim) L2-normalised."""
        return F.normalize(self.text_proj(text.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, embeds: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
        """
        Args:
            embeds: (B, Q, E) mask embeddings (any norm).
            text: (S, text_dim) CLIP text embeddings of the synonyms, not normalised.
            owner: (S,) class index of each synonym.
            num_classes: K.

        Returns:
            (B, Q, K + 1) logits, the last column "no object"; (B, Q, K) without a null embedding.
        """
        e = F.normalize(embeds.float(), dim=-1)
        scale = self.scale()
        per_class = max_over_synonyms(scale * e @ self.project_text(text).float().T, owner, num_classes)
        if self.null_embed is None:
            return per_class
        void = scale * e @ self.project_text(self.null_embed[None])[0].float()
        return torch.cat([per_class, void[..., None]], dim=-1)
