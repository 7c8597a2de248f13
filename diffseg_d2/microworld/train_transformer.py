"""Train the micro-world diffusion TRANSFORMER on CPU, saved as a Stable Diffusion 3 folder.

The transformer twin of ``train_diffusion`` (the micro UNet): the same scenes, captions and caption
curriculum, an SD3-family model instead of a UNet, so DiffSegmenter's joint-attention read-outs are
measured in the micro-world as its cross-attention ones are.

* **Model** (``StableDiffusion3Pipeline`` parts, ``MICRO_SD3``): an ``SD3Transformer2DModel`` (joint
  attention blocks, image tokens first) reading the micro UNet's trained VAE latents (16x16x4 for a
  64x64 scene; the VAE is reused frozen, not retrained) in 1x1 patches, so every latent cell is an image
  token (256); the text sequence is SD3's: two CLIP text encoders (penultimate states side by side,
  zero-padded to T5's width, their projected end-of-text embeddings the pooled condition) then a T5
  encoder, with the real CLIP BPE tokenizer and a T5 unigram tokenizer trained here on the world's
  words; CLIP 24 and T5 24 tokens (the captions need at most 13).
* **Loss**: rectified flow as SD3 trains it: ``x_t = (1 - sigma) x0 + sigma eps`` with ``sigma`` drawn
  logit-normal (m = 0, s = 1), the transformer reads ``sigma * 1000`` and predicts ``eps - x0``; the
  scheduler's shift is 1 (64 px images need none). 10 % empty captions (classifier-free guidance).
  Encoders and transformer train jointly.
* **Attention alignment (the same auxiliary signal as the micro UNet, on purpose)**: with
  ``align_weight > 0`` each caption word's attention is pulled towards its object's mask on every joint
  block: the image queries' softmax over the TEXT keys (the word's share of the text attention, as the
  UNet's cross-attention softmax), mean over the word's tokens and the heads, read from both text
  segments (its CLIP and its T5 tokens); mass and per-pixel terms of ``train_diffusion.alignment_loss``,
  weighted by the signal share ``(1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)``. ``align_weight = 0`` gives
  the plain twin. So the model measures the pipeline; it is no evidence that attention binds words alone.

Output: a diffusers folder that ``load_diffusion`` opens like SD3 (``MODEL.DIFFSEG.SD.WEIGHTS
"micro-sd3"``), ``training.json`` (settings, losses, the command, wall time). Interrupted runs resume
from ``train_state.pt`` (``weights_only=True``) exactly.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.frozen_transformer import encode_prompt_ids, tokenize_prompts, word_positions_in
from ..diffusion.joint_attention import joint_attention_layers, sd3_query_key
from ..diffusion.prompts import token_mean_table
from ..optional_imports import require
from ..pretrained.diffusion_transformers import TRANSFORMER_FAMILIES, t5_word_tokenizer
from ..pretrained.stable_diffusion import clip_text_encoder, write_clip_tokenizer
from .scenes import COLOURS, SHAPES
from .train_diffusion import alignment_loss, partial_mention, scene_batch
from .train_state import STATE_FILE, load_train_state, save_train_state, step_generator, warmup_cosine_lr, write_text

logger = logging.getLogger(__name__)

#: The micro SD3's sizes. 4 joint blocks of 3 heads x 32; text encoders 2 layers each.
MICRO_SD3 = {
    "text_tokens": 24,
    "clip": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, projection_dim=48),
    # No dropout (T5's default is 0.1): its draws come from the global generator, which a resumed run
    # cannot replay; every other draw of a step comes from the step's own seed.
    "t5": dict(d_model=96, d_kv=24, d_ff=192, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
               dropout_rate=0.0),
    # caption_projection_dim = the blocks' width (heads x head_dim); pos_embed_max_size 32 covers up to 128 px.
    "transformer": dict(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                        attention_head_dim=32, num_attention_heads=3, joint_attention_dim=96,
                        caption_projection_dim=96, pooled_projection_dim=96, pos_embed_max_size=32),
}


@dataclass
class TransformerTrainingSettings:
    """Everything that decides the trained weights (saved in training.json)."""

    seed: int = 0
    steps: int = 2000
    batch: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    align_weight: float = 1.0
    align_pixel_weight: float = 1.0
    colour_word_dropout: float = 0.5  # as the micro UNet (see train_diffusion)
    partial_captions_from_step: int = 800
    object_mention_rate: float = 0.5
    align_by_signal: bool = True
    checkpoint_every: int = 100
    vae_from: str = "diffusion"  # the micro-world model whose trained VAE is reused (frozen)
    extra: Dict[str, str] = field(default_factory=dict)


#: The words of the micro-world's captions and of the prompts DiffSegmenter builds: the T5 vocabulary.
WORLD_WORDS = (*COLOURS, *SHAPES, "a", "an", "and", "of", "the", "photo", "photograph", "background", "picture", "image")


class AlignmentReader:
    """Wraps the joint-attention processors of a transformer; while ``requests`` are set, each block call
    appends ``(image b, N, (W, N) word maps with grad)`` to ``maps`` (see the module docstring), then runs
    the block's own processor."""

    def __init__(self, transformer):
        self.requests: List[Optional[tuple]] = []
        self.maps: List[tuple] = []
        processors = dict(transformer.attn_processors)
        for block in joint_attention_layers(transformer):
            name = f"{block}.attn.processor"
            processors[name] = self._wrap(processors[name])
        transformer.set_attn_processor(processors)

    def _wrap(self, original):
        def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            if encoder_hidden_states is not None and any(r is not None for r in self.requests):
                query, key = sd3_query_key(attn, hidden_states, encoder_hidden_states)
                n = hidden_states.shape[1]
                scale = query.shape[-1] ** -0.5
                for b, request in enumerate(self.requests):
                    if request is None:
                        continue
                    index, weight = request
                    text = (query[b, :, :n] @ key[b, :, n:].transpose(-1, -2) * scale).softmax(-1)  # (H, N, L)
                    maps = (text[:, :, index] * weight).sum(-1).mean(0).transpose(0, 1)  # (W, N)
                    self.maps.append((b, n, maps))
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        return processor


def build_parts(folder: Path, seed: int, vae_folder: Path):
    """Tokenizers (written into ``folder``), encoders and transformer with seeded random weights, the trained VAE."""
    diffusers = require("diffusers", "diffusers", "Training the micro diffusion transformer")
    transformers = require("transformers", "transformers", "Training the micro diffusion transformer")
    length = MICRO_SD3["text_tokens"]
    clip_toks = [write_clip_tokenizer(transformers, folder / name, pad_token="!" if i else None, model_max_length=length)
                 for i, name in enumerate(("tokenizer", "tokenizer_2"))]
    t5_tok = t5_word_tokenizer(transformers, WORLD_WORDS, model_max_length=length)
    torch.manual_seed(seed)
    clips = [clip_text_encoder(transformers, t, MICRO_SD3["clip"], with_projection=True) for t in clip_toks]
    t5_config = transformers.T5Config(vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                                      eos_token_id=t5_tok.eos_token_id, **MICRO_SD3["t5"])
    t5 = transformers.T5EncoderModel(t5_config)
    transformer = diffusers.SD3Transformer2DModel(**MICRO_SD3["transformer"])
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_folder), subfolder="vae", use_safetensors=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return dict(clip_toks=clip_toks, t5_tok=t5_tok, clips=clips, t5=t5, transformer=transformer, vae=vae,
                scheduler=scheduler)


def train_micro_transformer(output: Path, settings: TransformerTrainingSettings, resume: bool = False,
                            command: str = "") -> Path:
    """Train (or resume) and write the SD3 pipeline folder into ``output``; returns ``output``."""
    diffusers = require("diffusers", "diffusers", "Training the micro diffusion transformer")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    vae_folder = Path(__file__).resolve().parent / "weights" / settings.vae_from
    p = build_parts(output, settings.seed, vae_folder)
    family = TRANSFORMER_FAMILIES["sd3"]
    clip_toks, t5_tok, clips, t5, transformer, vae = (p[k] for k in ("clip_toks", "t5_tok", "clips", "t5", "transformer", "vae"))
    vae.eval().requires_grad_(False)
    trained = torch.nn.ModuleList([*clips, t5, transformer])

    state_path = output / STATE_FILE
    state = load_train_state(output, resume)
    history: Dict[str, List[float]] = state.get("history", {"flow": [], "align": []})
    opt = torch.optim.AdamW(trained.parameters(), lr=settings.lr, weight_decay=0.01)
    start = int(state.get("step", 0))
    if start:
        trained.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    reader = AlignmentReader(transformer) if settings.align_weight > 0 else None
    trained.train()
    seconds = float(state.get("seconds", 0.0))
    t0 = time.perf_counter()
    for step in range(start, settings.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(settings, step)
        images, scenes = scene_batch(10**5 + step * settings.batch, settings.batch)
        rng = np.random.default_rng([settings.seed, 2, step])  # every draw of a step from its own seed
        generator = step_generator(settings.seed, 10**6 + step)
        drop = rng.random(settings.batch) < settings.caption_dropout
        sigma = torch.sigmoid(torch.from_numpy(rng.standard_normal(settings.batch)).float())
        keep_colour = [rng.random(len(s.objects)) >= settings.colour_word_dropout for s in scenes]
        named = [None] * len(scenes)
        if step >= settings.partial_captions_from_step:
            named = [partial_mention(s, rng, settings.object_mention_rate) for s in scenes]
        mentions = [s.mentions(list(keep), only) for s, keep, only in zip(scenes, keep_colour, named)]
        captions = ["" if drop[i] else mentions[i][0] for i in range(len(scenes))]
        ids = tokenize_prompts(family, clip_toks, t5_tok, captions)
        with torch.no_grad():
            latents = torch.cat([vae.encode(chunk).latent_dist.sample(generator=generator) for chunk in images.split(16)])
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        s = sigma[:, None, None, None]
        noisy = (1 - s) * latents + s * noise
        tokens, pooled = encode_prompt_ids(family, clips, t5, ids)
        masks: List[Optional[torch.Tensor]] = []
        if reader is not None:
            reader.requests, reader.maps = [], []
            for i in range(len(scenes)):
                word_masks = {} if drop[i] else mentions[i][1]
                tables, targets = [], []
                for word in word_masks:  # the word's tokens in each segment (CLIP, T5) are read apart
                    for segment in word_positions_in(ids, i, word, family, clip_toks, t5_tok).values():
                        tables.append(segment)
                        targets.append(word_masks[word])
                if not tables:
                    reader.requests.append(None)
                    masks.append(None)
                    continue
                reader.requests.append(token_mean_table(tables))
                masks.append(torch.from_numpy(np.stack(targets)).float())
        pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=tokens,
                           pooled_projections=pooled, return_dict=False)[0]
        flow = F.mse_loss(pred, noise - latents)
        loss, align = flow, torch.zeros(())
        if reader is not None and reader.maps:
            signal = ((1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)).tolist() if settings.align_by_signal else None
            align = alignment_loss(reader.maps, masks, settings.align_pixel_weight, signal)
            loss = loss + settings.align_weight * align
            reader.requests, reader.maps = [], []
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["flow"].append(float(flow.detach()))
        history["align"].append(float(align.detach()))
        if (step + 1) % 50 == 0:
            logger.info("step %d/%d flow %.4f align %.4f (%.1f s)", step + 1, settings.steps,
                        float(np.mean(history["flow"][-50:])), float(np.mean(history["align"][-50:])),
                        seconds + time.perf_counter() - t0)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save_train_state(state_path, {"step": step + 1, "model": trained.state_dict(), "opt": opt.state_dict(),
                                          "history": history, "seconds": seconds + time.perf_counter() - t0})
    seconds += time.perf_counter() - t0
    transformer.set_attn_processor(diffusers.models.attention_processor.JointAttnProcessor2_0())
    trained.eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=p["scheduler"], vae=vae, text_encoder=clips[0], tokenizer=clip_toks[0],
        text_encoder_2=clips[1], tokenizer_2=clip_toks[1], text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(str(output), safe_serialization=True)
    summary = {
        "settings": asdict(settings),
        "architecture": MICRO_SD3,
        "command": command,
        "train_seconds": round(seconds, 1),
        "final_losses": {k: float(np.mean(v[-100:])) if v else None for k, v in history.items()},
        "aux_signals": ["joint-attention alignment with object masks"] if settings.align_weight > 0 else [],
    }
    write_text(output / "training.json", json.dumps(summary, indent=2))
    state_path.unlink(missing_ok=True)
    return output
