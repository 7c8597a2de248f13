"""The diffusion substrate every method reads, whatever the model family.

A substrate is a frozen text-to-image diffusion model with the few operations the methods need:

* ``encode_images(images, sample_generator)``: images in [-1, 1] -> scaled latents;
* ``add_noise(latents, step, generator)``: noise at a step of the model's own training schedule;
* ``tokenize(prompts)`` / ``encode_text(ids, emphasis, weight)``: prompts -> :class:`PromptEmbeds`
  (the per-token states cross-attention reads, and the pooled vectors a family adds);
* ``empty_prompt_context()``: the encoded empty prompt;
* ``unet_forward(latents, step, context)``: one denoiser pass, during which ``record_attention`` /
  ``record_inputs`` read the chosen layers;
* ``generate(context, ...)``: text-to-image, for FreeDA's bank.

``FrozenStableDiffusion`` implements it for the UNet families (SD 1.x, SD 2.x, SDXL),
``FrozenPixArt`` for PixArt-Σ (both cross-attention models on a discrete schedule, sharing
``CrossAttentionDiffusion``), ``FrozenDiffusionTransformer`` for the joint-attention transformers (SD3 /
SD3.5, FLUX.1); what differs within each is data (``UNetFamily``, ``PixArtFamily``, ``TransformerFamily``),
picked from the weights (a folder's ``model_index.json``, a hub id's, or a preset). ``load_diffusion`` is the one place a config's
weights become a substrate. Both also build class prompts (``class_prompts``, ``joint_prompt``:
where each class word's tokens sit in the text the denoiser reads) and run ``denoise``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..numerics import require_finite
from ..pretrained.frozen import FrozenModel
from ..pretrained.stable_diffusion import SD_WEIGHTS_KEY

__all__ = ["DTYPES", "FrozenDiffusion", "PromptEmbeds", "load_diffusion"]

#: ``MODEL.DIFFSEG.SD.DTYPE`` names.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FrozenDiffusion(FrozenModel):
    """Base of every family's substrate: frozen parts, and one dtype policy for all of them.

    Subclasses set their parts, then call ``self.freeze()`` and ``self.to(self.device)``; ``denoiser``
    is the part whose parameters say where the model lives and in which dtype (the UNet, the
    transformer).

    Args:
        dtype: compute dtype of every part. float16 is only used on CUDA (on CPU the parts stay
            float32: CPUs have no fast float16 kernels, about 10x slower than float32 here);
            bfloat16 is used on both.
    """

    def __init__(self, dtype: str = "float32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"MODEL.DIFFSEG.SD.DTYPE = '{dtype}' is not one of {sorted(DTYPES)}.")
        self.requested_dtype = DTYPES[dtype]

    @property
    def denoiser(self) -> nn.Module:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        # Every .to()/.cuda() runs through here: after a move, apply the dtype policy.
        super()._apply(fn, recurse)
        cpu_half = self.device.type != "cuda" and self.requested_dtype == torch.float16
        want = torch.float32 if cpu_half else self.requested_dtype
        if self.denoiser.dtype != want:
            super()._apply(lambda t: t.to(want) if t.is_floating_point() else t, recurse)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side (8 for Stable Diffusion's VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_latent_size(self, latent_size: Sequence[int]) -> None:
        """Raise unless a (h, w) latent is tiled by a transformer's ``patch`` x ``patch`` patches (the
        transformer substrates define ``patch``, latent cells per image token along each side)."""
        h, w = (int(s) for s in latent_size[-2:])
        if h % self.patch or w % self.patch:
            raise ValueError(f"A {h}x{w} latent is not tiled by the {self.family.title} transformer's "
                             f"{self.patch}x{self.patch} patches: image sides must be multiples of "
                             f"{self.patch * self.latent_factor} pixels.")

    def check_timestep(self, step: int, config_key: str) -> None:
        """Raise unless ``step`` is a timestep of the scheduler's training schedule (0 .. T-1)."""
        total = int(self.scheduler.config.num_train_timesteps)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total:
            raise ValueError(f"{config_key} = {step!r} must be a timestep in [0, {total - 1}] of this scheduler.")

    @property
    def _latent_shift(self) -> float:
        # The VAE's shift factor (SD3 / FLUX); SD 1.x / 2.x / XL have none.
        return self.vae.config.get("shift_factor") or 0.0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Latents as the family's pipeline makes them, ``(z - shift_factor) * scaling_factor``:
        (B, 3, H, W) in [-1, 1] -> (B, C_lat, H/f, W/f).

        Args:
            sample_generator: None for the posterior mean; else a draw from the posterior,
                ``mean + std * eps`` with ``eps`` from this generator (reproducible).
        """
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        latents = require_finite(posterior.mean, f"the VAE encoder ({SD_WEIGHTS_KEY})")
        if sample_generator is not None:
            eps = torch.randn(latents.shape, generator=sample_generator, device=sample_generator.device)
            latents = latents + posterior.std * eps.to(device=latents.device, dtype=latents.dtype)
        if self._latent_shift:
            latents = latents - self._latent_shift
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decoding: (B, C_lat, h, w) latents (of ``encode_images``) -> (B, 3, h*f, w*f) RGB in [0, 255]."""
        z = latents.to(self.dtype) / self.vae.config.scaling_factor
        if self._latent_shift:
            z = z + self._latent_shift
        images = self.vae.decode(z).sample
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round()

    def empty_prompt_context(self) -> "PromptEmbeds":
        """The encoded empty prompt (one prompt), cached per device."""
        cached = getattr(self, "_empty_context", None)
        if cached is None or cached.device != self.device:
            cached = self.encode_text(self.tokenize([""]))
            self._empty_context = cached
        return cached

    def emphasize(self, tokens: torch.Tensor, emphasis: Optional[torch.Tensor], weight: float) -> torch.Tensor:
        """Compel's ``word++`` on (B, L, D) token states: ``empty + weight * (z - empty)`` where
        ``emphasis`` (B, L) is true, the empty prompt's state at the same position (weight 1.1 ** 2 =
        1.21, the reference's markup); unchanged where it is false, or without emphasis."""
        if emphasis is None or weight == 1.0:
            return tokens
        empty = self.empty_prompt_context().tokens.to(tokens.dtype)
        mask = emphasis.to(tokens.device)[..., None]
        return torch.where(mask, empty + float(weight) * (tokens - empty), tokens)


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompts: what the denoiser is conditioned on.

    Args:
        tokens: (B, L, D) per-token states; the cross-attention keys and values are made from them
            (for SDXL, both text encoders' states side by side).
        pooled: (B, P) the family's pooled text embeddings (SDXL's ``text_embeds``), or None.
        mask: (B, L) bool, the tokens the denoiser attends to (PixArt-Σ: T5's attention mask, padding
            False), or None when every token is attended to.

    Indexing, ``expand``, ``cat`` and ``to`` act on the batch of all three, as on a tensor's first dimension
    (``to`` moves the mask but keeps it bool).
    """

    tokens: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: Union[int, slice, Sequence[int], torch.Tensor]) -> "PromptEmbeds":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch dimension
        return PromptEmbeds(self.tokens[index], None if self.pooled is None else self.pooled[index],
                            None if self.mask is None else self.mask[index])

    def expand(self, n: int, *keep: int) -> "PromptEmbeds":
        """The batch of one prompt repeated ``n`` times (views, no copy); as ``Tensor.expand(n, -1, -1)``."""
        if any(k != -1 for k in keep):
            raise ValueError("PromptEmbeds.expand changes the batch size only: pass -1 for the other dimensions.")
        if self.tokens.shape[0] != 1:
            raise ValueError(f"expand() repeats a batch of one prompt, not of {self.tokens.shape[0]}.")
        return PromptEmbeds(self.tokens.expand(n, -1, -1), None if self.pooled is None else self.pooled.expand(n, -1),
                            None if self.mask is None else self.mask.expand(n, -1))

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        tokens = self.tokens.to(*args, **kwargs)
        return PromptEmbeds(tokens, None if self.pooled is None else self.pooled.to(*args, **kwargs),
                            None if self.mask is None else self.mask.to(tokens.device))

    def with_tokens(self, tokens: torch.Tensor) -> "PromptEmbeds":
        """The same prompts with other per-token states (e.g. ODISE's captioner added to them)."""
        return PromptEmbeds(tokens, self.pooled, self.mask)

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        joined = {}
        for field, what in (("pooled", "pooled embeddings"), ("mask", "attention masks")):
            parts = [getattr(p, field) for p in items]
            if any(p is None for p in parts) and not all(p is None for p in parts):
                raise ValueError(f"Cannot join prompts of families with and without {what}.")
            joined[field] = None if parts[0] is None else torch.cat(parts)
        return PromptEmbeds(torch.cat([p.tokens for p in items]), **joined)


def tokens_of(context: Union[PromptEmbeds, torch.Tensor]) -> torch.Tensor:
    """The per-token states of ``context`` (a ``PromptEmbeds`` or already a (B, L, D) tensor)."""
    return context.tokens if isinstance(context, PromptEmbeds) else context


def mask_of(context: Union[PromptEmbeds, torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, L) bool attention mask of ``context``, None when every token is attended to."""
    return context.mask if isinstance(context, PromptEmbeds) else None


def substrate_kind(weights: str, revision: Optional[str] = None) -> str:
    """Which substrate ``MODEL.DIFFSEG.SD.WEIGHTS`` loads as, read from the weights without loading them:
    "joint" (a joint-attention transformer: SD3 / SD3.5, FLUX.1), "pixart" (PixArt-Σ) or "unet" (anything
    else; the UNet loader reports weights it cannot read).

    Raises:
        UnsupportedFamilyError: the weights are a model of a family not supported (the message names
            the supported ones).
    """
    from ..pretrained.diffusion_transformers import names_transformer_family
    from ..pretrained.pixart import names_pixart_family

    if names_transformer_family(weights, revision or None):
        return "joint"
    if names_pixart_family(weights, revision or None):
        return "pixart"
    return "unet"


def load_diffusion(weights: str, revision: Optional[str] = None, dtype: str = "float32"):
    """The frozen substrate of ``MODEL.DIFFSEG.SD.WEIGHTS``, of the kind ``substrate_kind`` reads from the
    weights: a ``FrozenDiffusionTransformer``, a ``FrozenPixArt`` or a ``FrozenStableDiffusion``.

    Raises:
        UnsupportedFamilyError: the weights are a model of a family not supported (the message names
            the supported ones).
    """
    kind = substrate_kind(weights, revision)
    if kind == "joint":
        from ..pretrained.diffusion_transformers import load_diffusion_transformer
        from .frozen_transformer import FrozenDiffusionTransformer

        return FrozenDiffusionTransformer(load_diffusion_transformer(weights, revision or None), dtype=dtype)
    if kind == "pixart":
        from ..pretrained.pixart import load_pixart
        from .frozen_pixart import FrozenPixArt

        return FrozenPixArt(load_pixart(weights, revision or None), dtype=dtype)
    from ..pretrained.stable_diffusion import load_stable_diffusion
    from .frozen_sd import FrozenStableDiffusion

    return FrozenStableDiffusion(load_stable_diffusion(weights, revision or None), dtype=dtype)
