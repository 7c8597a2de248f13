"""DAAM baseline: DAAM's attention aggregation on the same frozen UNet as DiffSegmenter.

DAAM ("What the DAAM", Tang et al., ACL 2023; castorini/daam) explains a generated image by, for
each prompt word, summing each head's cross-attention of every down- and up-block layer (not the
mid block's) over the timesteps of the generation, upsampling each (layer, head) map bicubically
to the finest attention grid with its negative overshoot clamped, averaging over all (layer,
head) pairs and over the word's tokens (``diffusion.daam_heat_maps``), then upsampling to the
image and min-max normalising it; a word's segment is where the normalised map exceeds a
threshold (0.4 was the paper's best). The ``daam`` package pins diffusers 0.21 and transformers
4.30, which our stack does not run, so the aggregation is written here on the substrate's
attention recording (checked against castorini/daam's SDXL trace on shared weights: README).

On a real image there is no generation to trace: the image is noised, with one
noise sample, at each of ``MODEL.DIFFSEG.DAAM.TIMESTEPS`` and the UNet is run on ONE
prompt that names every class (``CARRIER_TEMPLATE``); each class is read from its
own words in that prompt. What DAAM does not have, and this baseline therefore
leaves out: per-resolution weights and normalisation, self-attention refinement and
the category filter. Classes become channels as in DiffSegmenter: per-class min-max
maps, with "background" at the constant ``BACKGROUND_THRESHOLD`` (DAAM's threshold).

On PixArt-Σ, a cross-attention transformer, the UNet's aggregation reads the cross-attention of
``MODEL.DIFFSEG.TRANSFORMER.BLOCKS`` (empty: all), every head of every block on its one token grid
(nothing is upsampled before the mean; no block is left out as DAAM leaves out the mid block).

On a joint-attention transformer (SD3 / FLUX) the same aggregation reads the joint attention: each
class word's image-to-text probability (normalised over the whole joint sequence) of every head
of every block (``MODEL.DIFFSEG.TRANSFORMER.BLOCKS``, empty: all), averaged, summed over the
timesteps; all blocks share one token grid, so nothing is upsampled before the mean.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...diffusion import (
    AttentionStore,
    ClassPrompts,
    JointAttentionStore,
    available_factors,
    daam_heat_maps,
    record_attention,
    record_joint_attention,
)
from .diffsegmenter import DiffSegmenter

__all__ = ["DAAM"]


@META_ARCH_REGISTRY.register()
class DAAM(DiffSegmenter):
    """Training-free baseline: DAAM's sum of cross-attention over all layers and several timesteps."""

    output_upsampling = "bicubic"

    @configurable
    def __init__(self, *, timesteps: Sequence[int], **kwargs):
        """
        Args:
            timesteps: timesteps (of the scheduler's training steps) at which the image is
                noised and the UNet run; their maps are summed.
            kwargs: as DiffSegmenter; its refinement, category filter and captioner are off.
        """
        # DAAM reads one joint prompt, unweighted, from the posterior mean of the image.
        kwargs.update(refine=False, category_filter=None, captioner=None, conditioning="shared", vae_latent="mean",
                      resize_antialias=True, class_token_weight=1.0, token_selection="mean", ing_rule=False)
        super().__init__(**kwargs)
        steps = int(self.diffusion.scheduler.config.num_train_timesteps)
        if not timesteps or any(not 0 <= int(t) < steps for t in timesteps):
            raise ValueError(
                f"MODEL.DIFFSEG.DAAM.TIMESTEPS = {list(timesteps)} must be a non-empty list of timesteps in [0, {steps})."
            )
        self.timesteps = [int(t) for t in timesteps]

    @classmethod
    def from_config(cls, cfg) -> Dict:
        cfg = cfg.clone()
        cfg.defrost()
        # Nothing DAAM lacks is built (no CLIP for a filter, no captioner).
        cfg.MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED = False
        cfg.MODEL.DIFFSEG.CAPTION.ENABLED = False
        args = super().from_config(cfg)
        args["timesteps"] = list(cfg.MODEL.DIFFSEG.DAAM.TIMESTEPS)
        unet = getattr(args["diffusion"], "unet", None)
        if unet is not None:  # every cross-attention layer, equally (a transformer reads TRANSFORMER.BLOCKS)
            factors = available_factors(unet, "cross")
            args.update(cross_attn_factors=factors, cross_attn_weights=[1.0] * len(factors))
        return args

    def _vocabulary_prompts(self, names: Tuple[str, ...]) -> Tuple[ClassPrompts, torch.Tensor]:
        """ONE prompt naming every class (DiffSegmenter has one per class) and its encoded text
        ``(1, L, D)``, cached per vocabulary; building it checks the names and the length."""

        def compute():
            prompts = self.diffusion.joint_prompt(list(names), self.carrier_template, self.text_segment)
            return prompts, self.diffusion.encode_text(prompts.input_ids[:1])

        return self._cached(("vocabulary", names), compute)

    def class_maps(self, image: torch.Tensor, names: Sequence[str], rows: Sequence[int]) -> torch.Tensor:
        """Summed cross-attention ``(len(rows), h, w)`` at the finest cross-attention resolution."""
        d = self.diffusion
        prompts, context = self._vocabulary_prompts(tuple(names[r] for r in rows))
        latents = self.encode(image, torch.Generator().manual_seed(self.seed))  # CPU draws: see noisy_latents
        if self.is_transformer:
            return self._transformer_daam(latents, context, prompts)
        # The UNet runs on the joint prompt itself, so each layer's own attention is read:
        # one softmax per layer, each class taken from its tokens.
        store = AttentionStore(latents.shape[-2:], prompts.token_index, prompts.token_weight, per_layer_heads=True)
        with record_attention(d.denoiser, store, **self.recorded_layers):
            for t in self.timesteps:
                # The same noise sample at every timestep: points on one forward trajectory.
                generator = torch.Generator().manual_seed(self.seed)
                d.denoise(d.add_noise(latents, t, generator), t, context)
        return self._combine(store)

    def _transformer_daam(self, latents: torch.Tensor, context, prompts: ClassPrompts) -> torch.Tensor:
        """The blocks' mean image-to-text attention of each class word, summed over ``timesteps``: (K, h, w)."""
        d = self.diffusion
        store = JointAttentionStore(prompts.token_index, prompts.token_weight, self.attention_direction)
        with record_joint_attention(d.transformer, store, self.transformer_blocks, d.text_layout.length):
            for t in self.timesteps:
                generator = torch.Generator().manual_seed(self.seed)  # one noise sample, as on the UNet
                d.denoise(d.add_noise(latents, t, generator), t, context)
        maps = store.maps() * len(self.timesteps)  # the mean over calls, times the calls: the sum over timesteps
        return maps.view(-1, latents.shape[-2] // d.patch, latents.shape[-1] // d.patch)

    def _combine(self, store: AttentionStore) -> torch.Tensor:
        return daam_heat_maps(store, store.resolution(min(self.cross_attn_factors)))
