"""Open-vocabulary classification of mask embeddings against CLIP text embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def max_over_synonyms(scores: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class scores from per-synonym scores: (..., S) -> (..., K), the max over each class's synonyms."""
    out = scores.new_full((*scores.shape[:-1], num_classes), float("-inf"))
    return out.scatter_reduce(-1, owner.expand_as(scores), scores, reduce="amax", include_self=True)


class OpenVocabClassifier(nn.Module):
    """Cosine similarity of mask embeddings with class text embeddings, plus a learned "no object".

    Args:
        embed_dim: dimension of the mask embeddings and of CLIP's joint space.
        init_temperature: initial softmax temperature (the logit scale is learned as its log inverse).
    """

    def __init__(self, embed_dim: int, init_temperature: float = 0.07):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.no_object = nn.Parameter(torch.randn(embed_dim) * embed_dim**-0.5)

    def scale(self) -> torch.Tensor:
        # Capped at 100 as CLIP's own scale, so logits cannot blow up early in training.
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, embeds: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
        """
        Args:
            embeds: (B, Q, E) mask embeddings (any norm).
            text: (S, E) L2-normalised synonym embeddings.
            owner: (S,) class index of each synonym.
            num_classes: K.

        Returns:
            (B, Q, K + 1) logits; the last column is "no object".
        """
        e = F.normalize(embeds.float(), dim=-1)
        scale = self.scale()
        per_class = max_over_synonyms(scale * e @ text.float().T, owner, num_classes)
        void = scale * e @ F.normalize(self.no_object.float(), dim=0)
        return torch.cat([per_class, void[..., None]], dim=-1)
