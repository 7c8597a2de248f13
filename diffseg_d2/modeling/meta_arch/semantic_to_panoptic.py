"""Panoptic output of the training-free segmenters, made from their semantic scores.

DiffSegmenter, FreeDA and DAAM score every pixel for every class; none of them separates
instances. Their ``panoptic_seg`` is built from the per-pixel argmax: each stuff class
present is one segment (all its pixels), each thing class is split into its connected
regions (8-connectivity), one segment each, and a void class (the "background" of a
user's vocabulary: no category) gets no segment. Segments smaller than ``min_area`` (a
fraction of the image's pixels) are dropped. Pixels of no segment get id 0, which
detectron2's ``COCOPanopticEvaluator`` leaves out of PQ (detectron2's and Mask2Former's
convention).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ...vocabulary import STUFF, THING, VOID

__all__ = ["semantic_to_panoptic"]

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def semantic_to_panoptic(scores: torch.Tensor, roles: Sequence[str],
                         min_area: float) -> Tuple[torch.Tensor, List[Dict]]:
    """detectron2's ``panoptic_seg`` from (K, H, W) class scores.

    Args:
        scores: (K, H, W) scores; a pixel's class is their argmax.
        roles: per class, ``THING`` (split into connected regions), ``STUFF`` (one segment) or
            ``VOID`` (no segment): see ``diffseg_d2.vocabulary.panoptic_roles``.
        min_area: the smallest segment kept, as a fraction of H * W (0 keeps every one).

    Returns:
        ``(ids, segments_info)``: (H, W) int32 segment ids on ``scores``' device (0 = no segment)
        and one ``{"id", "category_id", "isthing", "area"}`` per segment, ids from 1 in the
        order of class, then of the region's first pixel in raster order.
    """
    from scipy import ndimage

    if scores.dim() != 3 or scores.shape[0] != len(roles):
        raise ValueError(f"scores of shape {tuple(scores.shape)} for {len(roles)} classes; expected (K, H, W)")
    unknown = sorted({str(r) for r in roles} - {THING, STUFF, VOID})
    if unknown:
        raise ValueError(f"unknown panoptic roles {unknown}; each class is {THING!r}, {STUFF!r} or {VOID!r}")
    labels = scores.argmax(0).cpu().numpy()
    smallest = min_area * labels.size
    ids = np.zeros(labels.shape, dtype=np.int32)
    segments: List[Dict] = []
    for cls in np.unique(labels).tolist():
        if roles[cls] == VOID:
            continue
        region = labels == cls
        if roles[cls] == THING:
            parts, count = ndimage.label(region, structure=_EIGHT_NEIGHBOURS)
        else:
            parts, count = region.astype(np.int32), 1
        areas = np.bincount(parts.ravel(), minlength=count + 1)
        new_ids = np.zeros(count + 1, dtype=np.int32)  # component -> segment id (0: dropped)
        for part in range(1, count + 1):
            area = int(areas[part])
            if area == 0 or area < smallest:
                continue
            new_ids[part] = len(segments) + 1
            segments.append({"id": int(new_ids[part]), "category_id": int(cls), "isthing": roles[cls] == THING,
                             "area": area})
        ids = np.where(region, new_ids[parts], ids)
    return torch.from_numpy(ids).to(scores.device), segments
