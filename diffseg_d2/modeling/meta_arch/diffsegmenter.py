"""DiffSegmenter: training-free segmentation from a diffusion model's attention.

One image: keep the classes the category filter judges present, resize to a
square, VAE-encode, add noise at a fixed timestep, run the denoiser (one pass per
kept class in reference mode) while recording attention; each class's
cross-attention on its word tokens is its segmentation score, refined by the
self-attention; a fixed background score decides where no class is.

On a UNet (SD 1.x / 2.x / XL) the maps are read by latent resolution (the reference's
factors and weights); on PixArt-Σ, a cross-attention transformer, from chosen blocks' cross- and
self-attention by the same recording (its T5 padding masked out as the model masks it); on a
joint-attention transformer (SD3 / SD3.5, FLUX.1) from chosen joint-attention blocks, exactly and
streamed (``diffusion.readouts``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...config import CARRIER_TEMPLATE, check_config
from ...diffusion import (
    AttentionStore,
    ClassPrompts,
    FrozenDiffusionTransformer,
    attention_blocks,
    JointAttentionStore,
    TOKEN_SELECTIONS,
    available_factors,
    load_diffusion,
    minmax_per_map,
    record_attention,
    record_joint_attention,
)
from ...diffusion.concept_attention import ConceptAttentionStore, double_stream_blocks, record_concept_attention
from ...diffusion.joint_attention import DIRECTIONS, checked_blocks
from ...diffusion.substrate import FrozenDiffusion
from ...pretrained.blip import BlipCaptioner
from ...pretrained.clip import OpenCLIP
from ...vocabulary import background_index
from .class_lists import ImageClassLists
from .open_vocab import OpenVocabularySegmenter, open_vocab_args_from_config

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
        diffusion: FrozenDiffusion,
        vocabulary: Optional[Sequence[str]] = None,
        thing_classes: Optional[Sequence[str]] = None,
        stuff_classes: Optional[Sequence[str]] = None,
        panoptic_min_area: Optional[float] = None,
        image_size: int = 512,
        resize_antialias: bool = False,
        vae_latent: str = "sample",
        noise_step: int = 100,
        seed: int = 0,
        prompt_template: str = "a photograph of {}",
        prompt_names: Optional[Dict[str, str]] = None,
        class_token_weight: float = 1.21,
        token_selection: str = "first",
        ing_rule: bool = True,
        conditioning: str = "per_class",
        refinement: str = "own",
        carrier_template: str = CARRIER_TEMPLATE,
        class_chunk_size: int = 4,
        cross_attn_factors: Sequence[int] = (8, 4, 2, 1),
        cross_attn_weights: Sequence[float] = (0.3, 0.5, 0.1, 0.1),
        self_attn_factor: int = 1,
        refine: bool = True,
        transformer_blocks: Sequence[str] = (),
        refine_blocks: Sequence[str] = (),
        text_segment: str = "t5",
        attention_direction: str = "image_to_text",
        transformer_readout: str = "attention",
        background_threshold: float = 0.4,
        category_filter: Optional[nn.Module] = None,
        class_lists: Optional[ImageClassLists] = None,
        captioner: Optional[nn.Module] = None,
        caption_conditioned: bool = True,
        input_format: str = "RGB",
    ):
        """
        The defaults compute what the reference code computes; each of our departures is an
        argument (the config key in capitals under MODEL.DIFFSEG).

        Args:
            diffusion: the frozen diffusion substrate (a UNet or a diffusion-transformer family).
            vocabulary: class names, the channel order of ``sem_seg``; a class
                named "background" gets the constant ``background_threshold``.
                May be set later with ``set_vocabulary`` or per input.
            thing_classes: the vocabulary's thing classes, a dataset's (None: see ``stuff_classes``).
            stuff_classes: with a vocabulary of the user's, the classes that are stuff in
                ``panoptic_seg``; the others are things and "background" is void
                (``MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES``; see ``panoptic_roles``).
            panoptic_min_area: smallest panoptic segment, a fraction of the image (None: no
                ``panoptic_seg``); see ``OpenVocabularySegmenter``.
            image_size: side of the square the image is resized to for the VAE.
            resize_antialias: antialias that resize (the reference does not).
            vae_latent: "sample" (a seeded posterior draw, the reference) or "mean".
            noise_step: timestep (of 1000) of the added noise.
            seed: seed of the VAE sample and the added noise.
            prompt_template: class prompt, "{}" -> the class's prompt name.
            prompt_names: class name -> the word its prompts use instead (the reference's
                single-token VOC names); the output keeps the class names.
            class_token_weight: Compel-style weight of the class name's last word (1.21 = "++").
            token_selection: which of the class name's tokens are read: "first", "last", "mean".
            ing_rule: the reference's "-ing" rule (see ``build_class_prompts``).
            conditioning: "per_class" (one batch element per class prompt, chunked by
                ``class_chunk_size``; the reference) or "shared" (one UNet pass on a carrier
                prompt, class prompts read out against its queries; ours).
            refinement: with "per_class": "own" (each class refined by the self-attention of its
                own pass, the reference) or "averaged" (by the mean over all passes; ours).
            carrier_template: carrier prompt for "shared", "{}" -> joined class names.
            class_chunk_size: class prompts per UNet call with "per_class".
            cross_attn_factors: latent downsampling factors of the cross-attention read.
            cross_attn_weights: weight of each factor's normalised map.
            self_attn_factor: latent factor of the self-attention used for refinement.
            refine: apply the self-attention refinement.
            transformer_blocks, refine_blocks, text_segment, attention_direction: on a diffusion
                transformer (``MODEL.DIFFSEG.TRANSFORMER``), in place of the factors above: the
                blocks whose class maps are averaged (empty: all; PixArt-Σ's cross-attention, the
                others' joint attention), the blocks whose image-to-image attention refines them
                (none: no refinement), the text encoder's tokens the class word is read from ("t5";
                SD3 also "clip"), and "image_to_text" or "text_to_image" (joint attention only).
            transformer_readout: "attention" (the class words' attention probabilities) or "concept"
                (FLUX: ConceptAttention's output-space maps, each class a concept token; ours).
            background_threshold: score of the background channel.
            category_filter: optional module ``(image, names) -> keep (K,) bool``.
            class_lists: the reference's per-image class lists (``CATEGORY_FILTER.CLASS_LISTS``);
                when given, they decide which classes are prompted and ``category_filter`` is unused.
            captioner: optional BLIP captioner; its text continues the class prompts.
            caption_conditioned: True: one caption per class, generated FROM its prompt and
                appended after the class word (the reference); False: one caption of the image
                appended to every prompt (ours, one generation per image).
            input_format: "RGB" or "BGR", the channel order of input images.
        """
        super().__init__(input_format=input_format, panoptic_min_area=panoptic_min_area, stuff_classes=stuff_classes)
        choices = {
            "CONDITIONING": (conditioning, ("shared", "per_class")),
            "REFINEMENT": (refinement, ("own", "averaged")),
            "VAE_LATENT": (vae_latent, ("sample", "mean")),
            "TOKEN_SELECTION": (token_selection, TOKEN_SELECTIONS),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"MODEL.DIFFSEG.{key} must be one of {list(allowed)}, not {value!r}.")
        if len(cross_attn_factors) != len(cross_attn_weights) or not cross_attn_factors:
            raise ValueError(
                "MODEL.DIFFSEG.CROSS_ATTN_FACTORS and CROSS_ATTN_WEIGHTS must be non-empty and of equal length, "
                f"got {list(cross_attn_factors)} and {list(cross_attn_weights)}."
            )
        self.is_transformer = isinstance(diffusion, FrozenDiffusionTransformer)
        by_block = getattr(diffusion, "layers_by_block", False)
        if self.is_transformer or by_block:
            transformer_blocks, refine_blocks = self._check_transformer_reads(
                diffusion, transformer_blocks, refine_blocks if refine else (), text_segment, attention_direction,
                refinement, transformer_readout)
            multiple = diffusion.latent_factor * diffusion.patch
            if by_block:  # one token grid: the recording's one factor, every block's map weighted alike
                cross_attn_factors, cross_attn_weights = [diffusion.patch], [1.0]
                self_attn_factor, refine = diffusion.patch, bool(refine_blocks)
        else:
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
        self.resize_antialias = bool(resize_antialias)
        self.vae_latent = vae_latent
        self.noise_step = int(noise_step)
        self.seed = int(seed)
        self.prompt_template = prompt_template
        self.prompt_names = dict(prompt_names or {})
        self.class_token_weight = float(class_token_weight)
        self.token_selection = token_selection
        self.ing_rule = bool(ing_rule)
        self.conditioning = conditioning
        self.refinement = refinement
        self.carrier_template = carrier_template
        self.class_chunk_size = int(class_chunk_size)
        self.cross_attn_factors = [int(f) for f in cross_attn_factors]
        self.cross_attn_weights = [float(w) for w in cross_attn_weights]
        self.self_attn_factor = int(self_attn_factor)
        self.refine = bool(refine)
        self.transformer_blocks = tuple(transformer_blocks)
        self.refine_blocks = tuple(refine_blocks)
        self.text_segment = text_segment
        self.attention_direction = attention_direction
        self.transformer_readout = transformer_readout
        self.background_threshold = float(background_threshold)
        self.category_filter = category_filter
        self.class_lists = class_lists
        self.captioner = captioner
        self.caption_conditioned = bool(caption_conditioned)
        # SD's VAE takes RGB in [-1, 1]: (x - 127.5) / 127.5. Fixed by the model, not a config choice.
        self.register_buffer("pixel_mean", torch.full((3, 1, 1), 127.5), persistent=False)
        self.register_buffer("pixel_std", torch.full((3, 1, 1), 127.5), persistent=False)
        if vocabulary:
            self.set_vocabulary(vocabulary, thing_classes)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        check_config(cfg)
        d = cfg.MODEL.DIFFSEG
        category_filter = captioner = class_lists = None
        if d.CATEGORY_FILTER.CLASS_LISTS:  # the reference's own per-image lists: no CLIP filter
            class_lists = ImageClassLists.from_file(d.CATEGORY_FILTER.CLASS_LISTS, d.CATEGORY_FILTER.CLASS_LISTS_TABLES)
        elif d.CATEGORY_FILTER.ENABLED:
            category_filter = CategoryFilter(
                OpenCLIP.from_weights(d.CLIP.WEIGHTS, d.CLIP.TEMPLATES),
                threshold=d.CATEGORY_FILTER.THRESHOLD,
                top_k=d.CATEGORY_FILTER.TOP_K,
            )
        if d.CAPTION.ENABLED:
            captioner = BlipCaptioner.from_weights(d.CAPTION.WEIGHTS, d.CAPTION.MAX_NEW_TOKENS)
        diffusion = load_diffusion(d.SD.WEIGHTS, d.SD.REVISION, dtype=d.SD.DTYPE)
        return {
            "diffusion": diffusion,
            **open_vocab_args_from_config(cfg),
            "image_size": d.IMAGE_SIZE,
            "resize_antialias": d.RESIZE_ANTIALIAS,
            "vae_latent": d.VAE_LATENT,
            "noise_step": d.NOISE_STEP,
            "seed": d.SEED,
            "prompt_template": d.PROMPT_TEMPLATE,
            "prompt_names": parse_prompt_names(d.PROMPT_NAMES),
            "class_token_weight": d.CLASS_TOKEN_WEIGHT,
            "token_selection": d.TOKEN_SELECTION,
            "ing_rule": d.ING_RULE,
            "conditioning": d.CONDITIONING,
            "refinement": d.REFINEMENT,
            "carrier_template": d.CARRIER_TEMPLATE,
            "class_chunk_size": d.CLASS_CHUNK_SIZE,
            "cross_attn_factors": list(d.CROSS_ATTN_FACTORS),
            "cross_attn_weights": list(d.CROSS_ATTN_WEIGHTS),
            "self_attn_factor": d.SELF_ATTN_FACTOR,
            "refine": d.REFINE,
            "transformer_blocks": list(d.TRANSFORMER.BLOCKS),
            "refine_blocks": list(d.TRANSFORMER.REFINE_BLOCKS),
            "text_segment": d.TRANSFORMER.TEXT_SEGMENT,
            "attention_direction": d.TRANSFORMER.DIRECTION,
            "transformer_readout": d.TRANSFORMER.READOUT,
            "background_threshold": d.BACKGROUND_THRESHOLD,
            "category_filter": category_filter,
            "class_lists": class_lists,
            "captioner": captioner,
            "caption_conditioned": d.CAPTION.CONDITIONED,
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def recorded_layers(self) -> Dict[str, Sequence]:
        """The cross-attention recording's layers (``record_attention``'s arguments): by block on a
        transformer of one token grid (PixArt-Σ), by latent factor on a UNet."""
        if getattr(self.diffusion, "layers_by_block", False):
            return dict(cross_blocks=self.transformer_blocks, self_blocks=self.refine_blocks if self.refine else ())
        return dict(cross_factors=self.cross_attn_factors, self_factors=[self.self_attn_factor] if self.refine else [])

    # ------------------------------------------------------------------ vocabulary
    def _check_vocabulary(self, names: Sequence[str]) -> None:
        # Building the class prompts checks them (tokenisation, length) and warms the cache.
        bg = background_index(names)
        prompted = [n for i, n in enumerate(names) if i != bg]
        if prompted:
            self._vocabulary_prompts(tuple(prompted))

    def prompt_name(self, name: str) -> str:
        """The word the prompts use for class ``name`` (``PROMPT_NAMES``, else the name itself)."""
        return self.prompt_names.get(name, name)

    def _build_prompts(self, names: Sequence[str], *, suffix: str = "", continuations=None) -> Tuple[ClassPrompts, torch.Tensor]:
        """Class prompts for ``names`` and their encoded text ``(K, L, D)`` (class words weighted)."""
        prompts = self.diffusion.class_prompts(
            [self.prompt_name(n) for n in names], self.prompt_template, suffix, continuations=continuations,
            selection=self.token_selection, ing_rule=self.ing_rule, segment=self.text_segment,
        )
        context = self.diffusion.encode_text(prompts.input_ids, prompts.emphasis, self.class_token_weight)
        return prompts, context

    def _vocabulary_prompts(self, names: Tuple[str, ...]) -> Tuple[ClassPrompts, torch.Tensor]:
        """Class prompts and their encoded text ``(K, L, D)``, cached per vocabulary."""
        return self._cached(("vocabulary", names), lambda: self._build_prompts(names))

    def _image_prompts(self, image: torch.Tensor, names: Sequence[str]) -> Tuple[ClassPrompts, torch.Tensor]:
        """The class prompts of one image: the cached ones, or continued by its captions."""
        if self.captioner is None:
            return self._vocabulary_prompts(tuple(names))
        if self.caption_conditioned:
            continuations = [
                self.captioner.continue_prompt(image, self.prompt_template.format(self.prompt_name(n))) for n in names
            ]
            return self._build_prompts(names, continuations=continuations)
        return self._build_prompts(names, suffix=self.captioner(image))

    def _carrier_context(self, carrier: str) -> torch.Tensor:
        """Encoded carrier prompt ``(1, L, D)``, cached (it repeats whenever the kept classes do)."""
        # The carrier only steers the pass; truncating it loses no class read-out.
        d = self.diffusion
        return self._cached(("carrier", carrier), lambda: d.encode_text(d.tokenize([carrier], truncate=True)))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def segment(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int],
                file_name: Optional[str] = None) -> torch.Tensor:
        """Scores ``(K, *out_size)`` of one RGB image ``(3, H, W)`` in [0, 255] for ``names``:
        normalised maps in [0, 1] for prompted classes, ``background_threshold`` for
        "background", -1 for classes the category filter (or the image's class list, looked up
        by ``file_name``) dropped."""
        bg = background_index(names)
        prompted = [i for i in range(len(names)) if i != bg]
        scores = torch.full((len(names), *out_size), DROPPED_SCORE, device=self.device)
        if bg is not None:
            scores[bg] = self.background_threshold
        if not prompted:
            return scores
        kept = prompted
        if self.class_lists is not None:
            keep = self.class_lists.listed(file_name, [names[i] for i in prompted], self.prompt_name)
            kept = [i for i, k in zip(prompted, keep) if k]
        elif self.category_filter is not None:
            keep = self.category_filter(image, [names[i] for i in prompted])
            kept = [i for i, k in zip(prompted, keep.tolist()) if k]
        if not kept:
            return scores
        maps = self.class_maps(image, [names[i] for i in prompted], [prompted.index(i) for i in kept])
        # One class at a time, straight into the output: peak memory stays near one (K, H, W)
        # tensor however large the image or the vocabulary.
        for row, channel in enumerate(kept):
            up = F.interpolate(maps[row][None, None], size=out_size, mode=self.output_upsampling, align_corners=False)
            scores[channel] = minmax_per_map(up[0])[0]
        return scores

    def encode(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE latents ``(1, C, h, w)`` of one RGB image ``(3, H, W)`` in [0, 255], resized to
        ``IMAGE_SIZE``²; a posterior sample drawn from ``generator`` or the mean (``VAE_LATENT``)."""
        x = F.interpolate(
            image[None], size=(self.image_size,) * 2, mode="bilinear", antialias=self.resize_antialias, align_corners=False
        )
        sample = generator if self.vae_latent == "sample" else None
        return self.diffusion.encode_images((x - self.pixel_mean) / self.pixel_std, sample)

    def noisy_latents(self, image: torch.Tensor) -> torch.Tensor:
        """The latents ``(1, C, h, w)`` the UNet reads: encoded, then noised at ``NOISE_STEP``.
        Both draws (VAE sample, noise) come from one generator seeded with ``SEED``, in that order.
        The generator is a CPU one whatever the model's device (the draws are moved), so a seed gives
        the same noise on CUDA as on the CPU, as diffusers draws its latents."""
        generator = torch.Generator().manual_seed(self.seed)
        latents = self.encode(image, generator)
        return self.diffusion.add_noise(latents, self.noise_step, generator)

    def class_maps(self, image: torch.Tensor, names: Sequence[str], rows: Sequence[int]) -> torch.Tensor:
        """Refined attention maps ``(len(rows), h, w)`` at latent resolution.

        Args:
            image: (3, H, W) RGB in [0, 255].
            names: the prompted classes of the vocabulary (prompts are cached per tuple of them).
            rows: which of ``names`` to compute maps for (those the filter kept).
        """
        d = self.diffusion
        if self.captioner is None:
            prompts, context = self._vocabulary_prompts(tuple(names))
            sel = torch.as_tensor(list(rows), dtype=torch.long)
            context = context[sel.to(context.device)]
            token_index, token_weight = prompts.token_index[sel], prompts.token_weight[sel]
        else:  # captions depend on the image: prompts for the kept classes only
            prompts, context = self._image_prompts(image, [names[r] for r in rows])
            token_index, token_weight = prompts.token_index, prompts.token_weight
        noisy = self.noisy_latents(image)
        if self.is_transformer:
            return self._transformer_maps(noisy, [names[r] for r in rows], context, token_index, token_weight)

        if self.conditioning == "shared":
            store = AttentionStore(noisy.shape[-2:], token_index, token_weight,
                                   readout_context=d.cross_attention_states(context))
            carrier = self.carrier_template.format(", ".join(self.prompt_name(names[r]) for r in rows))
            with record_attention(d.denoiser, store, **self.recorded_layers):
                d.denoise(noisy, self.noise_step, self._carrier_context(carrier))
            return self._combine(store)

        chunks = [slice(s, min(len(rows), s + self.class_chunk_size)) for s in range(0, len(rows), self.class_chunk_size)]
        if self.refine and self.refinement == "own":
            # Classes are independent: each chunk is recorded, combined and refined with its own
            # passes' self-attention, then its queries and keys are dropped.
            maps = []
            for chunk in chunks:
                store = AttentionStore(noisy.shape[-2:], token_index[chunk], token_weight[chunk], own_self_attention=True)
                with record_attention(d.denoiser, store, **self.recorded_layers):
                    d.denoise(noisy.expand(chunk.stop - chunk.start, -1, -1, -1), self.noise_step, context[chunk])
                maps.append(self._combine(store))
            return torch.cat(maps)
        store = AttentionStore(noisy.shape[-2:], token_index, token_weight)
        with record_attention(d.denoiser, store, **self.recorded_layers):
            for chunk in chunks:
                store.batch_classes = chunk
                d.denoise(noisy.expand(chunk.stop - chunk.start, -1, -1, -1), self.noise_step, context[chunk])
        return self._combine(store)

    # ------------------------------------------------------------------ diffusion transformers
    @staticmethod
    def _check_transformer_reads(diffusion, blocks, refine_blocks, text_segment, direction, refinement, readout):
        """The blocks to read on a diffusion transformer (all when none are named), checked."""
        if readout not in ("attention", "concept"):
            raise ValueError(f"MODEL.DIFFSEG.TRANSFORMER.READOUT must be 'attention' or 'concept', not {readout!r}.")
        key, title = "MODEL.DIFFSEG.TRANSFORMER.", diffusion.family.title
        if not isinstance(diffusion, FrozenDiffusionTransformer):  # a cross-attention transformer (PixArt-Σ)
            if readout != "attention" or direction != "image_to_text":
                raise ValueError(f"{title} reads its text through cross-attention (image queries, text keys): "
                                 f"{key}READOUT must be 'attention' and {key}DIRECTION 'image_to_text'.")
            if text_segment not in diffusion.text_segments:
                raise ValueError(f"{key}TEXT_SEGMENT = {text_segment!r}: the {title} text is {list(diffusion.text_segments)}.")
            model = diffusion.denoiser
            cross = checked_blocks(model, blocks, key + "BLOCKS", title, attention_blocks(model, "cross"), "cross-attention")
            if refine_blocks:
                checked_blocks(model, refine_blocks, key + "REFINE_BLOCKS", title, attention_blocks(model, "self"),
                               "self-attention")
            return tuple(cross), tuple(refine_blocks)
        if readout == "concept":
            try:
                double = list(double_stream_blocks(diffusion.transformer))
            except ValueError:
                raise ValueError(f"MODEL.DIFFSEG.TRANSFORMER.READOUT concept reads FLUX's double-stream blocks; "
                                 f"{diffusion.family.title} has none: use READOUT attention.") from None
            blocks = list(blocks) or double
            if any(b not in double for b in blocks):
                raise ValueError(f"MODEL.DIFFSEG.TRANSFORMER.BLOCKS = {list(blocks)}: READOUT concept reads FLUX's "
                                 f"double-stream blocks, {double}.")
        blocks = checked_blocks(diffusion.transformer, blocks, key + "BLOCKS", title)
        if refine_blocks:  # none named: no refinement (not every block)
            checked_blocks(diffusion.transformer, refine_blocks, key + "REFINE_BLOCKS", title)
        if refinement != "own" and refine_blocks:
            raise ValueError("MODEL.DIFFSEG.REFINEMENT averaged is read on UNets only; on a diffusion transformer "
                             "each class is refined by its own pass (REFINEMENT own).")
        if text_segment not in diffusion.text_segments:
            raise ValueError(f"MODEL.DIFFSEG.TRANSFORMER.TEXT_SEGMENT = {text_segment!r}: the {diffusion.family.title} "
                             f"text sequence has {list(diffusion.text_segments)}.")
        if direction not in DIRECTIONS:
            raise ValueError(f"MODEL.DIFFSEG.TRANSFORMER.DIRECTION must be one of {list(DIRECTIONS)}, not {direction!r}.")
        return tuple(blocks), tuple(refine_blocks)

    def _transformer_maps(self, noisy: torch.Tensor, names: Sequence[str], context, token_index: torch.Tensor,
                          token_weight: torch.Tensor) -> torch.Tensor:
        """Class maps ``(K, h, w)`` on the transformer's token grid: the mean over ``transformer_blocks`` of
        each class word's attention probabilities (normalised over all keys; mean over heads and the word's
        tokens), min-max normalised, then refined by ``refine_blocks``' image-to-image attention.
        ``per_class``: one pass per class prompt (in chunks), each class refined by its own pass;
        ``shared``: one pass on one prompt naming every class (``CARRIER_TEMPLATE``), every class read from it."""
        d = self.diffusion
        if self.transformer_readout == "concept":
            return self._concept_maps(noisy, names)

        def run(index, weight, latents, ctx) -> torch.Tensor:
            store = JointAttentionStore(index, weight, self.attention_direction, frozenset(self.refine_blocks),
                                        frozenset(self.transformer_blocks), per_element=len(ctx) > 1)
            with record_joint_attention(d.transformer, store, set(self.transformer_blocks) | set(self.refine_blocks),
                                        d.text_layout.length):
                d.denoise(latents, self.noise_step, ctx)
            maps = minmax_per_map(store.maps())
            return store.refine(maps) if self.refine_blocks else maps

        if self.conditioning == "shared":
            words = tuple(self.prompt_name(n) for n in names)
            joint, ctx = self._cached(("joint", words), lambda: self._joint_context(words))
            maps = run(joint.token_index, joint.token_weight, noisy, ctx)
        else:
            maps = torch.cat([
                run(token_index[chunk], token_weight[chunk], noisy.expand(chunk.stop - chunk.start, -1, -1, -1),
                    context[chunk])
                for chunk in (slice(s, min(len(names), s + self.class_chunk_size))
                              for s in range(0, len(names), self.class_chunk_size))
            ])
        return maps.view(len(names), noisy.shape[-2] // d.patch, noisy.shape[-1] // d.patch)

    def _concept_maps(self, noisy: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """ConceptAttention's maps ``(K, h, w)``: one pass on the empty prompt (ConceptAttention's default for a
        real image), each class a concept token; min-max normalised, then refined as the attention read-out."""
        d = self.diffusion
        words = tuple(self.prompt_name(n) for n in names)
        states, pooled = self._cached(("concepts", words), lambda: d.concept_embeddings(words))
        store = ConceptAttentionStore(states, pooled, frozenset(self.transformer_blocks))
        # The refinement's blocks are read in the same pass (their queries and keys only).
        refine = JointAttentionStore(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                                     refine_blocks=frozenset(self.refine_blocks), map_blocks=frozenset())
        with contextlib.ExitStack() as stack:
            stack.enter_context(record_concept_attention(d.transformer, store))
            if self.refine_blocks:
                stack.enter_context(record_joint_attention(d.transformer, refine, self.refine_blocks,
                                                           d.text_layout.length))
            d.denoise(noisy, self.noise_step, d.empty_prompt_context())
        maps = minmax_per_map(store.maps())
        if self.refine_blocks:
            maps = refine.refine(maps)
        return maps.view(len(names), noisy.shape[-2] // d.patch, noisy.shape[-1] // d.patch)

    def _joint_context(self, words: Tuple[str, ...]):
        """The prompt naming every class (``CARRIER_TEMPLATE``) and its encoding ``(1, L, D)``."""
        d = self.diffusion
        joint = d.joint_prompt(list(words), self.carrier_template, self.text_segment)
        return joint, d.encode_text(joint.input_ids[0])

    def _combine(self, store: AttentionStore) -> torch.Tensor:
        """Weighted sum of per-factor normalised maps, then the self-attention refinement: (K, h, w)."""
        target = store.resolution(self.self_attn_factor if self.refine else min(self.cross_attn_factors))
        combined = 0.0
        for factor, weight in zip(self.cross_attn_factors, self.cross_attn_weights):
            maps = store.cross_maps(factor)
            if tuple(maps.shape[-2:]) != target:
                maps = F.interpolate(maps[None], size=target, mode="bilinear", align_corners=False)[0]
            combined = combined + weight * minmax_per_map(maps)
        if not self.refine:
            return combined
        if store.own_self_attention:
            return store.refine_own(self.self_attn_factor, combined.flatten(1)).view_as(combined)
        attn = store.self_map(self.self_attn_factor)  # (N, N), rows = queries
        return (combined.flatten(1) @ attn.T).view_as(combined)


def parse_prompt_names(pairs: Sequence[str]) -> Dict[str, str]:
    """``["dining table=table", ...]`` (MODEL.DIFFSEG.PROMPT_NAMES) -> {class name: prompt word}."""
    out = {}
    for pair in pairs:
        name, sep, word = str(pair).partition("=")
        if not sep or not name.strip() or not word.strip():
            raise ValueError(
                f"MODEL.DIFFSEG.PROMPT_NAMES entry {pair!r} is not 'class name=prompt word' (e.g. 'dining table=table')."
            )
        out[name.strip()] = word.strip()
    return out


class CategoryFilter(nn.Module):
    """Drops classes that CLIP judges absent from the image (reference mode: the reference prompts
    only each image's classes from label files made by an unreleased procedure; this stands in).

    A class is kept when its CLIP probability (softmax over the candidate
    classes) is at least ``threshold``; at most ``top_k`` classes are kept
    (0 = no cap); the most probable class is always kept.
    """

    def __init__(self, clip: OpenCLIP, threshold: float, top_k: int = 0):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"MODEL.DIFFSEG.CATEGORY_FILTER.THRESHOLD must be in [0, 1], got {threshold}.")
        if top_k < 0:
            raise ValueError(f"MODEL.DIFFSEG.CATEGORY_FILTER.TOP_K must be >= 0, got {top_k}.")
        self.clip = clip
        self.threshold = float(threshold)
        self.top_k = int(top_k)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Which names to keep: image (3, H, W) RGB in [0, 255] -> bool (K,)."""
        probs = self.clip.class_probabilities(image[None], names)[0]
        keep = probs >= self.threshold
        if self.top_k and int(keep.sum()) > self.top_k:
            keep = torch.zeros_like(keep)
            keep[probs.topk(self.top_k).indices] = True
        keep[probs.argmax()] = True
        return keep.cpu()
