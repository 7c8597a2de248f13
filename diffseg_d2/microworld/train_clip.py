"""Train the micro-world CLIP on CPU, saved as an open_clip local folder.

The model is an open_clip ``CLIP``: a ViT image tower for 64x64 input (patch 8) and
a causal text transformer over the real CLIP BPE vocabulary (context 77), as in
``build_tiny_open_clip``; ``OpenCLIP.from_weights(folder, templates)`` loads the
result like a released CLIP. Its image tower pools with the class token, as
CLIP's does (average pooling learnt shapes several times more slowly here).

**Data**, rendered on the fly from the train seed range
(``diffseg_d2.microworld.scenes``), per step:

- whole scenes, each with one text: its caption (object order shuffled half the
  time), one of its objects (``"red circle"``) or one of its shapes (``"circle"``),
  put into a prompt template (:data:`TRAIN_TEMPLATES`, a superset of
  ``MODEL.DIFFSEG.CLIP.TEMPLATES``) so that class prompts work zero-shot;
- object crops: a square around one object's box (the world's boxes: an
  auxiliary signal, listed in ``training.json``), with its colour-shape name or
  its shape name.

**Loss**: symmetric InfoNCE with several positives. A text is a positive of every
image it describes truthfully (``"a photo of a circle."`` of every image holding a
circle; a whole caption only of images holding exactly its objects), read from
the captions' object lists; the target distribution is uniform over the positives.
The same loss, weighted by ``dense_weight``, is applied to the image's mean
projected patch token (what ``OpenCLIP.encode_dense`` returns, averaged), so that
mask-pooled dense features are CLIP embeddings of their region (ODISE's
mask-pooled classifier).

The folder holds ``open_clip_config.json``, ``open_clip_model.safetensors``
(half precision: nearly all of it is the 49408-row token table, of which only
the micro-world's few words are trained) and ``training.json``. Interrupted runs
resume from ``train_state.pt`` (``torch.load(weights_only=True)``); every random
draw is a function of ``(seed, step)``, so a resumed run gives the same weights
as an uninterrupted one at the same thread count.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optional_imports import require
from ..paths import write_atomically
from .scenes import COLOURS, SHAPES, SPLITS, Scene, render_scene
from .train_state import (
    STATE_FILE,
    resume_model,
    save_model_state,
    scene_tensor,
    train_scene,
    warmup_cosine_lr,
    write_text,
)

logger = logging.getLogger(__name__)

# Prompt templates of training texts: MODEL.DIFFSEG.CLIP.TEMPLATES, FreeDA's query templates and two plain ones.
TRAIN_TEMPLATES: Tuple[str, ...] = (
    "a {}",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photograph of a {}.",
    "there is a {} in the scene.",
    "a picture of a {}.",
)
# The evaluation templates (MODEL.DIFFSEG.CLIP.TEMPLATES' default).
EVAL_TEMPLATES: Tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.", "a photograph of a {}.")
# CLIP's pixel normalisation (written into the folder's preprocess_cfg and used in training).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# First train-split seed of the scenes (other trainers start elsewhere).
SCENE_SEED_OFFSET = 300_000
# A text's meaning: the (colour or None, shape) pairs it names, and whether it names all of the image.
TextSpec = Tuple[Tuple[Tuple[Optional[str], str], ...], bool]


@dataclass
class ClipTrainingSettings:
    """Everything that decides the trained micro CLIP (saved in training.json)."""

    seed: int = 0
    steps: int = 2400
    # Whole scenes and object crops per step (each with one text).
    scenes_per_step: int = 64
    crops_per_step: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    # Weight of the same loss on the mean projected patch token.
    dense_weight: float = 0.5
    # Architecture (open_clip CLIP config).
    embed_dim: int = 64
    vision_width: int = 96
    vision_layers: int = 3
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    checkpoint_every: int = 100


def model_config(settings: ClipTrainingSettings) -> Dict:
    """open_clip ``model_cfg`` of the micro CLIP."""
    return {
        "embed_dim": settings.embed_dim,
        "vision_cfg": {
            "image_size": 64, "layers": settings.vision_layers, "width": settings.vision_width,
            "head_width": 32, "patch_size": settings.patch_size,
        },
        "text_cfg": {
            "context_length": 77, "vocab_size": 49408, "width": settings.text_width, "heads": 4,
            "layers": settings.text_layers,
        },
    }


# ---------------------------------------------------------------------- data
def object_crop(scene: Scene, index: int, margin: int) -> torch.Tensor:
    """A square crop around ``scene.objects[index]``'s box with ``margin`` pixels, resized to the scene size.

    Returns:
        (3, S, S) float RGB in [0, 255].
    """
    size = scene.image.shape[0]
    x0, y0, x1, y1 = scene.objects[index].bbox
    side = min(size, max(x1 - x0, y1 - y0) + 2 * margin)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left = int(np.clip(cx - side // 2, 0, size - side))
    top = int(np.clip(cy - side // 2, 0, size - side))
    crop = torch.from_numpy(scene.image[top : top + side, left : left + side]).permute(2, 0, 1).float()
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 255)


def training_batch(settings: ClipTrainingSettings, step: int):
    """The images, texts and meanings of one step (a function of ``(seed, step)`` only).

    Returns:
        ``(images (B, 3, 64, 64) in [0, 255], texts, text specs, image contents)``; an
        image's content is the set of ``(colour, shape)`` pairs it shows.
    """
    rng = np.random.default_rng((settings.seed, step))
    images, texts, specs, contents = [], [], [], []

    def add_text(names: Sequence[Tuple[Optional[str], str]], whole: bool) -> None:
        words = [f"{c} {s}" if c else s for c, s in names]
        phrase = " and a ".join(words) if len(words) <= 2 else ", a ".join(words[:-1]) + " and a " + words[-1]
        template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
        texts.append(template.format(phrase))
        specs.append((tuple(names), whole))

    scenes = [train_scene(SCENE_SEED_OFFSET + step * settings.scenes_per_step + i)
              for i in range(settings.scenes_per_step)]
    for scene in scenes:
        pairs = [(o.colour, o.shape) for o in scene.objects]
        images.append(scene_tensor(scene))
        contents.append(frozenset(pairs))
        kind = rng.random()
        if kind < 0.4:
            order = rng.permutation(len(pairs)) if rng.random() < 0.5 else np.arange(len(pairs))
            add_text([pairs[j] for j in order], whole=True)
        elif kind < 0.8:
            add_text([pairs[int(rng.integers(len(pairs)))]], whole=False)
        else:
            add_text([(None, pairs[int(rng.integers(len(pairs)))][1])], whole=False)
    for i in range(settings.crops_per_step):
        # Crops come from the same scenes (rendering costs a fifth of a step), of a random object.
        scene = scenes[i % len(scenes)] if scenes else train_scene(SCENE_SEED_OFFSET + step + i)
        j = int(rng.integers(len(scene.objects)))
        obj = scene.objects[j]
        images.append(object_crop(scene, j, margin=int(rng.integers(2, 9))))
        contents.append(frozenset([(obj.colour, obj.shape)]))
        add_text([(obj.colour, obj.shape)] if rng.random() < 0.7 else [(None, obj.shape)], whole=False)
    return torch.stack(images), texts, specs, contents


def positives(specs: Sequence[TextSpec], contents: Sequence[frozenset]) -> torch.Tensor:
    """(images, texts) bool: whether each text describes each image truthfully."""
    out = torch.zeros(len(contents), len(specs), dtype=torch.bool)
    for i, content in enumerate(contents):
        for t, (names, whole) in enumerate(specs):
            named = all(any(s == cs and (c is None or c == cc) for cc, cs in content) for c, s in names)
            out[i, t] = named and (not whole or len(names) == len(content))
    return out


def multi_positive_info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, target: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with a uniform target over each row's positives.

    Args:
        image_emb: (B, D) and text_emb (T, D), L2-normalised.
        target: (B, T) bool; every row and column has at least one positive.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.T
    t = target.float()
    loss_i = -(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(t / t.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (loss_i + loss_t) / 2


# ---------------------------------------------------------------------- model pieces
def normalise_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 255] -> CLIP-normalised input."""
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1) * 255.0
    return (images - mean) / std


def encode_text_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(ids)`` computed on the shortest prefix holding every end-of-text token.

    The text transformer is causal and pools at the end-of-text token, so the tokens after
    it change nothing: dropping the padding gives the same (N, D) result, several times faster.
    """
    length = int((ids != 0).sum(1).max())
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]  # the end-of-text token has the largest id
    return x @ model.text_projection


def encode_image_and_patches(model: nn.Module, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image embedding (B, D) and mean projected patch token (B, D) of normalised pixels (B, 3, H, W).

    The second is ``OpenCLIP.encode_dense``'s output averaged over the image (before normalising).
    """
    visual = model.visual
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(pixels)  # tokens: (B, N, W), after the final norm
    finally:
        visual.output_tokens = previous
    return pooled, tokens.mean(1) @ visual.proj


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    # No decay on embeddings, norms, biases and the temperature: untrained token rows stay as initialised.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        plain = p.ndim < 2 or "embedding" in name or name in ("logit_scale",)
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------- training
def train_micro_clip(output: Path, settings: ClipTrainingSettings, resume: bool = False, command: str = "") -> Path:
    """Train (or resume) the micro CLIP and write its open_clip folder into ``output``; returns ``output``.

    Deterministic given ``settings`` and the torch thread count (recorded in training.json).
    """
    open_clip = require("open_clip", "open_clip_torch", "Training the micro CLIP")
    safetensors_torch = require("safetensors.torch", "safetensors", "Training the micro CLIP")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cfg = model_config(settings)
    torch.manual_seed(settings.seed)
    model = open_clip.CLIP(**cfg)
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr)

    start, history = resume_model(output, resume, model, opt, {"loss": [], "image": [], "patches": []})
    if start:
        logger.info("resuming the micro CLIP from step %d", start)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, settings.steps):
        images, texts, specs, contents = training_batch(settings, step)
        target = positives(specs, contents)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(settings, step)
        image_emb, patch_emb = encode_image_and_patches(model, normalise_pixels(images))
        text_emb = F.normalize(encode_text_prefix(model, tokenizer(texts)), dim=-1)
        image_loss = multi_positive_info_nce(F.normalize(image_emb, dim=-1), text_emb, target, model.logit_scale)
        patch_loss = multi_positive_info_nce(F.normalize(patch_emb, dim=-1), text_emb, target, model.logit_scale)
        loss = image_loss + settings.dense_weight * patch_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        for key, value in (("loss", loss), ("image", image_loss), ("patches", patch_loss)):
            history[key].append(float(value.detach()))
        if (step + 1) % 50 == 0:
            logger.info("micro CLIP step %d/%d loss %.4f (image %.4f, patches %.4f) (%.1f s)", step + 1,
                        settings.steps, *(float(np.mean(history[k][-50:])) for k in ("loss", "image", "patches")),
                        time.perf_counter() - t0)
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            save_model_state(output, step + 1, model, opt, history)

    preprocess_cfg = {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)}
    write_text(output / "open_clip_config.json",
                       json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    weights = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    write_atomically(output / "open_clip_model.safetensors", lambda tmp: safetensors_torch.save_file(weights, tmp))
    summary = {
        "model": "micro CLIP (open_clip CLIP, ViT image tower, patch %d)" % settings.patch_size,
        "settings": asdict(settings),
        "seed": settings.seed,
        "torch_threads": torch.get_num_threads(),
        "command": command,
        "final_losses": {k: float(np.mean(v[-50:])) if v else None for k, v in history.items()},
        "aux_signals": ["object crops cut around the world's object boxes, paired with the object's name"],
        "train_scene_seeds": f"train split, {settings.steps * settings.scenes_per_step} scenes from {SCENE_SEED_OFFSET}",
        "weights_dtype": "float16",
    }
    write_text(output / "training.json", json.dumps(summary, indent=2))
    (output / STATE_FILE).unlink(missing_ok=True)
    return output


# ---------------------------------------------------------------------- quality check
@torch.no_grad()
def evaluate_micro_clip(weights: str, split: str = "val", count: int = 500,
                        templates: Sequence[str] = EVAL_TEMPLATES) -> Dict[str, float]:
    """Zero-shot accuracies of a CLIP folder on micro-world scenes, through ``OpenCLIP``.

    Object crops (margin 4 px) are classified among the 16 colour-shape names, the 4
    shapes and the 4 colours; whole scenes are scored over the 16 colour-shape names:
    ``scene_top1_present`` is how often the best class is in the scene,
    ``scene_topn_recall`` the share of a scene's n objects found among its n best classes.
    Chance: 1/16, 1/4, 1/4, about 0.14 and 0.14.
    """
    from ..pretrained.clip import OpenCLIP

    clip = OpenCLIP.from_weights(str(weights), list(templates))
    lo, hi = SPLITS[split]
    scenes = [render_scene(s) for s in range(lo, min(hi, lo + count))]
    pairs = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    crops, truth = [], []
    for scene in scenes:
        for j, obj in enumerate(scene.objects):
            crops.append(object_crop(scene, j, margin=4))
            truth.append((obj.colour, obj.shape))
    crop_emb = torch.cat([clip.encode_image(torch.stack(crops[i : i + 256])) for i in range(0, len(crops), 256)])
    pair_pred = (crop_emb @ clip.encode_class_names(pairs).T).argmax(1)
    shape_pred = (crop_emb @ clip.encode_class_names(list(SHAPES)).T).argmax(1)
    colour_pred = (crop_emb @ clip.encode_class_names(list(COLOURS)).T).argmax(1)
    pair_acc = np.mean([pairs[int(p)] == f"{c} {s}" for p, (c, s) in zip(pair_pred, truth)])
    shape_acc = np.mean([SHAPES[int(p)] == s for p, (_, s) in zip(shape_pred, truth)])
    colour_acc = np.mean([COLOURS[int(p)] == c for p, (c, _) in zip(colour_pred, truth)])

    scene_emb = clip.encode_image(torch.stack([scene_tensor(s) for s in scenes]))
    scores = scene_emb @ clip.encode_class_names(pairs).T
    top1, recall = [], []
    for scene, row in zip(scenes, scores):
        present = {o.name for o in scene.objects}
        ranked = [pairs[int(k)] for k in row.argsort(descending=True)]
        top1.append(ranked[0] in present)
        recall.append(len(present & set(ranked[: len(present)])) / len(present))
    return {
        "crop_colour_shape_acc": float(pair_acc),
        "crop_shape_acc": float(shape_acc),
        "crop_colour_acc": float(colour_acc),
        "scene_top1_present": float(np.mean(top1)),
        "scene_topn_recall": float(np.mean(recall)),
        "num_scenes": len(scenes),
        "num_crops": len(crops),
    }
