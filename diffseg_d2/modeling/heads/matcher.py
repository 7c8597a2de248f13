"""Hungarian matching of predicted masks to ground-truth segments, and the point sampling it shares with the loss.

Mask costs are measured on a random set of points instead of every pixel:
cheap, and unbiased for the mean over the image. The point helpers match
detectron2's PointRend ones (``point_sample``,
``get_uncertain_point_coords_with_randomness``); they live here because
importing ``detectron2.projects.point_rend`` pulls in OpenCV, which this
package does not require.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...optional_imports import require

__all__ = [
    "HungarianMatcher",
    "point_sample",
    "uncertain_point_coords",
    "pairwise_sigmoid_ce",
    "pairwise_dice",
]


def point_sample(maps: torch.Tensor, coords: torch.Tensor, **grid_sample_kwargs) -> torch.Tensor:
    """Bilinear samples of maps at normalised points.

    Args:
        maps: (N, C, H, W).
        coords: (N, P, 2) (x, y) in [0, 1] over the map's extent (pixel
            centres at (i + 0.5) / W, with ``align_corners=False``).
        grid_sample_kwargs: passed to ``F.grid_sample`` (default bilinear,
            zero padding, ``align_corners=False``).

    Returns:
        (N, C, P).
    """
    grid_sample_kwargs.setdefault("align_corners", False)
    return F.grid_sample(maps, coords[:, :, None, :] * 2.0 - 1.0, **grid_sample_kwargs)[..., 0]


def uncertain_point_coords(
    logits: torch.Tensor,
    uncertainty: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Points biased towards where the prediction is uncertain (PointRend's training sampler).

    ``oversample_ratio * num_points`` uniform candidates are drawn; the
    ``importance_sample_ratio * num_points`` most uncertain of them are kept
    and the rest of the budget is filled with fresh uniform points, so every
    region keeps some coverage.

    Args:
        logits: (N, 1, H, W) mask logits.
        uncertainty: maps sampled logits (N, 1, P') to scores (N, 1, P'),
            higher = more uncertain. Scored on the sampled values, not on the
            coarse map, so a point between a +1 and a -1 cell counts as uncertain.
        num_points: P.
        oversample_ratio: >= 1.
        importance_sample_ratio: in [0, 1].
        generator: optional random generator.

    Returns:
        (N, P, 2) (x, y) in [0, 1].
    """
    if oversample_ratio < 1 or not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"Need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got {oversample_ratio}, "
            f"{importance_sample_ratio}."
        )
    num_masks = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_candidates, 2, device=logits.device, generator=generator)
    scores = uncertainty(point_sample(logits, candidates))[:, 0]  # (N, P')
    num_uncertain = int(importance_sample_ratio * num_points)
    keep = scores.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    chosen = torch.gather(candidates, 1, keep[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        fresh = torch.rand(num_masks, num_random, 2, device=logits.device, generator=generator)
        chosen = torch.cat([chosen, fresh], dim=1)
    return chosen


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    Args:
        logits: (Q, P) point logits.
        targets: (N, P) point labels in [0, 1].

    Returns:
        (Q, N) cost, mean over the P points.
    """
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x): two matrix products instead of a (Q, N, P) tensor.
    positive = F.softplus(-logits)
    negative = F.softplus(logits)
    return (positive @ targets.T + negative @ (1.0 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss (1 - smoothed dice coefficient) of every prediction against every target.

    Args:
        logits: (Q, P) point logits.
        targets: (N, P) point labels in [0, 1].

    Returns:
        (Q, N) cost in [0, 1].
    """
    probs = logits.sigmoid()
    overlap = 2.0 * probs @ targets.T
    total = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (overlap + 1.0) / (total + 1.0)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a class + mask + dice cost."""

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        """
        Args:
            cost_class: weight of the class cost (minus the predicted probability of the target class).
            cost_mask: weight of the point-sampled sigmoid cross-entropy.
            cost_dice: weight of the point-sampled dice loss.
            num_points: uniform random points per image shared by its predictions and targets.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("At least one of cost_class, cost_mask, cost_dice must be non-zero.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        labels: torch.Tensor,
        target_masks: torch.Tensor,
        coords: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted matching cost of one image.

        Args:
            pred_logits: (Q, K + 1) class logits, last = no object.
            pred_masks: (Q, h, w) mask logits.
            labels: (N,) long in [0, K).
            target_masks: (N, H, W) bool or float.
            coords: (P, 2) (x, y) in [0, 1], the points both mask sets are read at.

        Returns:
            (Q, N) float32 cost.
        """
        cost_class = -pred_logits.float().softmax(-1)[:, labels]  # (Q, N)
        pred_points = point_sample(pred_masks[:, None].float(), coords[None].expand(pred_masks.shape[0], -1, -1))
        target_points = point_sample(
            target_masks[:, None].to(torch.float32), coords[None].expand(target_masks.shape[0], -1, -1)
        )
        pred_points, target_points = pred_points[:, 0], target_points[:, 0]  # (Q, P), (N, P)
        return (
            self.cost_class * cost_class
            + self.cost_mask * pairwise_sigmoid_ce(pred_points, target_points)
            + self.cost_dice * pairwise_dice(pred_points, target_points)
        )

    @torch.no_grad()
    def forward(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        generator: Optional[torch.Generator] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K + 1), last index = no object, and
                "pred_masks" (B, Q, h, w) mask logits.
            targets: per image "labels" (N_i,) long in [0, K) and "masks"
                (N_i, H, W) bool or float.
            generator: optional random generator for the points; per image with
                targets, ``torch.rand(num_points, 2)`` is drawn, in batch order.

        Returns:
            per image (query_idx, target_idx), int64 CPU tensors of length
            min(Q, N_i), query_idx ascending; empty for N_i = 0.
        """
        linear_sum_assignment = require("scipy.optimize", "scipy", "Hungarian matching").linear_sum_assignment

        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        indices = []
        for image, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            coords = torch.rand(self.num_points, 2, device=pred_masks.device, generator=generator)
            cost = self.cost_matrix(
                pred_logits[image], pred_masks[image], labels, target["masks"].to(pred_masks.device), coords
            )
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"Non-finite matching cost for image {image} of the batch: the predicted logits or masks "
                    "contain NaN/inf (diverged training or a bad input)."
                )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
