"""Train the micro-world text-to-image diffusion model on CPU, saved as a Stable Diffusion folder.

Two stages, both on scenes rendered on the fly from the train seed range
(``diffseg_d2.microworld.scenes``):

1. **VAE** (``AutoencoderKL`` of the ``micro`` architecture in ``pretrained.stable_diffusion``:
   64x64 RGB -> 16x16x4): L1 + L2 reconstruction and a small KL term; its
   ``scaling_factor`` is then set so the latents have unit variance, as SD's.
2. **UNet + text encoder** (``UNet2DConditionModel`` with cross-attention at
   16x16 and 8x8, ``CLIPTextModel`` 2x64 with the real CLIP BPE tokenizer),
   trained jointly on the DDPM noise-prediction loss of SD's noise schedule,
   with 10% empty captions (for classifier-free guidance). Each object's colour
   word is left out of the caption with probability ``colour_word_dropout``
   ("a red circle and a square"), so shape words must be bound by shape.

**Attention alignment (an auxiliary signal, on purpose).** A feasibility study
found that such small models do not learn to bind words to their objects from
the denoising loss alone on our CPUs. With ``align_weight > 0`` each
caption word's cross-attention (head-averaged softmax mass on its tokens, the
same read-out DiffSegmenter uses) is pulled towards the word's object mask,
which the world knows: a mass term ``(1 - inside / total)^2`` and a per-pixel
binary cross-entropy, on every cross-attention layer, each image's term weighted
by SD's signal share alpha_bar(t) of its timestep. The resulting model is a
measuring instrument for the pipeline (token selection, aggregation,
refinement, thresholds), not evidence that attention binds words by itself.

The result is a diffusers ``StableDiffusionPipeline`` folder (safetensors) that
``load_stable_diffusion`` opens like SD 1.5, plus ``training.json`` (settings,
seed, losses, the command). Interrupted runs resume from ``train_state.pt``
(loaded with ``weights_only=True``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.attention import attention_layers, class_token_maps
from ..diffusion.prompts import find_subsequence, token_mean_table
from ..optional_imports import require
from ..pretrained.stable_diffusion import random_stable_diffusion
from ..pretrained.tokens import write_clip_tokenizer_files
from .train_state import STATE_FILE, load_train_state, save_train_state, step_generator, train_scene, write_text

logger = logging.getLogger(__name__)


@dataclass
class DiffusionTrainingSettings:
    """Everything that decides the trained weights (saved in training.json)."""

    seed: int = 0
    vae_steps: int = 800
    # 16: at 32 the VAE's (32, 32, 64, 64) float32 activations pass glibc's mmap threshold and
    # every step page-faults (7 s instead of 0.4 s per step on our CPUs).
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    steps: int = 2000
    batch: int = 32
    lr: float = 5e-4
    caption_dropout: float = 0.1
    align_weight: float = 1.0
    align_pixel_weight: float = 1.0
    # Each object's colour word is left out of the caption with this probability ("a red circle
    # and a square"). Without it every shape word follows its colour word, the causal text encoder
    # hands the colour to the shape token, and the UNet binds shape words by colour: prompts
    # naming a shape alone ("a circle", as DiffSegmenter's) then find nothing.
    colour_word_dropout: float = 0.5
    # Curriculum: from this step on, each object is named in the caption with probability
    # object_mention_rate (at least one is): captions that name some of the objects, as real
    # captions do, teach a prompt naming one class ("a circle", DiffSegmenter's per-class prompts)
    # to find that class alone instead of every object.
    partial_captions_from_step: int = 800
    object_mention_rate: float = 0.5
    # Weight each image's alignment term by SD's signal share alpha_bar(t): at t near 1000 the
    # latent is almost pure noise and no map can find the objects.
    align_by_signal: bool = True
    checkpoint_every: int = 200
    extra: Dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------- data
def scene_batch(start_seed: int, count: int):
    """``count`` train scenes from ``start_seed`` on: images (B, 3, 64, 64) in [-1, 1] and the scenes."""
    scenes = [train_scene(start_seed + i) for i in range(count)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, scenes


def word_tokens(tokenizer, caption: str, words: Sequence[str]) -> List[Optional[List[int]]]:
    """Token positions of each word inside the tokenised caption (None where absent)."""
    ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    out = []
    for word in words:
        sub = tokenizer(word, add_special_tokens=False).input_ids
        start = find_subsequence(ids, sub)
        out.append(None if start < 0 else list(range(start, start + len(sub))))
    return out


def partial_mention(scene, rng: np.random.Generator, rate: float) -> List[bool]:
    """Which objects a partial caption names: each with probability ``rate``, at least one."""
    named = rng.random(len(scene.objects)) < rate
    if not named.any():
        named[rng.integers(len(scene.objects))] = True
    return named.tolist()


# ---------------------------------------------------------------------- alignment loss
class AlignmentProcessor:
    """Cross-attention (diffusers ``Attention`` API, no masks) that also returns word maps with grad.

    ``self.requests[b]`` = ``(token_index (W, T), token_weight (W, T))`` of image ``b`` (or None);
    the layer appends ``(b, (W, N) maps)`` to ``self.maps`` on each call.
    """

    def __init__(self):
        self.requests: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = []
        self.maps: List[Tuple[int, int, torch.Tensor]] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, n, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        d = key.shape[-1] // heads
        q, k, v = (t.view(batch, -1, heads, d).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        for b, request in enumerate(self.requests):
            if request is None:
                continue
            index, weight = request
            # One caption holds all its words: one softmax, each word read from its tokens.
            maps = class_token_maps(q[b : b + 1], k[b : b + 1], index, weight, attn.scale)
            self.maps.append((b, n, maps))
        out = out.transpose(1, 2).reshape(batch, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def alignment_loss(maps: List[Tuple[int, int, torch.Tensor]], masks: List[Optional[torch.Tensor]],
                   pixel_weight: float, image_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Mean over recorded (layer, image) maps of the mass and pixel terms against the word masks.

    Args:
        maps: ``(image b, positions N, (W, N) attention on each word)`` per layer call.
        masks: per image, (W, 64, 64) float word masks (None for images without words).
        image_weights: per image, the weight of its terms in the mean (all 1 when None).
    """
    total, count = None, 0.0
    for b, n, m in maps:
        side = int(round(n**0.5))
        target = F.adaptive_avg_pool2d(masks[b][:, None], side).flatten(1)  # (W, N) share of the cell covered
        inside = (m * target).sum(1) / m.sum(1).clamp(min=1e-6)
        mass = (1 - inside).square().mean()
        pixel = F.binary_cross_entropy(m.clamp(1e-6, 1 - 1e-6), target)
        w = 1.0 if image_weights is None else float(image_weights[b])
        loss = w * (mass + pixel_weight * pixel)
        total = loss if total is None else total + loss
        count += w
    return total / max(count, 1e-8)


# ---------------------------------------------------------------------- training
def train_micro_diffusion(output: Path, settings: DiffusionTrainingSettings, resume: bool = False,
                          command: str = "") -> Path:
    """Train (or resume) and write the pipeline folder into ``output``; returns ``output``."""
    diffusers = require("diffusers", "diffusers", "Training the micro diffusion model")
    transformers = require("transformers", "transformers", "Training the micro diffusion model")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tok_dir = output / "tokenizer"
    write_clip_tokenizer_files(tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(settings.seed)
    parts = random_stable_diffusion("micro", tokenizer, seed=settings.seed)
    vae, unet, text_encoder, scheduler = parts.vae, parts.unet, parts.text_encoder, parts.scheduler

    state_path = output / STATE_FILE
    state = load_train_state(output, resume)
    history: Dict[str, List[float]] = state.get("history", {"vae": [], "denoise": [], "align": []})

    # ---- stage 1: VAE
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr)
    start = int(state.get("vae_step", 0))
    if start:
        vae.load_state_dict(state["vae"])
        vae_opt.load_state_dict(state["vae_opt"])
    vae.train()
    t0 = time.perf_counter()
    for step in range(start, settings.vae_steps):
        images, _ = scene_batch(step * settings.vae_batch, settings.vae_batch)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=step_generator(settings.seed, step))).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + settings.vae_kl_weight * posterior.kl().mean()
        vae_opt.zero_grad()
        loss.backward()
        vae_opt.step()
        history["vae"].append(loss.item())
        if (step + 1) % 100 == 0:
            logger.info("vae step %d/%d loss %.4f (%.1f s)", step + 1, settings.vae_steps,
                        float(np.mean(history["vae"][-100:])), time.perf_counter() - t0)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.vae_steps:
            save_train_state(state_path, {"vae_step": step + 1, "vae": vae.state_dict(), "vae_opt": vae_opt.state_dict(),
                                     "history": history})
    vae.eval().requires_grad_(False)
    if "scaling" not in state:
        with torch.no_grad():
            images, _ = scene_batch(0, 256)
            std = float(torch.cat([vae.encode(c).latent_dist.mean for c in images.split(settings.vae_batch)]).std())
        state["scaling"] = 1.0 / std
    vae.register_to_config(scaling_factor=float(state["scaling"]))

    # ---- stage 2: UNet + text encoder
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    start = int(state.get("step", 0))
    if start:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
    cross_layers = [name for name, (kind, _) in attention_layers(unet).items() if kind == "cross"]
    processor = AlignmentProcessor()
    if settings.align_weight > 0:
        procs = dict(unet.attn_processors)
        procs.update({name: processor for name in cross_layers})
        unet.set_attn_processor(procs)
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter()
    for step in range(start, settings.steps):
        images, scenes = scene_batch(10**5 + step * settings.batch, settings.batch)
        # Every random draw of a step comes from that step's own seed: a resumed run continues
        # exactly as an uninterrupted one.
        rng = np.random.default_rng([settings.seed, 1, step])
        generator = step_generator(settings.seed, 10**6 + step)
        drop = rng.random(settings.batch) < settings.caption_dropout
        timesteps = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, settings.batch))
        keep_colour = [rng.random(len(s.objects)) >= settings.colour_word_dropout for s in scenes]
        named = [None] * len(scenes)  # None: every object
        if step >= settings.partial_captions_from_step:
            named = [partial_mention(s, rng, settings.object_mention_rate) for s in scenes]
        mentions = [s.mentions(list(keep), only) for s, keep, only in zip(scenes, keep_colour, named)]
        captions = ["" if drop[i] else mentions[i][0] for i in range(len(scenes))]
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():  # in chunks of vae_batch, for the reason given in the settings
            latents = torch.cat([vae.encode(chunk).latent_dist.sample(generator=generator)
                                 for chunk in images.split(settings.vae_batch)])
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(ids)[0]
        masks: List[Optional[torch.Tensor]] = []
        processor.requests, processor.maps = [], []
        for i, s in enumerate(scenes if settings.align_weight > 0 else ()):  # word maps only feed the alignment
            word_masks = {} if drop[i] else mentions[i][1]
            words = [w for w in word_masks]
            positions = word_tokens(tokenizer, captions[i], words) if words else []
            keep = [j for j, p in enumerate(positions) if p is not None]
            if not keep:
                processor.requests.append(None)
                masks.append(None)
                continue
            index, weight = token_mean_table([positions[j] for j in keep])
            processor.requests.append((index, weight))
            masks.append(torch.from_numpy(np.stack([word_masks[words[j]] for j in keep])).float())
        pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
        denoise = F.mse_loss(pred, noise)
        loss = denoise
        align = torch.zeros(())
        if settings.align_weight > 0 and processor.maps:
            signal = scheduler.alphas_cumprod[timesteps].tolist() if settings.align_by_signal else None
            align = alignment_loss(processor.maps, masks, settings.align_pixel_weight, signal)
            loss = loss + settings.align_weight * align
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["denoise"].append(float(denoise.detach()))
        history["align"].append(float(align.detach()))
        if (step + 1) % 50 == 0:
            logger.info("step %d/%d denoise %.4f align %.4f (%.1f s)", step + 1, settings.steps,
                        float(np.mean(history["denoise"][-50:])), float(np.mean(history["align"][-50:])),
                        time.perf_counter() - t0)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save_train_state(state_path, {
                "vae_step": settings.vae_steps, "vae": vae.state_dict(), "vae_opt": vae_opt.state_dict(),
                "scaling": state["scaling"], "step": step + 1, "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(), "history": history,
            })
    unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(output), safe_serialization=True)
    summary = {
        "settings": asdict(settings),
        "command": command,
        "final_losses": {k: float(np.mean(v[-100:])) if v else None for k, v in history.items()},
        "aux_signals": ["cross-attention alignment with object masks"] if settings.align_weight > 0 else [],
    }
    write_text(output / "training.json", json.dumps(summary, indent=2))
    state_path.unlink(missing_ok=True)
    return output
