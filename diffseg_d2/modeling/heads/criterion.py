"""Set-prediction losses of the mask head, and the caption grounding loss.

``SetCriterion`` matches predictions to targets (Hungarian) and scores the
matched pairs: class cross-entropy over the current vocabulary plus
no-object, and mask BCE + dice on points sampled where the prediction is
uncertain. ``caption_grounding_loss`` is the caption-mode objective: mask
embeddings of an image should match the nouns of its own caption better than
those of the other captions of the batch.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .matcher import point_sample, uncertain_point_coords

__all__ = ["SetCriterion", "caption_grounding_loss"]

LOSS_NAMES = ("loss_ce", "loss_mask", "loss_dice")
_AUX_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def _uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """A logit near 0 is the least certain: score -|logit| (shape kept)."""
    return -logits.abs()


def _global_num_masks(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Target masks per process, averaged over processes (all-reduce) so every process divides alike; >= 1.

    Returns:
        float scalar tensor on ``device``.
    """
    count = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Hungarian-matched class and mask losses, on the final and (optionally) every auxiliary prediction."""

    def __init__(
        self,
        *,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        """
        Args:
            matcher: maps (outputs, targets) to per-image (query_idx, target_idx),
                e.g. ``HungarianMatcher``.
            weight_dict: weights of "loss_ce", "loss_mask", "loss_dice" (and any
                other loss the caller adds); auxiliary losses "<name>_<i>" take
                the weight of "<name>". Used by ``weighted_total`` only.
            eos_coef: class weight of no-object in the cross-entropy (the
                others weigh 1): most queries match nothing.
            num_points: points per matched mask for the mask losses.
            oversample_ratio: uniform candidates per kept point for the uncertain-point sampling.
            importance_sample_ratio: share of the points chosen by uncertainty.
            deep_supervision: also score ``outputs["aux_outputs"]``.
        """
        super().__init__()
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision

    def class_loss(self, pred_logits: torch.Tensor, targets: List[Dict[str, torch.Tensor]], indices) -> torch.Tensor:
        """Weighted cross-entropy over K + 1 classes; unmatched queries are no-object.

        Args:
            pred_logits: (B, Q, K + 1); K is read from it (the vocabulary may change per call).

        Returns:
            scalar, weighted mean over all B * Q queries (PyTorch's weighted mean:
            divided by the sum of the weights of the targets).
        """
        num_classes = pred_logits.shape[-1] - 1
        classes = torch.full(pred_logits.shape[:2], num_classes, dtype=torch.long, device=pred_logits.device)
        for image, (query_idx, target_idx) in enumerate(indices):
            labels = targets[image]["labels"].to(pred_logits.device)
            classes[image, query_idx.to(pred_logits.device)] = labels[target_idx.to(labels.device)]
        weight = torch.ones(num_classes + 1, device=pred_logits.device, dtype=pred_logits.dtype)
        weight[-1] = self.eos_coef
        return F.cross_entropy(pred_logits.transpose(1, 2), classes, weight=weight)

    def mask_losses(
        self,
        pred_masks: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        indices,
        num_masks: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Point-sampled BCE and dice of the matched masks, summed and divided by ``num_masks``.

        Args:
            pred_masks: (B, Q, h, w) logits.
            num_masks: scalar, target masks in the global batch (>= 1).

        Returns:
            "loss_mask", "loss_dice" scalars.
        """
        chosen, target_points = [], []
        for image, (query_idx, target_idx) in enumerate(indices):
            if query_idx.numel():
                chosen.append(pred_masks[image, query_idx.to(pred_masks.device)])
        if not chosen:
            # Nothing matched anywhere: zero, but still a function of the predictions so
            # every process runs the same backward graph.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        matched = torch.cat(chosen)[:, None]  # (M, 1, h, w)
        with torch.no_grad():
            coords = uncertain_point_coords(
                matched.float(), _uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )  # (M, P, 2)
            start = 0
            for image, (query_idx, target_idx) in enumerate(indices):
                count = query_idx.numel()
                if count == 0:
                    continue
                # Target masks may have another size than the predictions; normalised points line them up.
                masks = targets[image]["masks"].to(device=pred_masks.device)[target_idx.to(pred_masks.device)]
                target_points.append(point_sample(masks[:, None].float(), coords[start : start + count])[:, 0])
                start += count
            labels = torch.cat(target_points)  # (M, P)
        logits = point_sample(matched, coords.to(matched.dtype))[:, 0]  # (M, P)
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(1)
        probs = logits.sigmoid()
        dice = 1.0 - (2.0 * (probs * labels).sum(-1) + 1.0) / (probs.sum(-1) + labels.sum(-1) + 1.0)
        return {"loss_mask": bce.sum() / num_masks, "loss_dice": dice.sum() / num_masks}

    def _losses_of(self, outputs: Dict[str, torch.Tensor], targets, num_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        indices = self.matcher({"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}, targets)
        losses = {"loss_ce": self.class_loss(outputs["pred_logits"], targets, indices)}
        losses.update(self.mask_losses(outputs["pred_masks"], targets, indices, num_masks))
        return losses

    def forward(self, outputs: Dict[str, object], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, h, w), and
                optionally "aux_outputs", a list of dicts with the same keys.
            targets: per image "labels" (N_i,) long in [0, K) and "masks" (N_i, H, W).

        Returns:
            unweighted scalar losses "loss_ce", "loss_mask", "loss_dice" and,
            with deep supervision, "loss_ce_<i>", ... for aux output i.
        """
        # Once per call (every output shares the targets and the vocabulary), before matching.
        num_classes = outputs["pred_logits"].shape[-1] - 1
        for target in targets:
            labels = target["labels"]
            if labels.numel() and int(labels.max()) >= num_classes:
                raise ValueError(
                    f"Target label {int(labels.max())} is outside the {num_classes} classes of pred_logits."
                )
        num_masks = _global_num_masks(targets, outputs["pred_masks"].device)
        losses = self._losses_of(outputs, targets, num_masks)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_losses = self._losses_of(aux, targets, num_masks)
                losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses

    def weight_of(self, name: str) -> float:
        """The weight of loss ``name`` ("<name>_<i>" takes the weight of "<name>").

        Raises:
            KeyError: for a loss with no weight, rather than silently dropping it.
        """
        weight = self.weight_dict.get(name)
        if weight is None:
            match = _AUX_SUFFIX.match(name)
            weight = self.weight_dict.get(match.group(1)) if match else None
        if weight is None:
            raise KeyError(f"Loss {name!r} has no weight in weight_dict {sorted(self.weight_dict)}.")
        return weight

    def weighted(self, losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Each loss times its weight (what a detectron2 meta-architecture returns in training)."""
        return {name: value * self.weight_of(name) for name, value in losses.items()}

    def weighted_total(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of ``losses`` weighted by ``weight_dict`` (see ``weight_of``)."""
        if not losses:
            raise ValueError("weighted_total got no losses.")
        return sum(self.weighted(losses).values())


def caption_grounding_loss(
    query_embeds: torch.Tensor, noun_embeds: List[torch.Tensor], logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric image-caption contrastive loss on a query-to-noun grounding score (ODISE's).

    With ``s_qn`` the scaled cosine similarity of query q of image i and noun n of caption j,
    the grounding score of (i, j) is the mean over the nouns of ``sum_q softmax_q(s_qn) s_qn``
    (a soft maximum over the queries). Cross-entropy pulls each image to its own caption
    (rows: image -> caption) and each caption to its own image (columns), averaged.

    Args:
        query_embeds: (B, Q, E) L2-normalised mask embeddings.
        noun_embeds: B tensors (N_i, E), L2-normalised embeddings of the nouns
            of image i's caption; images with N_i = 0 are left out.
        logit_scale: scalar temperature, already exponentiated.

    Returns:
        scalar; a zero attached to the graph when fewer than 2 images have nouns.
    """
    if len(noun_embeds) != query_embeds.shape[0]:
        raise ValueError(f"Got {len(noun_embeds)} noun sets for a batch of {query_embeds.shape[0]} images.")
    kept = [i for i, nouns in enumerate(noun_embeds) if nouns.shape[0] > 0]
    if len(kept) < 2:
        # No negatives to contrast with; zero that still reaches the inputs (no unused-parameter errors under DDP).
        return query_embeds.sum() * 0.0 + logit_scale * 0.0
    queries = query_embeds[kept]  # (M, Q, E)
    columns = []
    for i in kept:
        sims = logit_scale * torch.einsum("mqe,ne->mqn", queries, noun_embeds[i].to(queries.dtype))
        columns.append((sims.softmax(dim=1) * sims).sum(dim=1).mean(dim=1))  # (M,)
    logits = torch.stack(columns, dim=1)  # (M images, M captions)
    own = torch.arange(len(kept), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, own) + F.cross_entropy(logits.T, own))
