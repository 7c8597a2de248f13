"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

Each query looks at a few learned sampling locations around its reference
point on every feature level, reads the (projected) value there by bilinear
interpolation and mixes the samples with learned, softmax-normalised weights.
The sampling is done with ``torch.nn.functional.grid_sample``, so it runs on
any device; no compiled extension is needed.

Shape shorthand: B batch, Lq queries, Lv flattened value positions over all
levels (sum of H_l * W_l), L levels, M heads, P points per head and level,
C embedding size, D = C / M per-head size.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleDeformableAttention", "deformable_sampling"]


def deformable_sampling(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of a multi-level value.

    Args:
        value: (B, Lv, M, D) per-head values, levels flattened row-major and
            concatenated in the order of ``spatial_shapes``.
        spatial_shapes: (L, 2) long, (H_l, W_l) of each level.
        sampling_locations: (B, Lq, M, L, P, 2) sampling points as (x, y)
            normalised to [0, 1] over each level's extent (0 = left/top
            border, 1 = right/bottom border; pixel centres at (i + 0.5) / W).
        attention_weights: (B, Lq, M, L, P) mixing weights.

    Returns:
        (B, Lq, M * D) attended values. Points outside a level read zeros.
    """
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    sizes: List[List[int]] = spatial_shapes.tolist()
    per_level = value.split([h * w for h, w in sizes], dim=1)
    # grid_sample works on (N, C, H, W) maps: fold the heads into the batch.
    grids = sampling_locations.permute(0, 2, 1, 3, 4, 5).flatten(0, 1) * 2.0 - 1.0  # (B*M, Lq, L, P, 2)
    grids = grids.to(value.dtype)  # grid_sample wants one dtype; locations may be float32 under half values
    samples = []
    for level, (h, w) in enumerate(sizes):
        level_map = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        samples.append(
            F.grid_sample(level_map, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, D, Lq, P)
    stacked = torch.stack(samples, dim=3)  # (B*M, D, Lq, L, P)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(batch * heads, 1, num_queries, len(sizes), -1)
    mixed = (stacked * weights).sum(dim=(-1, -2))  # (B*M, D, Lq)
    return mixed.view(batch, heads * head_dim, num_queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over a multi-level feature pyramid.

    The sampling offsets are given in pixels of each level and are predicted
    from the query; the attention weights are a softmax over the L * P
    samples of each head.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
    ):
        """
        Args:
            embed_dim: channel size C of queries, values and output.
            num_heads: attention heads M; must divide ``embed_dim``.
            num_levels: feature levels L the value is made of.
            num_points: sampling points P per head and level.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start with fixed sampling patterns and uniform weights.

        Head m samples along a ray at angle 2*pi*m/M, point k at distance k+1
        (in pixels, measured along the longer axis of the ray's bounding box),
        the same on every level: the heads cover all directions before any
        training, and zero weights make the offsets independent of the query
        at first.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        rays = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (M, 2)
        rays = rays / rays.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = rays[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Lq, C) queries (positional encoding already added).
            reference_points: (B, Lq, L, 2) (x, y) in [0, 1] per level.
            value: (B, Lv, C) flattened levels, Lv = sum of H_l * W_l.
            spatial_shapes: (L, 2) long, (H_l, W_l) per level.
            level_start_index: (L,) long, offset of each level in ``value``;
                checked against ``spatial_shapes``.
            padding_mask: optional (B, Lv) bool, True at padded positions,
                which then contribute nothing.

        Returns:
            (B, Lq, C).
        """
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        if spatial_shapes.shape[0] != self.num_levels or int(areas.sum()) != num_values:
            raise ValueError(
                f"spatial_shapes {spatial_shapes.tolist()} do not describe a value of {num_values} positions "
                f"on {self.num_levels} levels."
            )
        starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        if not torch.equal(starts.to(level_start_index), level_start_index):
            raise ValueError(f"level_start_index {level_start_index.tolist()} does not match spatial_shapes.")
        if reference_points.shape[-1] != 2:
            raise ValueError(f"reference_points must be (B, Lq, L, 2) points, got {tuple(reference_points.shape)}.")

        projected = self.value_proj(value)
        if padding_mask is not None:
            projected = projected.masked_fill(padding_mask[..., None], 0.0)
        projected = projected.view(batch, num_values, self.num_heads, self.embed_dim // self.num_heads)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(dim=-1).view(batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        # Offsets are in pixels of each level; divide by (W_l, H_l) to move in normalised units.
        level_wh = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2)
        locations = reference_points[:, :, None, :, None, :] + offsets / level_wh[None, None, None, :, None, :]

        # Hook for a fused kernel: on CUDA, a compiled multi-scale deformable
        # attention op could be picked here at call time (same inputs as
        # `deformable_sampling`). None is shipped; grid_sample is used on every device.
        attended = deformable_sampling(projected, spatial_shapes, locations, weights)
        return self.output_proj(attended)
