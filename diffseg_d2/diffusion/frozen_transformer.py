"""The frozen substrate of the diffusion-transformer families (SD3 / SD3.5, FLUX.1 dev and schnell).

``FrozenDiffusionTransformer`` wraps the components that
``diffseg_d2.pretrained.diffusion_transformers.load_diffusion_transformer`` loads and implements the
substrate operations (``diffseg_d2.diffusion.substrate``) as the families' diffusers pipelines compute
them: VAE encoding with the family's shift and scaling, noising at a step of the flow-matching schedule,
prompt tokenisation and encoding into the text sequence the transformer reads, one transformer call
(``denoise``) and text-to-image generation. Where the families differ it reads the family's data
(``parts.family``) and the scheduler's config; the methods never see the difference.

Steps. A step ``t`` is an integer in ``[0, T)`` (T = the scheduler's ``num_train_timesteps``, 1000) of the
unshifted flow-matching grid, ``u = t / T``; the noise level is the schedule's shifted sigma at ``u``:
``shift * u / (1 + (shift - 1) * u)`` for a constant shift (SD3: 3), or, for a scheduler with dynamic
shifting (FLUX dev), ``e^mu / (e^mu + 1/u - 1)`` with ``mu`` interpolated linearly in the image's token
count between the scheduler's ``base_shift`` (at ``base_image_seq_len`` tokens) and ``max_shift`` (at
``max_image_seq_len``), as the FLUX pipeline sets its schedule: the same step is noisier on a larger
image. The noisy latent is ``(1 - sigma) x0 + sigma * noise`` and the transformer reads the timestep
``sigma * T``. Step 0 is the clean latent.

Text. ``text_layout`` says where each encoder's tokens sit in the text sequence: SD3 = 77 CLIP positions
(CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width) then T5's 256 tokens;
FLUX = T5's tokens alone (the CLIP encoder gives the pooled vector). In the joint attention sequence SD3
puts the image tokens first, FLUX the text first (``text_layout.image_first``). Its parameters never train
and it stays in eval mode.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..numerics import require_finite
from ..optional_imports import require
from ..pretrained.diffusion_transformers import DiffusionTransformerParts
from ..pretrained.stable_diffusion import SD_WEIGHTS_KEY
from ..pretrained.tokens import find_subsequence
from .prompts import ClassPrompts, build_class_prompts, build_joint_prompt
from .substrate import FrozenDiffusion, PromptEmbeds

__all__ = ["FrozenDiffusionTransformer", "PromptIds", "TextLayout", "encode_prompt_ids", "text_layout_of",
           "tokenize_prompts", "word_positions_in"]


@dataclass(frozen=True)
class PromptIds:
    """Token ids of B prompts for a diffusion transformer.

    Args:
        sequence: (B, L_text) the token id at each position of the text sequence the transformer reads
            (SD3: the first CLIP tokenizer's 77 ids then T5's; FLUX: T5's). Word positions are read from it.
        clip: one (B, 77) tensor per CLIP encoder: that encoder's own tokenisation (its padding token).
    """

    sequence: torch.Tensor
    clip: Tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def __getitem__(self, index) -> "PromptIds":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch dimension
        return PromptIds(self.sequence[index], tuple(c[index] for c in self.clip))


@dataclass(frozen=True)
class TextLayout:
    """Where the text tokens sit, for a read-out to find a word's tokens.

    Args:
        length: L_text, the text tokens of the joint sequence.
        segments: encoder part ("clip", "t5") -> its positions within the text tokens (a slice of [0, L_text)).
        image_first: whether the joint attention sequence is [image; text] (SD3) or [text; image] (FLUX).
    """

    length: int
    segments: Dict[str, slice]
    image_first: bool


class FrozenDiffusionTransformer(FrozenDiffusion):
    """Frozen SD3 / FLUX components with the substrate's operations.

    Args:
        parts: the loaded components.
        dtype: compute dtype of every part. float16 is only used on CUDA (on CPU the parts stay float32);
            bfloat16 is used on both (the policy of the UNet families' substrate).
    """

    def __init__(self, parts: DiffusionTransformerParts, dtype: str = "float32"):
        super().__init__(dtype)
        self.family = parts.family
        self.transformer = parts.transformer
        self.vae = parts.vae
        self.clip_encoders = nn.ModuleList(parts.clip_encoders)
        self.t5_encoder = parts.t5_encoder
        self.clip_tokenizers = tuple(parts.clip_tokenizers)
        self.t5_tokenizer = parts.t5_tokenizer
        self.scheduler = parts.scheduler
        first = self.clip_tokenizers[0]
        if any(t.get_vocab() != first.get_vocab() for t in self.clip_tokenizers[1:]):
            # The CLIP part of the text sequence is read with the first tokenizer's ids.
            raise ValueError(f"{self.family.title}: the CLIP tokenizers of {SD_WEIGHTS_KEY} have different vocabularies.")
        self.freeze()
        self.to(self.device)  # the dtype policy below, before any move

    @property
    def denoiser(self):
        return self.transformer

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def patch(self) -> int:
        """Latent cells per image token along each side: the pipeline's packing times the transformer's
        own patch size (2 for SD3 and FLUX)."""
        return self.family.packing * int(self.transformer.config.patch_size)

    def image_tokens(self, latent_size: Sequence[int]) -> int:
        """N_img, the image tokens of a (h, w) latent (h and w multiples of ``patch``)."""
        self.check_latent_size(latent_size)
        h, w = (int(s) for s in latent_size[-2:])
        return (h // self.patch) * (w // self.patch)

    @property
    def text_layout(self) -> TextLayout:
        return text_layout_of(self.family, self.clip_tokenizers, self.t5_tokenizer)

    @property
    def context_length(self) -> int:
        """L_text, the text tokens of the joint sequence."""
        return self.text_layout.length

    # ------------------------------------------------------------------------------------------ schedule
    def resolution_shift(self, image_tokens: int) -> Optional[float]:
        """The schedule's ``mu`` for an image of ``image_tokens`` tokens when the scheduler shifts with the
        resolution (FLUX dev), else None: linear in the token count, ``base_shift`` at
        ``base_image_seq_len`` tokens, ``max_shift`` at ``max_image_seq_len``."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        n0, n1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        s0, s1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (s1 - s0) / (n1 - n0)
        return image_tokens * slope + (s0 - slope * n0)

    def _scheduler_at(self, sigmas: Sequence[float], image_tokens: int):
        """A private scheduler (``set_timesteps`` changes its state) set to the unshifted ``sigmas``, shifted
        as the family's pipeline shifts them for an image of ``image_tokens`` tokens."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        mu = self.resolution_shift(image_tokens)
        with _quiet_division():  # u = 0 under dynamic shifting: 1/u = inf, sigma = 0 exactly
            scheduler.set_timesteps(sigmas=list(sigmas), **({} if mu is None else {"mu": mu}))
        return scheduler

    def noise_level(self, step: int, latent_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sigma, timestep)`` at ``step`` for a latent of ``latent_size`` (h, w): 0-d float32 tensors,
        ``timestep = sigma * T`` as the scheduler computes it (what the transformer reads)."""
        scheduler = self._scheduler_at_step(step, latent_size)
        return scheduler.sigmas[0], scheduler.timesteps[0]

    def _scheduler_at_step(self, step: int, latent_size: Sequence[int]):
        self.check_timestep(step, "step")
        total = int(self.scheduler.config.num_train_timesteps)
        return self._scheduler_at([step / total], self.image_tokens(latent_size))

    def add_noise(
        self, latents: torch.Tensor, step: int, generator: torch.Generator, *, same_for_batch: bool = False
    ) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma * noise`` at ``step`` (see the module docstring): (B, C, h, w), same shape.

        Args:
            same_for_batch: draw one noise map and add it to every batch element, so an element's result
                does not depend on its place in the batch.
        """
        shape = (1, *latents.shape[1:]) if same_for_batch else latents.shape
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise.expand(latents.shape).to(latents.device)
        scheduler = self._scheduler_at_step(step, latents.shape)
        timestep = scheduler.timesteps[:1].expand(latents.shape[0])
        noisy = scheduler.scale_noise(latents.float(), timestep, noise)
        return noisy.to(dtype=latents.dtype)

    # ------------------------------------------------------------------------------------------ text
    @property
    def t5_length(self) -> int:
        """T5 tokens in the text sequence (``family.text_lengths``)."""
        return self.family.text_lengths(self.clip_tokenizers, self.t5_tokenizer)[1]

    def tokenize(self, prompts: Sequence[str], truncate: bool = False) -> PromptIds:
        """Token ids of every text encoder, padded to their lengths. Raises if a prompt is too long."""
        return tokenize_prompts(self.family, self.clip_tokenizers, self.t5_tokenizer, prompts, truncate)

    def word_positions(self, ids: PromptIds, row: int, word: str) -> Dict[str, List[int]]:
        """Positions within the text tokens (of ``text_layout``) of the first occurrence of ``word`` in prompt
        ``row``, per segment ("clip", "t5"); a segment where it does not occur is left out."""
        return word_positions_in(ids, row, word, self.family, self.clip_tokenizers, self.t5_tokenizer)

    @property
    def text_segments(self) -> Tuple[str, ...]:
        """The encoder parts of the text sequence a class word can be read from (SD3: "clip", "t5"; FLUX: "t5")."""
        return tuple(self.text_layout.segments)

    def class_prompts(self, names: Sequence[str], template: str, suffix: str = "", *, continuations=None,
                      selection: str = "mean", ing_rule: bool = False, segment: Optional[str] = None) -> ClassPrompts:
        """One prompt per class (``build_class_prompts``) in every tokenizer of the family: ``input_ids`` is a
        :class:`PromptIds`, ``token_index`` the class word's positions among the text tokens in ``segment``
        ("t5", the default, or SD3's "clip"), ``emphasis`` (K, L_text) the last word's tokens in every segment."""
        def build(tokenizer, length):
            return build_class_prompts(tokenizer, names, template, suffix, continuations=continuations,
                                       selection=selection, ing_rule=ing_rule, length=length)
        return self._in_sequence(build, segment)

    def joint_prompt(self, names: Sequence[str], template: str, segment: Optional[str] = None) -> ClassPrompts:
        """ONE prompt naming every class (``build_joint_prompt``), in the layout of ``class_prompts``."""
        return self._in_sequence(lambda tokenizer, length: build_joint_prompt(tokenizer, names, template, length), segment)

    def _in_sequence(self, build, segment: Optional[str]) -> ClassPrompts:
        """Prompts built by ``build(tokenizer, length)`` in each tokenizer, joined into the text sequence."""
        layout = self.text_layout
        segment = segment or "t5"
        if segment not in layout.segments:
            raise ValueError(f"MODEL.DIFFSEG.TRANSFORMER.TEXT_SEGMENT = {segment!r}: the {self.family.title} text "
                             f"sequence has the segments {list(layout.segments)}.")
        t5 = build(self.t5_tokenizer, self.t5_length)
        clips = [build(tokenizer, int(tokenizer.model_max_length)) for tokenizer in self.clip_tokenizers]
        parts = ([clips[0]] if "clip" in layout.segments else []) + [t5]
        sequence = torch.cat([p.input_ids for p in parts], dim=1)
        emphasis = None if t5.emphasis is None else torch.cat([p.emphasis for p in parts], dim=1)
        read = clips[0] if segment == "clip" else t5
        return ClassPrompts(t5.prompts, PromptIds(sequence, tuple(c.input_ids for c in clips)),
                            read.token_index + layout.segments[segment].start, read.token_weight, emphasis)

    @torch.no_grad()
    def encode_text(self, ids: PromptIds, emphasis: Optional[torch.Tensor] = None, weight: float = 1.0) -> PromptEmbeds:
        """Encoded prompts, as the family's pipeline ``encode_prompt`` computes them.

        Returns ``PromptEmbeds`` with tokens (B, L_text, D_T5): SD3 = [CLIP-L and CLIP-G hidden states
        (``family.clip_hidden_layer``) side by side, zero-padded to D_T5; T5's last hidden state] along the
        sequence, FLUX = T5's; and pooled (B, P): the CLIP encoders' ``family.pooled_output`` side by side.

        Args:
            emphasis: optional (B, L_text) bool, text positions whose state is pushed away from the empty
                prompt's at the same position: ``empty + weight * (z - empty)`` (Compel's ``word++``).
            weight: that factor (1 = no change).
        """
        tokens, pooled = encode_prompt_ids(self.family, self.clip_encoders, self.t5_encoder, ids, self.device)
        tokens = require_finite(tokens, f"the text encoders ({SD_WEIGHTS_KEY})")
        tokens = self.emphasize(tokens, emphasis, weight)
        return PromptEmbeds(tokens.to(self.dtype), pooled.to(self.dtype))

    @torch.no_grad()
    def concept_embeddings(self, words: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """ConceptAttention's concept inputs: each word encoded on its own, its first T5 state (C, D_T5); and
        the pooled vector of the words joined by spaces (P,)."""
        tokens = self.encode_text(self.tokenize(list(words), truncate=True)).tokens
        pooled = self.encode_text(self.tokenize([" ".join(words)], truncate=True)).pooled[0]
        return tokens[:, self.text_layout.segments["t5"].start], pooled

    def unconditional_context(self) -> PromptEmbeds:
        """The unconditional half of classifier-free guidance: the encoded empty prompt (SD3's pipeline)."""
        return self.empty_prompt_context()

    # ------------------------------------------------------------------------------------------ denoiser
    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/p * w/p, C p^2), p = ``family.packing``: each p x p block of cells one token,
        row-major over blocks, channels then the block's rows and columns within a token."""
        p = self.family.packing
        B, C, h, w = latents.shape
        blocks = latents.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return blocks.reshape(B, (h // p) * (w // p), C * p * p)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of ``_pack``: (B, h/p * w/p, C p^2) -> (B, C, h, w)."""
        p = self.family.packing
        B, _, D = tokens.shape
        blocks = tokens.reshape(B, h // p, w // p, D // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return blocks.reshape(B, D // (p * p), h, w)

    def _position_ids(self, h: int, w: int, text_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotary position ids: image (h*w, 3) = (0, row, column) of each token, text (L, 3) = zeros."""
        image = torch.zeros(h, w, 3)
        image[..., 1] = torch.arange(h)[:, None]
        image[..., 2] = torch.arange(w)[None, :]
        device, dtype = self.device, self.dtype
        return image.reshape(h * w, 3).to(device=device, dtype=dtype), torch.zeros(text_length, 3, device=device, dtype=dtype)

    def _transformer_call(self, latents: torch.Tensor, timestep: torch.Tensor, context: PromptEmbeds,
                          guidance: Optional[float]) -> torch.Tensor:
        """One transformer call with the inputs the family's pipeline builds: latents (B, C, h, w), timestep
        a 0-d float32 ``sigma * T`` -> prediction (B, C, h, w) (the flow velocity, noise minus data)."""
        B, _, h, w = latents.shape
        x = latents.to(self.dtype)
        t = timestep.to(x.device).expand(B)
        if self.family.timestep_divisor is not None:
            t = t.to(self.dtype) / self.family.timestep_divisor
        inputs = dict(timestep=t, encoder_hidden_states=context.tokens.to(x.device, self.dtype),
                      pooled_projections=context.pooled.to(x.device, self.dtype))
        if self.family.packing > 1:
            p = self.family.packing
            inputs["hidden_states"] = self._pack(x)
            inputs["img_ids"], inputs["txt_ids"] = self._position_ids(h // p, w // p, context.tokens.shape[1])
        else:
            inputs["hidden_states"] = x
        if guidance is not None:
            inputs["guidance"] = torch.full([1], float(guidance), device=x.device, dtype=torch.float32).expand(B)
        out = self.transformer(**inputs, return_dict=False)[0]
        if self.family.packing > 1:
            out = self._unpack(out, h, w)
        return require_finite(out, f"the transformer ({SD_WEIGHTS_KEY})")

    def denoise(self, latents: torch.Tensor, step: int, context: PromptEmbeds, *, grad: bool = False) -> torch.Tensor:
        """One transformer call at ``step``: latents (B, C, h, w), context (``PromptEmbeds`` of B prompts)
        -> prediction (B, C, h, w) in the latents' layout. A guidance-distilled family (FLUX dev) reads its
        pipeline's default guidance scale. While it runs, ``record_joint_attention(self.transformer, ...,
        text_length=self.text_layout.length)`` reads the chosen blocks.

        Args:
            grad: keep the autograd graph from the output back to ``context``; the weights stay frozen.
        """
        if not isinstance(context, PromptEmbeds) or context.pooled is None:
            raise ValueError(f"{self.family.title} needs pooled text embeddings: encode prompts with encode_text.")
        _, timestep = self.noise_level(step, latents.shape)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self._transformer_call(latents, timestep, context, self.family.guidance)

    @torch.no_grad()
    def generate(self, context: PromptEmbeds, *, image_size: int, steps: int, guidance_scale: float,
                 generator: torch.Generator) -> torch.Tensor:
        """Text-to-image with the flow-matching Euler scheduler: unshifted sigmas evenly from 1 to 1/steps,
        shifted as ``add_noise`` shifts them (the FLUX pipeline's schedule).

        A guidance-distilled family (FLUX dev) reads ``guidance_scale`` as an input of one call per step;
        any other runs classifier-free guidance on the batch ``[conditional, unconditional]`` in that order
        (so a read-out of batch element 0 sees the prompted half), for ``guidance_scale > 1``.

        Args:
            context: (1, L_text, D) encoded prompt with its pooled vector.
            image_size: side of the square image, a multiple of ``latent_factor * patch``.
            steps: Euler steps.
            guidance_scale: guidance weight.
            generator: source of the initial noise (seeded by the caller).

        Returns:
            (1, 3, image_size, image_size) RGB in [0, 255].
        """
        if context.shape[0] != 1:
            raise ValueError(f"generate() takes one prompt at a time, got a batch of {context.shape[0]}.")
        side = int(image_size) // self.latent_factor
        shape = (1, int(self.vae.config.latent_channels), side, side)
        np = require("numpy", "numpy", "Generating images")
        scheduler = self._scheduler_at(np.linspace(1.0, 1 / steps, int(steps)), self.image_tokens(shape))
        latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(self.device)
        distilled = self.family.guidance is not None
        guided = not distilled and guidance_scale > 1
        both = PromptEmbeds.cat([context, self.unconditional_context()]) if guided else context
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            velocity = self._transformer_call(x, t, both, guidance_scale if distilled else None).float()
            if guided:
                cond, free = velocity.chunk(2)
                velocity = free + guidance_scale * (cond - free)
            latents = scheduler.step(velocity, t, latents).prev_sample
        return self.decode_latents(latents)


def text_layout_of(family, clip_tokenizers, t5_tokenizer) -> TextLayout:
    """Where each encoder's tokens sit in ``family``'s text sequence for these tokenizers (see the module docstring)."""
    clip, t5 = family.text_lengths(clip_tokenizers, t5_tokenizer)
    segments = {"clip": slice(0, clip)} if clip else {}
    segments["t5"] = slice(clip, clip + t5)
    return TextLayout(clip + t5, segments, family.image_first)


def word_positions_in(ids: PromptIds, row: int, word: str, family, clip_tokenizers, t5_tokenizer) -> Dict[str, List[int]]:
    """Positions within the text tokens of the first occurrence of ``word`` in prompt ``row`` of ``ids``, per
    segment ("clip": the first CLIP tokenizer's ids, "t5"); a segment where it does not occur is left out."""
    tokenizers = {"clip": clip_tokenizers[0], "t5": t5_tokenizer}
    out = {}
    for name, segment in text_layout_of(family, clip_tokenizers, t5_tokenizer).segments.items():
        word_ids = tokenizers[name](word, add_special_tokens=False).input_ids
        start = find_subsequence(ids.sequence[row, segment].tolist(), word_ids)
        if start >= 0:
            out[name] = list(range(segment.start + start, segment.start + start + len(word_ids)))
    return out


def tokenize_prompts(family, clip_tokenizers, t5_tokenizer, prompts: Sequence[str], truncate: bool = False) -> PromptIds:
    """Token ids of ``prompts`` in every text encoder of ``family``, padded to the lengths of the text
    sequence (``family.text_lengths``). Raises if a prompt is too long (unless ``truncate``)."""
    prompts = list(prompts)
    clip = []
    for tokenizer in clip_tokenizers:
        length = int(tokenizer.model_max_length)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=truncate,
                        return_tensors="pt").input_ids
        if ids.shape[1] > length:
            raise ValueError(f"prompts longer than the CLIP text encoder's context of {length} tokens")
        clip.append(ids)
    length = family.text_lengths(clip_tokenizers, t5_tokenizer)[1]
    t5 = t5_tokenizer(prompts, padding="max_length", max_length=length, truncation=truncate,
                      return_tensors="pt").input_ids
    if t5.shape[1] > length:
        raise ValueError(f"prompts longer than the {family.title} T5 context of {length} tokens")
    in_sequence = family.clip_hidden_layer is not None
    return PromptIds(torch.cat([clip[0], t5], dim=1) if in_sequence else t5, tuple(clip))


def encode_prompt_ids(family, clip_encoders, t5_encoder, ids: PromptIds, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The text sequence and pooled condition of tokenised prompts as the family's pipeline ``encode_prompt``
    computes them (see ``FrozenDiffusionTransformer.encode_text``), under the caller's autograd mode (the
    micro-world trainer trains the encoders through it): tokens (B, L_text, D_T5), pooled (B, P)."""
    states, pooled = [], []
    layer = family.clip_hidden_layer
    for encoder, clip_ids in zip(clip_encoders, ids.clip):
        out = encoder(clip_ids.to(device), output_hidden_states=layer is not None)
        pooled.append(getattr(out, family.pooled_output))
        if layer is not None:
            states.append(out.hidden_states[layer])
    t5_ids = ids.sequence[:, ids.clip[0].shape[1]:] if states else ids.sequence  # SD3: the CLIP ids come first
    tokens = t5_encoder(t5_ids.to(device))[0]
    if states:
        clip = torch.cat(states, dim=-1)
        clip = nn.functional.pad(clip, (0, tokens.shape[-1] - clip.shape[-1]))
        tokens = torch.cat([clip.to(tokens.dtype), tokens], dim=-2)
    return tokens, torch.cat(pooled, dim=-1)


@contextlib.contextmanager
def _quiet_division():
    np = require("numpy", "numpy", "The flow-matching schedule")
    with np.errstate(divide="ignore"):
        yield
