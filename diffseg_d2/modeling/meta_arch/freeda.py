"""FreeDA: training-free segmentation by retrieving diffusion-made visual prototypes.

Per vocabulary (cached): each class name's CLIP query (the class word in prompt
templates) retrieves its k nearest keys in the bank; the mean of their DINOv2
prototypes is the class prototype. Per image: Felzenszwalb superpixels, dense
DINOv2 features (sliding window) averaged inside each superpixel, cosine with
the class prototypes (local score), plus the CLIP image-text similarity (global
score); ``score = w * local + (1 - w) * global`` per superpixel.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...config import check_config
from ...freeda.bank import PrototypeBank, check_bank_models, check_fingerprint, model_fingerprint
from ...freeda.superpixels import felzenszwalb_superpixels, pool_features, sliding_windows
from ...vocabulary import background_index
from .open_vocab import OpenVocabularySegmenter, vocabulary_from_config

logger = logging.getLogger(__name__)

__all__ = ["FreeDA"]

_WINDOW_BATCH = 8  # DINOv2 windows per forward call


@META_ARCH_REGISTRY.register()
class FreeDA(OpenVocabularySegmenter):
    """Open-vocabulary semantic segmentation from a bank of diffusion-made prototypes (training-free)."""

    @configurable
    def __init__(
        self,
        *,
        bank: PrototypeBank,
        clip: nn.Module,
        dino: nn.Module,
        vocabulary: Optional[Sequence[str]] = None,
        top_k: int = 350,
        min_key_similarity: float = 0.5,
        query_templates: Sequence[str] = ("a photo of a {}.",),
        local_weight: float = 0.8,
        background_score: float = 0.4,
        superpixel: Tuple[float, float, int] = (100.0, 1.0, 20),
        short_side: int = 448,
        window: int = 448,
        stride: int = 224,
        input_format: str = "RGB",
    ):
        """
        Args:
            bank: the loaded prototype bank.
            clip: ``OpenCLIP``, the model that made the bank's keys.
            dino: ``DenseDINO``, the model that made the bank's prototypes.
            vocabulary: class names, the channel order of ``sem_seg``; a class
                named "background" gets the constant ``background_score``.
            top_k: keys retrieved per class.
            min_key_similarity: a class whose nearest key is less similar gets the
                global score alone.
            query_templates: templates of the class query, "{}" -> class name.
            local_weight: weight of the local score; the global one gets 1 - it.
            background_score: score of the background channel.
            superpixel: Felzenszwalb ``(scale, sigma, min_size)``.
            short_side: the image is resized to this short side.
            window, stride: DINOv2 sliding window (square side) and step, in pixels.
            input_format: "RGB" or "BGR", the channel order of input images.
        """
        super().__init__(input_format=input_format)
        if not query_templates or any("{}" not in t for t in query_templates):
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.QUERY_TEMPLATES need '{{}}' in each, got {list(query_templates)}.")
        if not 0.0 <= local_weight <= 1.0:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.LOCAL_WEIGHT must be in [0, 1], got {local_weight}.")
        if top_k < 1 or min(short_side, window, stride) < 1:
            raise ValueError("MODEL.DIFFSEG.FREEDA.TOP_K, SHORT_SIDE, WINDOW and STRIDE must be positive.")
        if stride > window:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.STRIDE = {stride} exceeds WINDOW = {window}: the windows would "
                             "leave parts of the image unread.")
        check_fingerprint(bank.manifest.get("fingerprint", {}), model_fingerprint(clip, dino), "this bank")
        self.bank = bank
        self.clip = clip
        self.dino = dino
        self.top_k = int(top_k)
        self.min_key_similarity = float(min_key_similarity)
        self.query_templates = list(query_templates)
        self.local_weight = float(local_weight)
        self.background_score = float(background_score)
        self.superpixel = (float(superpixel[0]), float(superpixel[1]), int(superpixel[2]))
        self.short_side = int(short_side)
        self.window = int(window)
        self.stride = int(stride)
        #: seconds spent per stage on the last image (superpixels, dino, clip, scoring), for benchmarks
        self.last_timings: Dict[str, float] = {}
        if vocabulary:
            self.set_vocabulary(vocabulary)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        from ..clip import OpenCLIP
        from ..dino import DenseDINO

        check_config(cfg)
        d, f = cfg.MODEL.DIFFSEG, cfg.MODEL.DIFFSEG.FREEDA
        vocabulary = vocabulary_from_config(cfg)
        # The bank is read (and checked) before the models load: a wrong folder fails fast.
        bank = PrototypeBank.load(f.BANK, top_k=f.TOP_K, ef_search=f.EF_SEARCH, nprobe=f.NPROBE)
        clip = OpenCLIP.from_weights(d.CLIP.WEIGHTS, d.CLIP.TEMPLATES)
        dino = DenseDINO.from_weights(d.DINO.WEIGHTS)
        check_bank_models(bank.manifest, {"clip": d.CLIP.WEIGHTS, "dino": d.DINO.WEIGHTS},
                          model_fingerprint(clip, dino), f.BANK)
        return {
            "bank": bank,
            "clip": clip,
            "dino": dino,
            "vocabulary": vocabulary,
            "top_k": f.TOP_K,
            "min_key_similarity": f.MIN_KEY_SIMILARITY,
            "query_templates": list(f.QUERY_TEMPLATES),
            "local_weight": f.LOCAL_WEIGHT,
            "background_score": d.BACKGROUND_THRESHOLD,
            "superpixel": (f.SUPERPIXEL.SCALE, f.SUPERPIXEL.SIGMA, f.SUPERPIXEL.MIN_SIZE),
            "short_side": f.SHORT_SIDE,
            "window": f.WINDOW,
            "stride": f.STRIDE,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ------------------------------------------------------------------ vocabulary
    def _check_vocabulary(self, names: Sequence[str]) -> None:
        # Retrieval checks every name (it must tokenise) and warms the cache.
        bg = background_index(names)
        prompted = tuple(n for i, n in enumerate(names) if i != bg)
        if prompted:
            self.class_prototypes(prompted)

    def class_prototypes(self, names: Tuple[str, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class prototypes ``(K, Dp)`` and whether each class has one ``(K,)`` bool, cached per vocabulary."""

        def compute():
            queries = self.clip.encode_class_queries(names, self.query_templates)
            prototypes, best = self.bank.class_prototypes(queries, self.top_k)
            found = best >= self.min_key_similarity
            for name, sim in zip(names, best.tolist()):
                if sim < self.min_key_similarity:
                    logger.warning(
                        "FreeDA: no key in the bank is close to %r (best cosine %.3f < MIN_KEY_SIMILARITY %.3f); "
                        "its score is the global CLIP score alone.", name, sim, self.min_key_similarity)
            return prototypes.to(self.device), found.to(self.device)

        return self._cached(("prototypes", names, self.top_k, self.min_key_similarity), compute)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def segment(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int]) -> torch.Tensor:
        """Scores ``(K, *out_size)`` of one RGB image ``(3, H, W)`` in [0, 255] for ``names``:
        ``w * local + (1 - w) * global`` per superpixel for prompted classes (the global score
        alone for classes with no close key), ``background_score`` for "background"."""
        timings = {}
        bg = background_index(names)
        prompted = [i for i in range(len(names)) if i != bg]
        if not prompted:
            return torch.full((len(names), *out_size), self.background_score, device=self.device)
        prototypes, found = self.class_prototypes(tuple(names[i] for i in prompted))

        start = time.perf_counter()
        h, w = image.shape[-2:]
        scale = self.short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        labels = felzenszwalb_superpixels(x, *self.superpixel).to(self.device)
        timings["superpixels"] = time.perf_counter() - start

        start = time.perf_counter()
        features = self._superpixel_features(x, labels)  # (S, Dp)
        timings["dino"] = time.perf_counter() - start

        start = time.perf_counter()
        text = self.clip.encode_class_names([names[i] for i in prompted])
        global_score = (self.clip.encode_image(image[None]) @ text.T)[0].to(self.device)  # (K',)
        timings["clip"] = time.perf_counter() - start

        start = time.perf_counter()
        local = features @ prototypes.T  # (S, K')
        combined = self.local_weight * local + (1 - self.local_weight) * global_score
        per_segment = torch.where(found, combined, global_score.expand_as(combined))
        table = torch.full((len(names), per_segment.shape[0]), self.background_score, device=self.device)
        table[prompted] = per_segment.T
        # Superpixel ids at the output size (nearest), then one lookup: a (K, H, W) result and nothing bigger.
        ids = F.interpolate(labels[None, None].float(), size=out_size, mode="nearest")[0, 0].long()
        scores = table[:, ids]
        timings["scoring"] = time.perf_counter() - start
        self.last_timings = timings
        return scores

    def _superpixel_features(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L2-normalised mean DINOv2 feature of each superpixel: image (3, h, w), labels (h, w) -> (S, Dp).

        Windows are read at their own size; where they overlap, a pixel's features are
        averaged over the windows that cover it.
        """
        h, w = image.shape[-2:]
        num = int(labels.max()) + 1
        side = min(self.window, h, w)
        corners = sliding_windows(h, w, side, self.stride)
        sums = torch.zeros(num, self.dino.embed_dim, device=self.device)
        counts = torch.zeros(num, device=self.device)
        for b in range(0, len(corners), _WINDOW_BATCH):
            batch = corners[b : b + _WINDOW_BATCH]
            crops = torch.stack([image[:, y : y + side, x : x + side] for y, x in batch])
            feats = self.dino(crops).to(self.device)  # (n, Dp, g, g)
            for (y, x), f in zip(batch, feats):
                s, c = pool_features(f, labels[y : y + side, x : x + side], num)
                sums += s
                counts += c
        return F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
