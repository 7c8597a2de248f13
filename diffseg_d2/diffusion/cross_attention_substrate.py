"""What the cross-attention families' substrates share: the UNets (SD 1.x, 2.x, XL) and PixArt-Σ.

Their denoisers read the text through cross-attention layers (image queries, text keys) from ONE
tokenisation, and they are trained on a discrete (DDPM-type) noise schedule of ``num_train_timesteps``
steps. ``CrossAttentionDiffusion`` holds the operations that follow from that alone: noising at a step of
the schedule, tokenisation, class prompts and word positions, and DDIM text-to-image with classifier-free
guidance. A family adds its text encoding, its denoiser call (``denoise``) and the data below.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..optional_imports import require
from ..pretrained.tokens import find_subsequence
from .prompts import ClassPrompts, build_class_prompts, build_joint_prompt
from .substrate import FrozenDiffusion, PromptEmbeds

__all__ = ["CrossAttentionDiffusion"]


class CrossAttentionDiffusion(FrozenDiffusion):
    """Base of the substrates whose denoiser cross-attends to one tokenisation, on a discrete schedule.

    Subclasses set ``tokenizer`` and ``scheduler`` (one whose ``add_noise`` follows its training schedule)
    and implement ``context_length``, ``encode_text``, ``denoise`` and ``unconditional_context``.
    """

    #: the name of the one tokenisation's part of the text ("clip" for the UNets' CLIP, "t5" for PixArt's)
    text_segments: Tuple[str, ...] = ("clip",)
    #: how a method chooses the attention layers it reads: False by latent factor (a UNet's resolutions,
    #: ``CROSS_ATTN_FACTORS``), True by block (a transformer's one token grid, ``TRANSFORMER.BLOCKS``)
    layers_by_block: bool = False

    @property
    def context_length(self) -> int:
        """L, the text tokens the denoiser reads."""
        raise NotImplementedError

    def cross_attention_states(self, context: PromptEmbeds) -> PromptEmbeds:
        """The states the cross-attention layers make their keys from, for a read-out against prompts
        the denoiser does not run on (``AttentionStore.readout_context``): the encoded prompts themselves
        unless the family projects them first."""
        return context

    def add_noise(
        self, latents: torch.Tensor, step: int, generator: torch.Generator, *, same_for_batch: bool = False
    ) -> torch.Tensor:
        """Noise latents to timestep ``step`` of the scheduler's training schedule (same shape).

        Args:
            same_for_batch: draw one noise map and add it to every batch element, so an
                element's result does not depend on its place in the batch.
        """
        shape = (1, *latents.shape[1:]) if same_for_batch else latents.shape
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise.expand(latents.shape)
        timesteps = torch.full((latents.shape[0],), int(step), dtype=torch.long)
        noisy = self.scheduler.add_noise(latents.float().cpu(), noise.cpu(), timesteps)
        return noisy.to(device=latents.device, dtype=latents.dtype)

    def tokenize(self, prompts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Token ids padded to the context length: (B, L). Raises if a prompt is too long."""
        out = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.context_length,
            truncation=truncate, return_tensors="pt",
        )
        ids = out.input_ids
        if ids.shape[1] > self.context_length:
            raise ValueError(f"prompts longer than the text encoder's context of {self.context_length} tokens")
        return ids

    def class_prompts(self, names: Sequence[str], template: str, suffix: str = "", *, continuations=None,
                      selection: str = "mean", ing_rule: bool = False, segment: Optional[str] = None) -> ClassPrompts:
        """One prompt per class and where each class word's tokens sit (``build_class_prompts``).
        ``segment`` (a joint-attention transformer's choice of text encoder) is not read: one tokenisation."""
        return build_class_prompts(self.tokenizer, names, template, suffix, continuations=continuations,
                                   selection=selection, ing_rule=ing_rule, length=self.context_length)

    def joint_prompt(self, names: Sequence[str], template: str, segment: Optional[str] = None) -> ClassPrompts:
        """ONE prompt naming every class (``build_joint_prompt``); ``segment`` as in ``class_prompts``."""
        return build_joint_prompt(self.tokenizer, names, template, self.context_length)

    def word_positions(self, ids: torch.Tensor, row: int, word: str) -> Dict[str, List[int]]:
        """Positions of the first occurrence of ``word``'s tokens in prompt ``row`` of ``ids`` (of ``tokenize``),
        as ``{text_segments[0]: positions}``; empty when it does not occur (the transformers' form)."""
        word_ids = self.tokenizer(word, add_special_tokens=False).input_ids
        start = find_subsequence(ids[row].tolist(), word_ids)
        return {self.text_segments[0]: list(range(start, start + len(word_ids)))} if start >= 0 else {}

    def denoise(self, latents: torch.Tensor, step: int, context, *, grad: bool = False) -> torch.Tensor:
        """One denoiser pass at timestep ``step``: latents (B, C, h, w), context (``PromptEmbeds`` of B
        prompts) -> the noise prediction (B, C, h, w) (or the family's prediction type)."""
        raise NotImplementedError

    def unconditional_context(self) -> PromptEmbeds:
        """The unconditional half of classifier-free guidance (one prompt)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        context: PromptEmbeds,
        *,
        image_size: int,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Text-to-image with DDIM and classifier-free guidance.

        Each denoiser call runs the batch ``[conditional, unconditional]`` in that
        order, so an attention read-out that takes batch element 0 (see
        ``AttentionStore.readout_context``) sees the prompted half.

        Args:
            context: (1, L, D) encoded prompt.
            image_size: side of the square image, a multiple of the latent factor (and of a
                transformer's patch).
            steps: DDIM steps.
            guidance_scale: classifier-free guidance weight (1 = no guidance).
            generator: source of the initial noise (seeded by the caller).

        Returns:
            (1, 3, image_size, image_size) RGB in [0, 255].
        """
        diffusers = require("diffusers", "diffusers", "Generating images")
        if context.shape[0] != 1:
            raise ValueError(f"generate() takes one prompt at a time, got a batch of {context.shape[0]}.")
        # A private scheduler: set_timesteps changes its state.
        scheduler = diffusers.DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(int(steps))
        side = int(image_size) // self.latent_factor
        shape = (1, self.denoiser.config.in_channels, side, side)
        latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        latents = latents.to(self.device) * scheduler.init_noise_sigma
        uncond = self.unconditional_context()
        both = PromptEmbeds.cat([context.to(self.dtype), uncond.to(self.dtype)])
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = self.denoise(x, int(t), both)
            cond, free = noise.float().chunk(2)
            guided = free + guidance_scale * (cond - free)
            latents = scheduler.step(guided, t, latents).prev_sample
        return self.decode_latents(latents)
