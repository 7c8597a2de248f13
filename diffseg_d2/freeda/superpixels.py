"""Felzenszwalb superpixels and pooling of dense features inside them.

Pooling is exact and never materialises the upsampled feature map: bilinear
upsampling is linear, so the mean of the upsampled features over a superpixel
``s`` equals ``(M @ F)[s] / |s|`` with ``M[s, t]`` the summed bilinear weight of
token ``t`` over the pixels of ``s``. ``M`` has one row per superpixel and one
column per token, and is built by scattering each pixel's four bilinear weights.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..optional_imports import require


def felzenszwalb_superpixels(image: torch.Tensor, scale: float, sigma: float, min_size: int) -> torch.Tensor:
    """Superpixel labels of an RGB image.

    Args:
        image: (3, H, W) RGB in [0, 255].
        scale, sigma, min_size: ``skimage.segmentation.felzenszwalb`` parameters (min_size in pixels).

    Returns:
        (H, W) int64 labels, consecutive from 0.
    """
    segmentation = require("skimage.segmentation", "scikit-image", "FreeDA's superpixels")
    rgb = image.detach().permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    labels = segmentation.felzenszwalb(rgb, scale=float(scale), sigma=float(sigma), min_size=int(min_size))
    # felzenszwalb numbers its segments densely already; make sure of it (cheap).
    _, dense = np.unique(labels, return_inverse=True)
    return torch.from_numpy(dense.reshape(labels.shape).astype(np.int64))


def _bilinear_taps(out_size: int, in_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output position, the two input positions and weights of ``F.interpolate``
    (bilinear, ``align_corners=False``) along one axis: i0, i1 (long) and w1 (weight of i1)."""
    src = (torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = (src - i0).clamp(0, 1)
    return i0, i1, w1


def pooling_matrix(labels: torch.Tensor, grid: Tuple[int, int], num_segments: int,
                   pixel_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``M`` (S, h*w): summed bilinear weights of each feature-grid token over each segment.

    Args:
        labels: (H, W) int64 segment ids in ``[0, num_segments)``.
        grid: ``(h, w)`` of the feature map that is upsampled to (H, W).
        pixel_weights: (H, W) weight of each pixel's upsampled feature (None: 1).

    Rows sum to the segments' pixel counts (their summed pixel weights).
    """
    H, W = labels.shape
    h, w = grid
    y0, y1, wy = _bilinear_taps(H, h)
    x0, x1, wx = _bilinear_taps(W, w)
    seg = labels.reshape(-1).long() * (h * w)
    m = torch.zeros(num_segments * h * w, dtype=torch.float64)
    scale = None if pixel_weights is None else pixel_weights.reshape(-1).to(torch.float64)
    for ys, wy_ in ((y0, 1 - wy), (y1, wy)):
        for xs, wx_ in ((x0, 1 - wx), (x1, wx)):
            token = (ys[:, None] * w + xs[None, :]).reshape(-1)
            weight = (wy_[:, None] * wx_[None, :]).reshape(-1)
            m.index_add_(0, seg + token, weight if scale is None else weight * scale)
    return m.view(num_segments, h * w).float()


def pool_features(features: torch.Tensor, labels: torch.Tensor, num_segments: int,
                  pixel_weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Weighted) sum of bilinearly upsampled features over each segment.

    Args:
        features: (D, h, w) feature map covering the same area as ``labels``.
        labels: (H, W) segment ids.
        pixel_weights: (H, W) weight of each pixel (None: 1 each).

    Returns:
        ``(sums (S, D), weights (S,))``; ``sums / weights`` is the (weighted) mean of
        ``F.interpolate(features, (H, W), mode="bilinear")`` over each segment.
    """
    d, h, w = features.shape
    flat = labels.reshape(-1).cpu()
    weights = None if pixel_weights is None else pixel_weights.cpu().to(torch.float64)
    m = pooling_matrix(labels.cpu(), (h, w), num_segments, weights).to(features.device)
    sums = m @ features.reshape(d, h * w).T.float()
    counts = torch.bincount(flat, weights=None if weights is None else weights.reshape(-1), minlength=num_segments)
    return sums, counts.to(features.device).float()


def token_grid_weights(labels: torch.Tensor, grid: Tuple[int, int], num_segments: int) -> torch.Tensor:
    """Each segment's binary mask bilinearly resized (``align_corners=True``) to the feature grid,
    as FreeDA's reference pools superpixels: ``(S, h*w)``, without building the ``(S, H, W)`` masks.

    That resize samples, for each grid cell, the four pixels around ``i * (H - 1) / (h - 1)``, so
    a cell's weight for segment ``s`` is the summed bilinear weight of those of its pixels in ``s``.
    A segment none of whose pixels is sampled gets an all-zero row.
    """
    H, W = labels.shape
    h, w = grid

    def taps(out_size: int, in_size: int):
        if out_size == 1:
            src = torch.zeros(1, dtype=torch.float64)
        else:
            src = torch.arange(out_size, dtype=torch.float64) * ((in_size - 1) / (out_size - 1))
        i0 = src.floor().long().clamp(0, in_size - 1)
        i1 = (i0 + 1).clamp(max=in_size - 1)
        return i0, i1, src - i0

    y0, y1, wy = taps(h, H)
    x0, x1, wx = taps(w, W)
    flat = labels.reshape(-1).long().cpu()
    cell = torch.arange(h * w)
    m = torch.zeros(num_segments * h * w, dtype=torch.float64)
    for ys, wy_ in ((y0, 1 - wy), (y1, wy)):
        for xs, wx_ in ((x0, 1 - wx), (x1, wx)):
            pixel = (ys[:, None] * W + xs[None, :]).reshape(-1)
            weight = (wy_[:, None] * wx_[None, :]).reshape(-1)
            m.index_add_(0, flat[pixel] * (h * w) + cell, weight)
    return m.view(num_segments, h * w).float()


def resize_short_side(image: torch.Tensor, short_side: int, long_cap: int, backend: str) -> torch.Tensor:
    """Resize keeping the aspect ratio to a short side of ``short_side`` (the long side at most
    ``long_cap``), sizes rounded as mmcv rounds them: (3, H, W) RGB in [0, 255] -> (3, h, w) with
    8-bit values, as float.

    Args:
        backend: "cv2" (OpenCV's bilinear on 8-bit values, what the reference's mmseg pipeline runs)
            or "torch" (torch's bilinear, then rounded).
    """
    h, w = image.shape[-2:]
    scale = min(long_cap / max(h, w), short_side / min(h, w))
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    if backend == "cv2":
        cv2 = require("cv2", "opencv-python-headless", "FreeDA's reference resize (FREEDA.RESIZE cv2)")
        rgb = image.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        out = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(out).permute(2, 0, 1).float().to(image.device)
    if backend != "torch":
        raise ValueError(f"MODEL.DIFFSEG.FREEDA.RESIZE must be 'cv2' or 'torch', not {backend!r}.")
    out = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255)
