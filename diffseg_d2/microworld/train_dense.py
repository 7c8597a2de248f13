"""Train the micro-world dense image encoder (the stand-in for DINOv2) on CPU, saved as a timm folder.

The model is timm's DINOv2 ViT (``vit_small_patch14_dinov2``) at micro size: patch
8 on 64x64 scenes (an 8x8 token grid), layer scale starting at 1 (DINOv2's 1e-5
learns too slowly for a few hundred steps), built with
``dynamic_img_size`` so any multiple of 8 works. The result is a timm local folder
(``config.json`` with the sizes, ``model.safetensors``) that
``DenseDINO.from_weights(folder)`` opens like the real DINOv2.

**Objective: object-level contrastive learning on patches, with the world's
instance masks (an auxiliary supervised signal, listed in training.json).**
DINOv2's self-distillation needs far more compute than a few CPU minutes, so
instead each scene gives two random resized crops (with flips; no colour
changes: colour names classes); every patch is labelled by the region covering
most of it (background or one object instance, from the masks) and a few
patches per region and view are kept. A supervised-contrastive loss (InfoNCE
with several positives, temperature ``temperature``) on the L2-normalised final
patch tokens pulls together patches of the same object instance, across the two
views, and background patches of all scenes; it pushes objects away from the
background and from the other objects of their own scene. Objects of different
scenes are left out of each other's denominator: nothing names a class, so
whether two objects are the same kind of thing is left to what the network sees
(colour, shape). (Pushing them apart, as instance discrimination does, scattered
the background and the classes across scenes: nearest-prototype accuracy fell
below the all-background baseline.) The loss is on the tokens that
``DenseDINO`` returns (no projection head), so those are the features trained
to separate.

Interrupted runs resume from ``train_state.pt`` (``torch.load(weights_only=True)``);
every random draw is a function of ``(seed, step)``, so a resumed run gives the
same weights as an uninterrupted one at the same thread count.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optional_imports import require
from .scenes import SPLITS, render_scene
from .train_state import (
    STATE_FILE,
    resume_model,
    save_model_state,
    scene_tensor,
    step_generator,
    train_scene,
    warmup_cosine_lr,
    write_text,
)

logger = logging.getLogger(__name__)

ARCHITECTURE = "vit_small_patch14_dinov2"
# At most this many regions per scene: the background and 3 objects.
MAX_REGIONS = 4
# A patch joins the loss when one region covers at least this share of it.
MIN_PATCH_PURITY = 0.6
# First train-split seed of the scenes (other trainers start elsewhere).
SCENE_SEED_OFFSET = 500_000


@dataclass
class DenseTrainingSettings:
    """Everything that decides the trained dense encoder (saved in training.json)."""

    seed: int = 0
    steps: int = 600
    # Scenes per step (two views each).
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    temperature: float = 0.1
    # Patches drawn per region and view.
    patches_per_region: int = 4
    # Random resized crops keep this share of the scene's area at least.
    min_crop_area: float = 0.35
    # Architecture (timm model_args).
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    checkpoint_every: int = 100


def model_args(settings: DenseTrainingSettings) -> Dict:
    """timm ``model_args`` of the encoder (written into config.json)."""
    return dict(img_size=64, patch_size=settings.patch_size, embed_dim=settings.embed_dim, depth=settings.depth,
                num_heads=settings.num_heads, init_values=1.0)


def build_dense_encoder(settings: DenseTrainingSettings) -> nn.Module:
    """The randomly initialised timm ViT (seeded by ``settings.seed``)."""
    timm = require("timm", "timm", "The micro dense encoder")
    torch.manual_seed(settings.seed)
    return timm.create_model(ARCHITECTURE, pretrained=False, dynamic_img_size=True, **model_args(settings))


def save_dense_encoder(model: nn.Module, settings: DenseTrainingSettings, folder: Path) -> None:
    """Write the timm local folder (config.json + model.safetensors), replacing files atomically."""
    timm_hub = require("timm.models._hub", "timm", "The micro dense encoder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    # Not DINOv2's released weights: say so in the folder's pretrained_cfg (mean/std stay, DenseDINO reads them).
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(tag="microworld", input_size=[3, 64, 64], license=None)
    model.pretrained_cfg = cfg
    timm_hub.save_for_hf(model, str(staging), model_args=model_args(settings), safe_serialization=True)
    for name in ("config.json", "model.safetensors"):
        os.replace(staging / name, folder / name)
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------- data
def training_batch(settings: DenseTrainingSettings, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scenes of one step: images (B, 3, 64, 64) in [0, 255] and region one-hots (B, MAX_REGIONS, 64, 64)."""
    images, regions = [], []
    for i in range(settings.batch):
        scene = train_scene(SCENE_SEED_OFFSET + step * settings.batch + i)
        images.append(scene_tensor(scene))
        instance = torch.from_numpy(scene.instance_label()).long()
        regions.append(F.one_hot(instance, MAX_REGIONS).permute(2, 0, 1).float())
    return torch.stack(images), torch.stack(regions)


def random_views(images: torch.Tensor, regions: torch.Tensor, min_area: float,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One random resized crop (with a random horizontal flip) of each scene, same size.

    Args:
        images: (B, 3, H, W); regions: (B, R, H, W) one-hot.

    Returns:
        The cropped images (bilinear) and region shares (bilinear on the one-hots), same shapes.
    """
    b = images.shape[0]
    area = min_area + (1 - min_area) * torch.rand(b, generator=generator)
    aspect = torch.exp((torch.rand(b, generator=generator) * 2 - 1) * math.log(4 / 3))
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shares = F.grid_sample(regions, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return view, shares


def pick_patches(shares: torch.Tensor, patch: int, per_region: int, generator: torch.Generator):
    """Patches that enter the loss: up to ``per_region`` random pure patches of each region.

    Args:
        shares: (B, R, H, W) region shares of each pixel of a view.

    Returns:
        ``(image index, token index, region index)``, each (M,) long.
    """
    frac = F.avg_pool2d(shares, patch).flatten(2)  # (B, R, N)
    purity, label = frac.max(1)  # (B, N)
    b, r, n = frac.shape
    valid = (label[:, None, :] == torch.arange(r)[None, :, None]) & (purity[:, None, :] >= MIN_PATCH_PURITY)
    score = torch.rand(b, r, n, generator=generator).masked_fill(~valid, -1.0)
    top, token = score.topk(min(per_region, n), dim=-1)  # (B, R, k)
    keep = top >= 0
    image = torch.arange(b)[:, None, None].expand_as(token)
    region = torch.arange(r)[None, :, None].expand_as(token)
    return image[keep], token[keep], region[keep]


def supervised_contrastive(z: torch.Tensor, ids: torch.Tensor, temperature: float,
                           ignore: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE with every other sample of the same id as a positive (SupCon's "L_out").

    Args:
        z: (M, D) L2-normalised features; ids: (M,) long. Anchors without a positive are skipped.
        ignore: (M, M) bool, pairs left out of the denominator (neither pulled nor pushed).
    """
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask if ignore is None else self_mask | ignore, float("-inf"))
    pos = (ids[:, None] == ids[None, :]) & ~self_mask
    log_prob = logits.log_softmax(1).masked_fill(~pos, 0.0)
    count = pos.sum(1)
    has = count > 0
    return -(log_prob.sum(1)[has] / count[has]).mean()


def contrast_groups(image: torch.Tensor, region: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positives and ignored pairs of the patch loss, from each patch's scene and region (0 = background).

    Background patches of every scene share one id (the background is one kind of thing);
    each object instance has its own. Objects of different scenes are neither positives nor
    negatives (``ignore``): nothing says whether they are the same kind of object.

    Returns:
        ``(ids (M,), ignore (M, M) bool)``.
    """
    ids = torch.where(region == 0, torch.zeros_like(region), 1 + image * MAX_REGIONS + region)
    is_object = region > 0
    ignore = is_object[:, None] & is_object[None, :] & (image[:, None] != image[None, :])
    return ids, ignore


def _normalise(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1) * 255.0
    return (images - mean) / std


def _param_groups(model: nn.Module, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ---------------------------------------------------------------------- training
def train_micro_dense(output: Path, settings: DenseTrainingSettings, resume: bool = False, command: str = "") -> Path:
    """Train (or resume) the dense encoder and write its timm folder into ``output``; returns ``output``.

    Deterministic given ``settings`` and the torch thread count (recorded in training.json).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = build_dense_encoder(settings)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr)
    start, history = resume_model(output, resume, model, opt, {"loss": []})
    if start:
        logger.info("resuming the micro dense encoder from step %d", start)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, settings.steps):
        generator = step_generator(settings.seed, step)
        images, regions = training_batch(settings, step)
        feats, images_of, regions_of = [], [], []
        views = [random_views(images, regions, settings.min_crop_area, generator) for _ in range(2)]
        tokens = model.forward_features(_normalise(model, torch.cat([v for v, _ in views])))[:, prefix:]
        tokens = F.normalize(tokens, dim=-1).view(2, settings.batch, -1, tokens.shape[-1])
        for v, (_, shares) in enumerate(views):
            image, token, region = pick_patches(shares, settings.patch_size, settings.patches_per_region, generator)
            feats.append(tokens[v, image, token])
            images_of.append(image)
            regions_of.append(region)
        ids, ignore = contrast_groups(torch.cat(images_of), torch.cat(regions_of))
        loss = supervised_contrastive(torch.cat(feats), ids, settings.temperature, ignore)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(settings, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            logger.info("micro dense step %d/%d loss %.4f (%.1f s)", step + 1, settings.steps,
                        float(np.mean(history["loss"][-50:])), time.perf_counter() - t0)
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            save_model_state(output, step + 1, model, opt, history)
    model.eval()
    save_dense_encoder(model, settings, output)
    summary = {
        "model": f"micro dense encoder (timm {ARCHITECTURE}, patch {settings.patch_size}, standing in for DINOv2)",
        "settings": asdict(settings),
        "seed": settings.seed,
        "torch_threads": torch.get_num_threads(),
        "command": command,
        "final_losses": {"patch_contrastive": float(np.mean(history["loss"][-50:])) if history["loss"] else None},
        "aux_signals": ["the world's instance masks: patches of the same object instance (or of the background) "
                        "of a scene are positives of a patch-level contrastive loss"],
        "train_scene_seeds": f"train split, {settings.steps * settings.batch} scenes from {SCENE_SEED_OFFSET}",
    }
    write_text(output / "training.json", json.dumps(summary, indent=2))
    (output / STATE_FILE).unlink(missing_ok=True)
    return output


# ---------------------------------------------------------------------- quality check
@torch.no_grad()
def _pixel_features(dino, scenes) -> torch.Tensor:
    """(N, D, H, W) L2-normalised features, bilinearly upsampled to the scene size."""
    out = []
    for i in range(0, len(scenes), 64):
        chunk = scenes[i : i + 64]
        images = torch.stack([scene_tensor(s) for s in chunk])
        f = dino(images)
        f = F.interpolate(f, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out.append(F.normalize(f, dim=1))
    return torch.cat(out)


def _nearest_prototype(train_feats, train_labels, val_feats, val_labels, num_classes) -> Dict[str, float]:
    d = train_feats.shape[1]
    flat = train_feats.permute(0, 2, 3, 1).reshape(-1, d)
    protos = torch.zeros(num_classes, d).index_add_(0, train_labels.reshape(-1), flat)
    protos = F.normalize(protos, dim=1)
    pred = torch.einsum("ndhw,kd->nkhw", val_feats, protos).argmax(1)
    acc = float((pred == val_labels).float().mean())
    ious = []
    for k in range(num_classes):
        inter = ((pred == k) & (val_labels == k)).sum()
        union = ((pred == k) | (val_labels == k)).sum()
        if union > 0:
            ious.append(float(inter) / float(union))
    return {"pixel_acc": acc, "miou": float(np.mean(ious))}


@torch.no_grad()
def evaluate_micro_dense(weights: str, split: str = "val", count: int = 200,
                         prototype_scenes: int = 200) -> Dict[str, float]:
    """Nearest-prototype segmentation with the encoder's features, through ``DenseDINO``.

    Class prototypes are the mean feature of each class's pixels over the first
    ``prototype_scenes`` train scenes; each pixel of ``count`` scenes of ``split`` takes
    the class of the nearest prototype (cosine). Reported: pixel accuracy and mIoU over
    background + 16 colour-shape classes (``colour_shape_*``) and background + 4 shapes
    (``shape_*``), and ``instance_assign_acc``: within each scene, the share of pixels
    nearest to the mean feature of their own region (background or instance) among the
    scene's regions (how well the features separate objects from each other and the
    background). ``all_background_acc`` is the trivial baseline's pixel accuracy.
    """
    from ..pretrained.dino import DenseDINO

    dino = DenseDINO.from_weights(str(weights))
    lo, hi = SPLITS[split]
    val = [render_scene(s) for s in range(lo, min(hi, lo + count))]
    proto = [render_scene(s) for s in range(SPLITS["train"][0], SPLITS["train"][0] + prototype_scenes)]
    val_f, proto_f = _pixel_features(dino, val), _pixel_features(dino, proto)
    out: Dict[str, float] = {}
    for name, labeller, k in (("colour_shape", "colour_shape_label", 17), ("shape", "shape_label", 5)):
        tl = torch.from_numpy(np.stack([getattr(s, labeller)() for s in proto])).long()
        vl = torch.from_numpy(np.stack([getattr(s, labeller)() for s in val])).long()
        for metric, value in _nearest_prototype(proto_f, tl, val_f, vl, k).items():
            out[f"{name}_{metric}"] = value
    correct = total = 0
    for f, s in zip(val_f, val):
        inst = torch.from_numpy(s.instance_label()).long()
        onehot = F.one_hot(inst, MAX_REGIONS).permute(2, 0, 1).float()  # (R, H, W)
        present = onehot.flatten(1).sum(1) > 0
        means = F.normalize(torch.einsum("dhw,rhw->rd", f, onehot)[present], dim=1)
        pred = torch.nonzero(present)[:, 0][torch.einsum("dhw,rd->rhw", f, means).argmax(0)]
        correct += int((pred == inst).sum())
        total += inst.numel()
    out["instance_assign_acc"] = correct / total
    out["all_background_acc"] = float(np.mean([(s.instance_label() == 0).mean() for s in val]))
    out["num_scenes"] = len(val)
    return out
