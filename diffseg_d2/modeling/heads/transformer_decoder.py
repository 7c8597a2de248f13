"""Masked-attention transformer decoder (Mask2Former design) with open-vocabulary embeddings.

Learned queries are refined layer by layer against the pixel decoder's
multi-scale maps, visiting the levels in round robin, coarsest first. Each
cross-attention only sees the pixels inside the mask the previous prediction
gave the query. After the initial queries and after every layer a shared head
predicts, per query, a mask (dot product with the per-pixel embeddings) and
an embedding in the CLIP space, which the meta-architecture compares with
text embeddings: there are no class logits here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from fvcore.nn import weight_init  # detectron2 dependency
from torch import nn

from .pixel_decoder import SinePositionEncoding

__all__ = ["MaskedAttentionDecoder", "MLP"]


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        """
        Args:
            in_dim: input features.
            hidden_dim: features of the hidden layers.
            out_dim: output features.
            num_layers: linear layers; 1 is a plain linear map.
        """
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _AttentionBlock(nn.Module):
    """Multi-head attention with residual, dropout and layer norm (post- or pre-norm).

    Positional embeddings are added to queries and keys, never to values.
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: Optional[torch.Tensor] = None,
        memory_pos: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            queries, query_pos: (B, Q, C).
            memory, memory_pos: (B, S, C); None for self-attention.
            attn_mask: (B * heads, Q, S) bool, True where attending is not allowed.

        Returns:
            (B, Q, C).
        """
        normed = self.norm(queries) if self.pre_norm else queries
        if memory is None:
            keys = values = normed
            key_pos = query_pos
        else:
            keys = values = memory
            key_pos = memory_pos
        attended = self.attn(normed + query_pos, keys + key_pos, values, attn_mask=attn_mask, need_weights=False)[0]
        queries = queries + self.dropout(attended)
        return queries if self.pre_norm else self.norm(queries)


class _FeedForwardBlock(nn.Module):
    """Two-layer FFN with residual, dropout and layer norm (post- or pre-norm)."""

    def __init__(self, *, dim: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C)."""
        if self.pre_norm:
            return queries + self.dropout(self.ffn(self.norm(queries)))
        return self.norm(queries + self.dropout(self.ffn(queries)))


def masked_average(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Mean of ``features`` (B, C, H, W) over each mask where its sigmoid exceeds 0.5: (B, Q, C).

    The masks are binarised without gradient; an empty mask gives zeros.
    """
    with torch.no_grad():
        hard = (mask_logits.sigmoid() > 0.5).to(features.dtype)
        hard = hard / (hard.sum(dim=(-2, -1), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, hard)


class MaskedAttentionDecoder(nn.Module):
    """Query decoder with masked cross-attention; predicts mask logits and open-vocabulary embeddings."""

    def __init__(
        self,
        *,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        embed_dim: int = 768,
        enforce_input_project: bool = False,
        num_feature_levels: int = 3,
        dropout: float = 0.0,
        class_agnostic: bool = False,
    ):
        """
        Args:
            in_channels: channels of the multi-scale maps (pixel decoder ``conv_dim``).
            hidden_dim: query size.
            num_queries: learned queries (mask proposals per image).
            num_heads: attention heads.
            ffn_dim: hidden size of the FFNs.
            num_layers: decoder layers (each: masked cross-attention, self-attention, FFN).
            pre_norm: layer norm before (True) or after (False) each block.
            mask_dim: channels of ``mask_features``; the mask embedding size.
            embed_dim: size of ``pred_embeds``, the space where the classifier compares
                them with (projected) text embeddings; ODISE uses ``mask_dim``.
            enforce_input_project: project the maps with a 1x1 conv even when
                ``in_channels == hidden_dim``.
            num_feature_levels: multi-scale maps visited in round robin.
            dropout: dropout in attention and FFN blocks.
            class_agnostic: also predict, per query, object vs "no object" logits (``pred_binary``)
                with a linear layer on the query state (ODISE's caption-trained model).
        """
        super().__init__()
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_feature_levels = num_feature_levels
        self.position_encoding = SinePositionEncoding(num_channels=hidden_dim)
        self.cross_attention_layers = nn.ModuleList(
            _AttentionBlock(dim=hidden_dim, num_heads=num_heads, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.self_attention_layers = nn.ModuleList(
            _AttentionBlock(dim=hidden_dim, num_heads=num_heads, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.ffn_layers = nn.ModuleList(
            _FeedForwardBlock(dim=hidden_dim, ffn_dim=ffn_dim, dropout=dropout, pre_norm=pre_norm)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.mask_embed = MLP(in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=mask_dim, num_layers=3)
        # ODISE's mask embedding: the per-pixel embeddings averaged under each query's binarised
        # mask, projected, added to the query state, then an MLP (ODISE's PooledMaskEmbed).
        self.pool_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim))
        self.embed_head = nn.Sequential(
            nn.LayerNorm(hidden_dim), MLP(in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=embed_dim, num_layers=3)
        )
        self.class_head = nn.Linear(hidden_dim, 2) if class_agnostic else None
        self.embed_dim = int(embed_dim)

    def predict(
        self, queries: torch.Tensor, mask_features: torch.Tensor, attn_size: Tuple[int, int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Prediction head shared by every layer.

        Args:
            queries: (B, Q, hidden_dim) decoder state.
            mask_features: (B, mask_dim, H, W) per-pixel embeddings.
            attn_size: (h, w) of the level the next cross-attention reads.

        Returns:
            embeds: (B, Q, embed_dim), not normalised.
            masks: (B, Q, H, W) mask logits.
            attn_mask: (B * heads, Q, h * w) bool, True outside the predicted
                mask (sigmoid < 0.5 after resizing to ``attn_size``); no gradient.
            binary: (B, Q, 2) object / "no object" logits when class-agnostic, else None.
        """
        normed = self.decoder_norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(normed), mask_features)
        embeds = self.embed_head(self.pool_proj(masked_average(mask_features, masks)) + normed)
        binary = None if self.class_head is None else self.class_head(normed)
        with torch.no_grad():
            resized = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
            blocked = resized.sigmoid().flatten(2) < 0.5  # (B, Q, h*w)
            attn_mask = blocked[:, None].expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        return embeds, masks, attn_mask, binary

    @staticmethod
    def _prediction(embeds: torch.Tensor, masks: torch.Tensor, binary: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {"pred_embeds": embeds, "pred_masks": masks}
        if binary is not None:
            out["pred_binary"] = binary
        return out

    def forward(self, multi_scale_features: List[torch.Tensor], mask_features: torch.Tensor) -> Dict[str, object]:
        """
        Args:
            multi_scale_features: ``num_feature_levels`` maps (B, in_channels, h_l, w_l), coarsest first.
            mask_features: (B, mask_dim, H, W) per-pixel embeddings (stride 4 in the usual setup).

        Returns:
            dict with "pred_embeds" (B, Q, embed_dim) and "pred_masks" (B, Q, H, W)
            logits of the last layer (and "pred_binary" (B, Q, 2) when class-agnostic), and "aux_outputs": ``num_layers`` dicts with
            the same keys, for the initial queries and every layer but the last.
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"Expected {self.num_feature_levels} multi-scale maps, got {len(multi_scale_features)}."
            )
        memories, memory_pos, sizes = [], [], []
        for level, feature in enumerate(multi_scale_features):
            sizes.append((feature.shape[-2], feature.shape[-1]))
            memory_pos.append(self.position_encoding(feature).flatten(2).transpose(1, 2))
            projected = self.input_proj[level](feature).flatten(2).transpose(1, 2)
            memories.append(projected + self.level_embed.weight[level])  # (B, h*w, C)

        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        queries = self.query_feat.weight[None].expand(batch, -1, -1)

        *prediction, attn_mask, binary = self.predict(queries, mask_features, sizes[0])
        predictions = [self._prediction(*prediction, binary)]
        for layer in range(self.num_layers):
            level = layer % self.num_feature_levels
            # A query whose mask is empty at this level would get no key at all
            # (softmax over nothing = NaN): let it see the whole map instead.
            attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)
            queries = self.cross_attention_layers[layer](
                queries, query_pos, memory=memories[level], memory_pos=memory_pos[level], attn_mask=attn_mask
            )
            queries = self.self_attention_layers[layer](queries, query_pos)
            queries = self.ffn_layers[layer](queries)
            next_size = sizes[(layer + 1) % self.num_feature_levels]
            *prediction, attn_mask, binary = self.predict(queries, mask_features, next_size)
            predictions.append(self._prediction(*prediction, binary))

        return {
            **predictions[-1],
            "aux_outputs": predictions[:-1],
        }
