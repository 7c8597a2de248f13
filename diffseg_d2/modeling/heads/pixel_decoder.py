"""Pixel decoder: a deformable-attention encoder over the coarse levels plus an FPN path.

The coarse backbone levels (by default res3..res5) are projected to
``conv_dim`` channels, flattened into one sequence and refined by a stack of
multi-scale deformable self-attention layers. The finer levels (res2) join
through a top-down FPN path, and a 1x1 conv on the finest output gives the
per-pixel embeddings the mask head dots its queries with.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from fvcore.nn import weight_init  # detectron2 dependency
from torch import nn

from .ms_deform_attn import MultiScaleDeformableAttention

__all__ = ["DeformablePixelDecoder", "SinePositionEncoding"]


class SinePositionEncoding(nn.Module):
    """Fixed 2D sine/cosine position encoding (as in DETR), normalised to the map size.

    The first half of the channels encodes the row (y), the second half the
    column (x); each half alternates sin and cos over geometric frequencies.
    """

    def __init__(self, *, num_channels: int, temperature: float = 10000.0, scale: float = 2.0 * math.pi):
        """
        Args:
            num_channels: output channels; must be even (half for y, half for x)
                and each half must be even (sin/cos pairs).
            temperature: base of the geometric frequency progression.
            scale: coordinates are normalised to [0, scale].
        """
        super().__init__()
        if num_channels % 4 != 0:
            raise ValueError(f"num_channels must be a multiple of 4, got {num_channels}.")
        self.num_channels = num_channels
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, *, H, W); only its batch size, spatial size, dtype and device are used.

        Returns:
            (B, num_channels, H, W) position encoding.
        """
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        half = self.num_channels // 2
        eps = 1e-6
        # Positions 1..H normalised so the last row sits at `scale`, independent of the map size.
        ys = torch.arange(1, height + 1, device=x.device, dtype=torch.float32) / (height + eps) * self.scale
        xs = torch.arange(1, width + 1, device=x.device, dtype=torch.float32) / (width + eps) * self.scale
        pair = torch.arange(half, device=x.device) // 2
        freqs = self.temperature ** (2.0 * pair.float() / half)  # (half,)

        def encode(coords: torch.Tensor) -> torch.Tensor:
            phases = coords[:, None] / freqs  # (N, half)
            return torch.stack([phases[:, 0::2].sin(), phases[:, 1::2].cos()], dim=-1).flatten(1)

        pos_y = encode(ys)[:, None, :].expand(height, width, half)
        pos_x = encode(xs)[None, :, :].expand(height, width, half)
        pos = torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1)  # (C, H, W)
        return pos[None].expand(batch, -1, -1, -1).to(x.dtype)


def _norm_layer(norm: str, channels: int) -> Optional[nn.Module]:
    """detectron2's ``get_norm``; an empty name gives no norm."""
    return get_norm(norm, channels) if norm else None


class _DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, *, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(
            embed_dim=dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm_attn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """tokens, pos: (B, Lv, C); reference_points: (B, Lv, L, 2). Returns (B, Lv, C)."""
        attended = self.attn(tokens + pos, reference_points, tokens, spatial_shapes, level_start_index)
        tokens = self.norm_attn(tokens + self.dropout(attended))
        return self.norm_ffn(tokens + self.dropout(self.ffn(tokens)))


def _pixel_centres(spatial_shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(Lv, 2) (x, y) centres of every pixel of every level, normalised to [0, 1] by that level's size."""
    centres = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
    return torch.cat(centres)


class DeformablePixelDecoder(nn.Module):
    """Multi-scale pixel decoder with a deformable-attention encoder and an FPN path to ``common_stride``."""

    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        num_layers: int = 6,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_points: int = 4,
        common_stride: int = 4,
        num_output_levels: int = 3,
    ):
        """
        Args:
            input_shape: backbone outputs by name (e.g. res2..res5) with
                ``channels`` and ``stride``.
            transformer_in_features: the levels refined by the deformable encoder.
            conv_dim: channels of every decoder map; a multiple of 32 (GroupNorm with 32
                groups on the input projections).
            mask_dim: channels of ``mask_features``.
            norm: detectron2 norm name for the convs ("GN", "BN", "" for none).
            num_layers: deformable encoder layers.
            num_heads: attention heads per encoder layer.
            ffn_dim: hidden size of the encoder FFN.
            dropout: encoder dropout.
            num_points: sampling points per head and level.
            common_stride: stride of ``mask_features``; the levels of
                ``input_shape`` finer than the encoder's and not finer than
                this join through the FPN path.
            num_output_levels: maps returned as ``multi_scale_features``
                (the coarsest ones).
        """
        super().__init__()
        missing = [name for name in transformer_in_features if name not in input_shape]
        if missing:
            raise ValueError(f"transformer_in_features {missing} are not backbone outputs {sorted(input_shape)}.")
        # Coarsest first everywhere: encoder levels, FPN levels and outputs.
        by_stride = sorted(input_shape.items(), key=lambda item: -item[1].stride)
        self.transformer_in_features = [name for name, _ in by_stride if name in transformer_in_features]
        finest_encoded = min(input_shape[name].stride for name in self.transformer_in_features)
        self.fpn_in_features = [
            name for name, spec in by_stride if common_stride <= spec.stride < finest_encoded
        ]
        if min([finest_encoded] + [input_shape[n].stride for n in self.fpn_in_features]) != common_stride:
            raise ValueError(f"No backbone output at common_stride {common_stride}: got {dict(input_shape)}.")
        self.common_stride = common_stride
        self.num_output_levels = num_output_levels
        num_levels = len(self.transformer_in_features)

        # GroupNorm on the projections keeps the levels on a common scale before they are mixed.
        self.input_proj = nn.ModuleList()
        for name in self.transformer_in_features:
            proj = nn.Sequential(
                nn.Conv2d(input_shape[name].channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim)
            )
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.position_encoding = SinePositionEncoding(num_channels=conv_dim)
        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = nn.ModuleList(
            _DeformableEncoderLayer(
                dim=conv_dim,
                ffn_dim=ffn_dim,
                dropout=dropout,
                num_levels=num_levels,
                num_heads=num_heads,
                num_points=num_points,
            )
            for _ in range(num_layers)
        )

        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for name in self.fpn_in_features:
            lateral = Conv2d(
                input_shape[name].channels, conv_dim, kernel_size=1, bias=not norm, norm=_norm_layer(norm, conv_dim)
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=not norm,
                norm=_norm_layer(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone maps by name, each (B, C_name, H / stride, W / stride).

        Returns:
            mask_features: (B, mask_dim, H / common_stride, W / common_stride).
            multi_scale_features: ``num_output_levels`` maps (B, conv_dim, h_l, w_l),
                coarsest first.
        """
        tokens, pos, shapes = [], [], []
        for level, name in enumerate(self.transformer_in_features):
            projected = self.input_proj[level](features[name])
            shapes.append((projected.shape[-2], projected.shape[-1]))
            tokens.append(projected.flatten(2).transpose(1, 2))
            # The level embedding tells the attention which level a position came from.
            level_pos = self.position_encoding(projected).flatten(2).transpose(1, 2) + self.level_embed[level]
            pos.append(level_pos)
        tokens_all = torch.cat(tokens, dim=1)  # (B, Lv, C)
        pos_all = torch.cat(pos, dim=1)
        batch = tokens_all.shape[0]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=tokens_all.device)
        areas = spatial_shapes.prod(dim=1)
        level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        # Unpadded inputs: a position's normalised centre is the same point on every level.
        centres = _pixel_centres(shapes, tokens_all.device).to(tokens_all.dtype)
        reference_points = centres[None, :, None, :].expand(batch, -1, len(shapes), -1)

        for layer in self.encoder:
            tokens_all = layer(tokens_all, pos_all, reference_points, spatial_shapes, level_start_index)

        outputs = [
            chunk.transpose(1, 2).reshape(batch, -1, height, width)
            for chunk, (height, width) in zip(tokens_all.split(areas.tolist(), dim=1), shapes)
        ]
        for name, lateral_conv, output_conv in zip(self.fpn_in_features, self.lateral_convs, self.output_convs):
            lateral = lateral_conv(features[name])
            upsampled = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output_conv(lateral + upsampled))
        return self.mask_features(outputs[-1]), outputs[: self.num_output_levels]
