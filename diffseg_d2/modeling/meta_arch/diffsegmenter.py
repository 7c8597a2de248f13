"""DiffSegmenter: training-free segmentation from a diffusion UNet's attention.

One image: resize to a square, VAE-encode, add noise at a fixed timestep, run
the UNet ONCE while recording attention; each class's cross-attention on its
word tokens is its segmentation score, refined by the self-attention; a fixed
background score decides where no class is.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...diffusion import (
    AttentionStore,
    ClassPrompts,
    FrozenStableDiffusion,
    available_factors,
    build_class_prompts,
    load_stable_diffusion,
    minmax_per_map,
    record_attention,
)
from ...config import check_config
from ...vocabulary import background_index
from .open_vocab import OpenVocabularySegmenter, vocabulary_from_config

logger = logging.getLogger(__name__)

__all__ = ["DiffSegmenter"]

# Score of classes the category filter dropped: below any kept class's [0, 1] score.
DROPPED_SCORE = -1.0


@META_ARCH_REGISTRY.register()
class DiffSegmenter(OpenVocabularySegmenter):
    """Open-vocabulary semantic segmentation from Stable Diffusion attention (training-free)."""

    # How the latent-resolution class maps are brought to the output size.
    output_upsampling = "bilinear"

    @configurable
    def __init__(
        self,
        *,
        diffusion: FrozenStableDiffusion,
        vocabulary: Optional[Sequence[str]] = None,
        image_size: int = 512,
        noise_step: int = 100,
        seed: int = 0,
        prompt_template: str = "a photograph of {}.",
        conditioning: str = "shared",
        carrier_template: str = "a photograph of {}.",
        class_chunk_size: int = 8,
        cross_attn_factors: Sequence[int] = (8, 4, 2, 1),
        cross_attn_weights: Sequence[float] = (0.3, 0.5, 0.1, 0.1),
        self_attn_factor: int = 1,
        refine: bool = True,
        background_threshold: float = 0.4,
        category_filter: Optional[nn.Module] = None,
        captioner: Optional[nn.Module] = None,
        input_format: str = "RGB",
    ):
        """
        Args:
            diffusion: the frozen SD substrate.
            vocabulary: class names, the channel order of ``sem_seg``; a class
                named "background" gets the constant ``background_threshold``.
                May be set later with ``set_vocabulary`` or per input.
            image_size: side of the square the image is resized to for the VAE.
            noise_step: timestep (of 1000) of the added noise.
            seed: seed of the added noise.
            prompt_template: class prompt, "{}" -> class name.
            conditioning: "shared" (one UNet pass on a carrier prompt, class
                prompts read out against its queries) or "per_class" (one batch
                element per class prompt, chunked by ``class_chunk_size``).
            carrier_template: carrier prompt for "shared", "{}" -> joined class names.
            class_chunk_size: class prompts per UNet call with "per_class".
            cross_attn_factors: latent downsampling factors of the cross-attention read.
            cross_attn_weights: weight of each factor's normalised map.
            self_attn_factor: latent factor of the self-attention used for refinement.
            refine: apply the self-attention refinement.
            background_threshold: score of the background channel.
            category_filter: optional module ``(image, names) -> keep (K,) bool``.
            captioner: optional module ``image -> caption`` appended to every prompt.
            input_format: "RGB" or "BGR", the channel order of input images.
        """
        super().__init__(input_format=input_format)
        if conditioning not in ("shared", "per_class"):
            raise ValueError(f"MODEL.DIFFSEG.CONDITIONING must be 'shared' or 'per_class', not {conditioning!r}.")
        if len(cross_attn_factors) != len(cross_attn_weights) or not cross_attn_factors:
            raise ValueError(
                "MODEL.DIFFSEG.CROSS_ATTN_FACTORS and CROSS_ATTN_WEIGHTS must be non-empty and of equal length, "
                f"got {list(cross_attn_factors)} and {list(cross_attn_weights)}."
            )
        unet = diffusion.unet
        for key, kind, wanted in (
            ("CROSS_ATTN_FACTORS", "cross", list(cross_attn_factors)),
            ("SELF_ATTN_FACTOR", "self", [self_attn_factor] if refine else []),
        ):
            have = available_factors(unet, kind)
            if any(f not in have for f in wanted):
                raise ValueError(
                    f"MODEL.DIFFSEG.{key} = {wanted}, but this UNet has {kind}-attention only at latent factors {have}."
                )
        multiple = diffusion.latent_factor * max(available_factors(unet, "self") + available_factors(unet, "cross"))
        if image_size <= 0 or image_size % multiple:
            raise ValueError(f"MODEL.DIFFSEG.IMAGE_SIZE = {image_size} must be a positive multiple of {multiple}.")

        diffusion.check_timestep(noise_step, "MODEL.DIFFSEG.NOISE_STEP")
        if class_chunk_size < 1:
            raise ValueError(f"MODEL.DIFFSEG.CLASS_CHUNK_SIZE = {class_chunk_size} must be >= 1.")
        if not 0.0 <= background_threshold <= 1.0:
            raise ValueError(f"MODEL.DIFFSEG.BACKGROUND_THRESHOLD = {background_threshold} must be in [0, 1].")

        self.diffusion = diffusion
        self.image_size = int(image_size)
        self.noise_step = int(noise_step)
        self.seed = int(seed)
        self.prompt_template = prompt_template
        self.conditioning = conditioning
        self.carrier_template = carrier_template
        self.class_chunk_size = int(class_chunk_size)
        self.cross_attn_factors = [int(f) for f in cross_attn_factors]
        self.cross_attn_weights = [float(w) for w in cross_attn_weights]
        self.self_attn_factor = int(self_attn_factor)
        self.refine = bool(refine)
        self.background_threshold = float(background_threshold)
        self.category_filter = category_filter
        self.captioner = captioner
        # SD's VAE takes RGB in [-1, 1]: (x - 127.5) / 127.5. Fixed by the model, not a config choice.
        self.register_buffer("pixel_mean", torch.full((3, 1, 1), 127.5), persistent=False)
        self.register_buffer("pixel_std", torch.full((3, 1, 1), 127.5), persistent=False)
        if vocabulary:
            self.set_vocabulary(vocabulary)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        check_config(cfg)
        d = cfg.MODEL.DIFFSEG
        vocabulary = vocabulary_from_config(cfg)
        category_filter = captioner = None
        if d.CATEGORY_FILTER.ENABLED:
            from ..clip import CategoryFilter, OpenCLIP

            category_filter = CategoryFilter(
                OpenCLIP.from_weights(d.CLIP.WEIGHTS, d.CLIP.TEMPLATES),
                threshold=d.CATEGORY_FILTER.THRESHOLD,
                top_k=d.CATEGORY_FILTER.TOP_K,
            )
        if d.CAPTION.ENABLED:
            from ..blip_captioner import BlipCaptioner

            captioner = BlipCaptioner.from_weights(d.CAPTION.WEIGHTS, d.CAPTION.MAX_NEW_TOKENS)
        diffusion = FrozenStableDiffusion(
            load_stable_diffusion(d.SD.WEIGHTS, d.SD.REVISION or None), dtype=d.SD.DTYPE
        )
        return {
            "diffusion": diffusion,
            "vocabulary": vocabulary,
            "image_size": d.IMAGE_SIZE,
            "noise_step": d.NOISE_STEP,
            "seed": d.SEED,
            "prompt_template": d.PROMPT_TEMPLATE,
            "conditioning": d.CONDITIONING,
            "carrier_template": d.CARRIER_TEMPLATE,
            "class_chunk_size": d.CLASS_CHUNK_SIZE,
            "cross_attn_factors": list(d.CROSS_ATTN_FACTORS),
            "cross_attn_weights": list(d.CROSS_ATTN_WEIGHTS),
            "self_attn_factor": d.SELF_ATTN_FACTOR,
            "refine": d.REFINE,
            "background_threshold": d.BACKGROUND_THRESHOLD,
            "category_filter": category_filter,
            "captioner": captioner,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ------------------------------------------------------------------ vocabulary
    def _check_vocabulary(self, names: Sequence[str]) -> None:
        # Building the class prompts checks them (tokenisation, length) and warms the cache.
        bg = background_index(names)
        prompted = [n for i, n in enumerate(names) if i != bg]
        if prompted:
            self._vocabulary_prompts(tuple(prompted))

    def _vocabulary_prompts(self, names: Tuple[str, ...]) -> Tuple[ClassPrompts, torch.Tensor]:
        """Class prompts and their encoded text ``(K, L, D)``, cached per vocabulary."""

        def compute():
            prompts = build_class_prompts(self.diffusion.tokenizer, names, self.prompt_template)
            return prompts, self.diffusion.encode_text(prompts.input_ids)

        return self._cached(("vocabulary", names), compute)

    def _carrier_context(self, carrier: str) -> torch.Tensor:
        """Encoded carrier prompt ``(1, L, D)``, cached (it repeats whenever the kept classes do)."""
        # The carrier only steers the pass; truncating it loses no class read-out.
        d = self.diffusion
        return self._cached(("carrier", carrier), lambda: d.encode_text(d.tokenize([carrier], truncate=True)))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def segment(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int]) -> torch.Tensor:
        """Scores ``(K, *out_size)`` of one RGB image ``(3, H, W)`` in [0, 255] for ``names``:
        normalised maps in [0, 1] for prompted classes, ``background_threshold`` for
        "background", -1 for classes the category filter dropped."""
        bg = background_index(names)
        prompted = [i for i in range(len(names)) if i != bg]
        scores = torch.full((len(names), *out_size), DROPPED_SCORE, device=self.device)
        if bg is not None:
            scores[bg] = self.background_threshold
        if not prompted:
            return scores
        kept = prompted
        if self.category_filter is not None:
            keep = self.category_filter(image, [names[i] for i in prompted])
            kept = [i for i, k in zip(prompted, keep.tolist()) if k]
        caption = self.captioner(image) if self.captioner is not None else ""
        maps = self.class_maps(image, [names[i] for i in prompted], [prompted.index(i) for i in kept], caption)
        # One class at a time, straight into the output: peak memory stays near one (K, H, W)
        # tensor however large the image or the vocabulary.
        for row, channel in enumerate(kept):
            up = F.interpolate(maps[row][None, None], size=out_size, mode=self.output_upsampling, align_corners=False)
            scores[channel] = minmax_per_map(up[0])[0]
        return scores

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """VAE latents ``(1, C, h, w)`` of one RGB image ``(3, H, W)`` in [0, 255], resized to ``IMAGE_SIZE``²."""
        x = F.interpolate(image[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.diffusion.encode_images((x - self.pixel_mean) / self.pixel_std)

    def class_maps(
        self, image: torch.Tensor, names: Sequence[str], rows: Sequence[int], caption: str = ""
    ) -> torch.Tensor:
        """Refined attention maps ``(len(rows), h, w)`` at latent resolution.

        Args:
            image: (3, H, W) RGB in [0, 255].
            names: the prompted classes of the vocabulary (prompts are cached per tuple of them).
            rows: which of ``names`` to compute maps for (those the filter kept).
            caption: appended to every class prompt when not empty.
        """
        d = self.diffusion
        if caption:
            prompts = build_class_prompts(d.tokenizer, [names[r] for r in rows], self.prompt_template, caption)
            context = d.encode_text(prompts.input_ids)
            token_index, token_weight = prompts.token_index, prompts.token_weight
        else:
            prompts, context = self._vocabulary_prompts(tuple(names))
            sel = torch.as_tensor(list(rows), dtype=torch.long)
            context = context[sel.to(context.device)]
            token_index, token_weight = prompts.token_index[sel], prompts.token_weight[sel]

        latents = self.encode(image)
        generator = torch.Generator(device=latents.device).manual_seed(self.seed)
        noisy = d.add_noise(latents, self.noise_step, generator)

        shared = self.conditioning == "shared"
        store = AttentionStore(noisy.shape[-2:], token_index, token_weight, readout_context=context if shared else None)
        self_factors = [self.self_attn_factor] if self.refine else []
        with record_attention(d.unet, store, self.cross_attn_factors, self_factors):
            if shared:
                carrier = self.carrier_template.format(", ".join(names[r] for r in rows))
                if caption:
                    carrier = f"{carrier} {caption}"
                d.unet_forward(noisy, self.noise_step, self._carrier_context(carrier))
            else:
                for start in range(0, len(rows), self.class_chunk_size):
                    chunk = slice(start, min(len(rows), start + self.class_chunk_size))
                    store.batch_classes = chunk
                    n = chunk.stop - chunk.start
                    d.unet_forward(noisy.expand(n, -1, -1, -1), self.noise_step, context[chunk])
        return self._combine(store)

    def _combine(self, store: AttentionStore) -> torch.Tensor:
        """Weighted sum of per-factor normalised maps, then the self-attention refinement: (K, h, w)."""
        target = store.resolution(self.self_attn_factor if self.refine else min(self.cross_attn_factors))
        combined = 0.0
        for factor, weight in zip(self.cross_attn_factors, self.cross_attn_weights):
            maps = store.cross_maps(factor)
            if tuple(maps.shape[-2:]) != target:
                maps = F.interpolate(maps[None], size=target, mode="bilinear", align_corners=False)[0]
            combined = combined + weight * minmax_per_map(maps)
        if self.refine:
            attn = store.self_map(self.self_attn_factor)  # (N, N), rows = queries
            combined = (combined.flatten(1) @ attn.T).view_as(combined)
        return combined
