"""CLIP image and text embeddings (open_clip), with prompt templates and a text cache.

One home for CLIP in the package: DiffSegmenter's category filter, FreeDA's keys
and global score, ODISE's captioner, classifier and ensemble all use it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..lru import LRUCache
from ..numerics import require_finite
from ..optional_imports import require
from ..vocabulary import split_synonyms
from .frozen import FrozenModel, load_pretrained, random_init
from .tokens import find_subsequence, token_mean_table
from .weights import random_architecture, resolve_weights

CLIP_WEIGHTS_KEY = "MODEL.DIFFSEG.CLIP.WEIGHTS"
TINY_CLIP_FOLDER = "tiny-open-clip-v1"
# Vocabularies whose text embeddings are kept (least recently used dropped first).
_TEXT_CACHE_SIZE = 64


def registry_quick_gelu(open_clip, hub_id: str) -> bool:
    """Whether open_clip's registry of pretrained weights says the weights of this hub repository use
    QuickGELU (the OpenAI CLIP weights, e.g. ``timm/vit_large_patch14_clip_224.openai``: FreeDA's)."""
    for model, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(model, tag)
        if cfg.get("hf_hub", "").rstrip("/") == hub_id.rstrip("/") and cfg.get("quick_gelu", False):
            return True
    return False


class OpenCLIP(FrozenModel):
    """A frozen open_clip model.

    Args:
        model: an open_clip ``CLIP``.
        tokenizer: its tokenizer (``list[str] -> (N, L)`` ids).
        templates: prompt templates with ``{}``; a class's text embedding is the
            normalised mean over them.
    """

    def __init__(self, model: nn.Module, tokenizer, templates: Sequence[str]):
        super().__init__()
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"MODEL.DIFFSEG.CLIP.TEMPLATES must be templates with '{{}}', got {list(templates)}.")
        self.model = model
        self.tokenizer = tokenizer
        self.templates = list(templates)
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        # Bounded: ODISE's grounding loss encodes a new noun set every batch.
        self._text_cache = LRUCache(_TEXT_CACHE_SIZE)
        self.freeze()

    @classmethod
    def from_weights(cls, weights: str, templates: Sequence[str]) -> "OpenCLIP":
        """Load from a hub id, a local open_clip folder, ``"tiny"``, ``"micro"``, or ``"random:<open_clip
        model name>"`` (random weights, e.g. ``random:ViT-L-14-336``) (``MODEL.DIFFSEG.CLIP.WEIGHTS``)."""
        open_clip = require("open_clip", "open_clip_torch", "The CLIP model")
        architecture = random_architecture(weights, config_key=CLIP_WEIGHTS_KEY, choices=open_clip.list_models())
        if architecture is not None:
            with random_init():
                model = open_clip.create_model(architecture)
            return cls(model, open_clip.get_tokenizer(architecture), templates)
        location = resolve_weights(
            weights,
            config_key=CLIP_WEIGHTS_KEY,
            required_files=("open_clip_config.json", "*.safetensors"),
            tiny=(TINY_CLIP_FOLDER, build_tiny_open_clip),
            micro="clip",
        )
        name = ("local-dir:" if location.is_local else "hf-hub:") + location.path
        # open_clip builds an hf-hub / local-dir model from the repository's own json alone; the
        # OpenAI weights need QuickGELU, which its registry knows for their hub repositories.
        quick_gelu = not location.is_local and registry_quick_gelu(open_clip, location.path)
        model, tokenizer = load_pretrained(
            location, "CLIP model",
            lambda: (open_clip.create_model(name, weights_only=True, require_pretrained=True,
                                            **({"force_quick_gelu": True} if quick_gelu else {})),
                     open_clip.get_tokenizer(name)),
            errors=(OSError, RuntimeError),
        )
        return cls(model, tokenizer, templates)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text embedding space."""
        return int(self.model.visual.output_dim)

    def clear_cache(self) -> None:
        self._text_cache.clear()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, clamp: bool = True, normalize: bool = True) -> torch.Tensor:
        """Image embeddings: (B, 3, H, W) RGB in [0, 255] -> (B, D), L2-normalised by default.

        The whole image is resized to the model's input square (no crop), so
        nothing at the borders is missed by the filter.

        Args:
            clamp: clamp the bicubic resize's overshoot to [0, 255] (FreeDA's and ODISE's reference
                code do not).
            normalize: False returns the projected embedding as it comes (ODISE's implicit captioner).
        """
        emb = self._finite(self.model.encode_image(self._preprocess(images, clamp))).float()
        return F.normalize(emb, dim=-1) if normalize else emb

    @staticmethod
    def _finite(x: torch.Tensor) -> torch.Tensor:
        return require_finite(x, "CLIP (MODEL.DIFFSEG.CLIP.WEIGHTS)")

    def _preprocess(self, images: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 255] -> the model's normalised input square (resized, no crop)."""
        x = F.interpolate(images.float().to(self.device), size=self.image_size, mode="bicubic", align_corners=False)
        return ((x.clamp(0, 255) if clamp else x) - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode_class_names(
        self, names: Sequence[str], templates: Optional[Sequence[str]] = None, normalize_each: bool = True
    ) -> torch.Tensor:
        """Sentence embeddings of every template filled with each name, averaged over the templates
        and L2-normalised: K names -> (K, D). Cached per vocabulary.

        Args:
            templates: the templates; None = the ones this CLIP was built with (``CLIP.TEMPLATES``).
            normalize_each: normalise each template's embedding before the mean (CLIP's usual prompt
                ensembling); False averages them as they come (FreeDA's reference code).
        """
        templates = tuple(self.templates if templates is None else templates)

        def compute():
            prompts = [t.format(n) for n in names for t in templates]
            ids = self.tokenizer(prompts).to(self.device)
            emb = self._finite(self.model.encode_text(ids)).float()
            emb = F.normalize(emb, dim=-1) if normalize_each else emb
            return F.normalize(emb.view(len(names), len(templates), -1).mean(1), dim=-1)

        return self._text_cache.get_or_compute((tuple(names), templates, normalize_each), compute)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings of ``texts`` as they come (no template, not normalised): N -> (N, D).

        ODISE's classifier projects these through a trainable linear layer, so their norm matters.
        Cached per list of texts.
        """
        def compute():
            return self._finite(self.model.encode_text(self.tokenizer(list(texts)).to(self.device))).float()

        return self._text_cache.get_or_compute(("raw", tuple(texts)), compute)

    @torch.no_grad()
    def encode_masked(self, images: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP region embeddings (ODISE's CLIP classifier): one embedding per mask, not normalised.

        The image and the masks are resized (bilinear) to the model's input square. For each mask
        a copy of the class token joins the token sequence after ``ln_pre``; in every block it may
        attend to the class token and to the patches where the sigmoid of the mask reaches 0.5
        somewhere inside the patch, nothing else, and no token attends to the copies, so the image
        and class tokens compute exactly CLIP's own forward. The copies' outputs go through the
        final norm and projection like CLIP's pooled token.

        Args:
            images: (B, 3, H, W) RGB in [0, 255].
            mask_logits: (B, Q, h, w) mask logits over the same extent as ``images``.

        Returns:
            (B, Q, D).
        """
        visual = self.model.visual
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
        if any(getattr(visual, n, None) is None for n in needed) or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(
                f"MaskCLIP needs an open_clip ViT image tower with a class token and a projection; "
                f"{type(visual).__name__} here is not one. Use a ViT CLIP in MODEL.DIFFSEG.CLIP.WEIGHTS, or set "
                "MODEL.DIFFSEG.ODISE.TEST.ENSEMBLE False."
            )
        B, Q = mask_logits.shape[:2]
        x = F.interpolate(images.float().to(self.device), size=self.image_size, mode="bilinear", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        masks = F.interpolate(mask_logits.float().to(self.device), size=self.image_size, mode="bilinear",
                              align_corners=False).sigmoid()
        patch = visual.conv1.kernel_size
        outside = F.max_pool2d(masks, kernel_size=patch, stride=visual.conv1.stride).flatten(2) < 0.5  # (B, Q, P)
        tokens = visual._embeds(x.to(visual.conv1.weight.dtype))  # (B, 1 + P, W): class token, patches
        L = tokens.shape[1]
        seq = torch.cat([tokens[:, :1].expand(-1, Q, -1), tokens], dim=1)  # (B, Q + 1 + P, W)
        blocked = torch.zeros(B, Q + L, Q + L, dtype=torch.bool, device=seq.device)
        blocked[:, :, :Q] = True  # nothing attends to the mask tokens
        blocked[:, :Q, Q + 1:] = outside  # a mask token sees only its own patches (and the class token)
        heads = visual.transformer.resblocks[0].attn.num_heads
        bias = torch.zeros(blocked.shape, dtype=seq.dtype, device=seq.device).masked_fill(blocked, float("-inf"))
        bias = bias.repeat_interleave(heads, dim=0)  # (B * heads, L', L'), MultiheadAttention's layout
        out = visual.transformer(seq, attn_mask=bias)  # (B, L', W) in and out, whatever its internal layout
        pooled = visual.ln_post(out[:, :Q]) @ visual.proj
        return self._finite(pooled.float())

    @torch.no_grad()
    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch embeddings in the joint space (not normalised): (B, 3, H, W) RGB in [0, 255] -> (B, D, h, w).

        The image is resized to the model's input square, as in ``encode_image``; the
        patch tokens of the last block go through the same final norm and projection
        as the pooled token, so pooling them over a mask gives a CLIP embedding of
        that region (ODISE's mask-pooled CLIP classifier).
        """
        visual = self.model.visual
        if not hasattr(visual, "forward_intermediates") or getattr(visual, "proj", None) is None:
            raise ValueError(
                f"Dense CLIP features need an open_clip ViT image tower with a projection and "
                f"forward_intermediates; {type(visual).__name__} here has not both. Upgrade open_clip_torch, "
                "use a ViT CLIP in MODEL.DIFFSEG.CLIP.WEIGHTS, or set MODEL.DIFFSEG.ODISE.TEST.ENSEMBLE False."
            )
        out = visual.forward_intermediates(
            self._preprocess(images), indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NCHW"
        )
        tokens = out["image_intermediates"][-1]  # (B, W, h, w)
        return self._finite(torch.einsum("bwhx,wd->bdhx", tokens, visual.proj).float())

    @torch.no_grad()
    def encode_class_synonyms(self, names: Sequence[str], template: str = "{}") -> Tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of every synonym of every class, as they come (``encode_texts``).

        A class name may list synonyms separated by commas (``"sofa, couch"``), as
        panoptic datasets' metadata does; a class then scores the best of them.

        Returns:
            ``(embeddings, owner)``: (S, D) embeddings, not normalised, of the S synonyms each
            written into ``template``, and (S,) the class index of each.
        """
        synonyms, owner = [], []
        for k, name in enumerate(names):
            parts = split_synonyms(name) or [name]
            synonyms += [template.format(p) for p in parts]
            owner += [k] * len(parts)
        return self.encode_texts(synonyms), torch.tensor(owner, dtype=torch.long, device=self.device)

    def word_positions(self, text: str, word: str) -> Optional[List[int]]:
        """Positions of ``word``'s tokens in the tokenised ``text`` (first occurrence), or None."""
        ids = self.tokenizer([text])[0].tolist()
        start = find_subsequence(ids, self.tokenizer.encode(word))
        if start < 0:
            return None
        return list(range(start, start + len(self.tokenizer.encode(word))))

    @torch.no_grad()
    def encode_words_in_context(self, texts: Sequence[str], words: Sequence[str]) -> torch.Tensor:
        """Contextual embedding of ``words[i]`` inside ``texts[i]``: (N,) -> (N, D), L2-normalised.

        The final-layer text features at the word's token positions (mean over
        its sub-word tokens) are projected into the joint image-text space, as
        the sentence embedding is at its end-of-text token. FreeDA's keys (a noun
        in its caption) and queries (a class name in its prompts) both use it.

        Raises:
            ValueError: a word that is not among its text's tokens (absent, or cut
                off by the context length).
        """
        model = self.model
        if not hasattr(model, "token_embedding"):
            raise ValueError(
                "Contextual word embeddings need an open_clip model with its own text transformer "
                f"(open_clip.CLIP); {type(model).__name__} has a different text tower."
            )
        positions = []
        for text, word in zip(texts, words):
            pos = self.word_positions(text, word)
            if pos is None:
                raise ValueError(f"The word {word!r} is not among the tokens of {text!r} (or beyond the context).")
            positions.append(pos)
        ids = self.tokenizer(list(texts)).to(self.device)
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # (N, L, W)
        index, weight = token_mean_table(positions)
        picked = x.gather(1, index.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))
        pooled = (picked.float() * weight.to(x.device)[..., None]).sum(1)
        proj = model.text_projection
        if proj is not None:
            pooled = proj(pooled.to(cast)) if isinstance(proj, nn.Linear) else pooled.to(cast) @ proj
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode_class_queries(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Each name's contextual embedding averaged over ``templates``: K names -> (K, D), L2-normalised."""
        texts = [t.format(n) for n in names for t in templates]
        words = [n for n in names for _ in templates]
        emb = self.encode_words_in_context(texts, words).view(len(names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Softmax over the K names of the image-text similarity: (B, 3, H, W) -> (B, K)."""
        img = self.encode_image(images)
        txt = self.encode_class_names(names)
        scale = self.model.logit_scale.exp().float() if hasattr(self.model, "logit_scale") else 100.0
        return (scale * img @ txt.T).softmax(dim=-1)


def build_tiny_open_clip(folder: Path) -> None:
    """Save a tiny open_clip model (ViT image tower, 64 px) as an open_clip local folder."""
    open_clip = require("open_clip", "open_clip_torch", "The tiny CLIP preset")
    safetensors_torch = require("safetensors.torch", "safetensors", "The tiny CLIP preset")
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    with random_init():
        model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2), encoding="utf-8"
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(folder / "open_clip_model.safetensors"))
