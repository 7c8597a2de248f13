"""FreeDA: training-free segmentation by retrieving diffusion-made visual prototypes.

Per vocabulary (cached): each class name's CLIP query (the class word in prompt
templates) retrieves its k nearest keys in the bank; the mean of their DINOv2
prototypes is the class prototype. Per image: Felzenszwalb superpixels, dense
DINOv2 features (sliding window) averaged inside each superpixel, cosine with
the class prototypes (local score), plus the CLIP image-text similarity (global
score); ``score = w * local + (1 - w) * global`` per superpixel.
"""
from __future__ import annotations

import contextvars
import logging
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...config import FREEDA_QUERY_TEMPLATES, check_config
from ...freeda.bank import PrototypeBank, check_bank_models, index_on_device, model_fingerprint
from ...freeda.released import load_bank
from ...freeda.superpixels import (
    felzenszwalb_superpixels,
    pool_features,
    resize_short_side,
    token_grid_weights,
)
from ...tiling import sliding_windows, window_shape
from ...vocabulary import background_index
from .open_vocab import OpenVocabularySegmenter, open_vocab_args_from_config

logger = logging.getLogger(__name__)

__all__ = ["FreeDA"]

_WINDOW_BATCH = 8  # DINOv2 windows per forward call
# (id of the model, its stage timings) of this thread's last segment call: FreeDA.last_timings.
_LAST_TIMINGS: contextvars.ContextVar = contextvars.ContextVar("freeda_last_timings", default=(None, {}))


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
        thing_classes: Optional[Sequence[str]] = None,
        stuff_classes: Optional[Sequence[str]] = None,
        panoptic_min_area: Optional[float] = None,
        top_k: int = 350,
        min_key_similarity: float = -1.0,
        query: str = "sentence",
        query_templates: Sequence[str] = FREEDA_QUERY_TEMPLATES,
        local_weight: float = 0.8,
        local_sigmoid: bool = True,
        background_score: float = 0.4,
        superpixel: Tuple[float, float, int] = (100.0, 1.0, 20),
        short_side: int = 448,
        window: int = 448,
        stride: int = 224,
        pipeline: str = "window",
        pooling: str = "token_grid",
        dino_size: int = 518,
        long_side_cap: int = 2048,
        resize: str = "cv2",
        input_format: str = "RGB",
    ):
        """
        The defaults compute what the reference code computes at test time; each of our
        departures is an argument (the config key in capitals under MODEL.DIFFSEG.FREEDA).

        Args:
            bank: the loaded prototype bank (``PrototypeBank``, or ``ReleasedBank``: the authors' bank).
            clip: ``OpenCLIP``, the model that made the bank's keys.
            dino: ``DenseDINO``, the model that made the bank's prototypes.
            vocabulary: class names, the channel order of ``sem_seg``; a class
                named "background" gets the constant ``background_score``.
            thing_classes: the vocabulary's thing classes, a dataset's (None: see ``stuff_classes``).
            stuff_classes: with a vocabulary of the user's, the classes that are stuff in
                ``panoptic_seg``; the others are things and "background" is void
                (``MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES``; see ``panoptic_roles``).
            panoptic_min_area: smallest panoptic segment, a fraction of the image (None: no
                ``panoptic_seg``); see ``OpenVocabularySegmenter``.
            top_k: keys retrieved per class.
            min_key_similarity: a class whose nearest key is less similar gets the
                global score alone (ours; -1 = never).
            query: "sentence" (CLIP sentence embeddings of the templates, the reference) or
                "token" (the class word's contextual token embedding, ours).
            query_templates: templates of the class query and of the global text embedding.
            local_weight: weight of the local score; the global one gets 1 - it.
            local_sigmoid: the local score is sigmoid(cosine) (the reference), else the cosine.
            background_score: score of the background channel.
            superpixel: Felzenszwalb ``(scale, sigma, min_size)``.
            short_side: the image is resized to this short side.
            window, stride: sliding window (square side) and step, in pixels.
            pipeline: "window" (everything per window, window scores averaged, the reference) or
                "whole" (superpixels and the global score on the whole image, ours).
            pooling: with "window": "token_grid" (the reference) or "exact" (ours).
            dino_size: with "window", the side DINOv2 reads each window at (0 = its own size).
            long_side_cap: with "window", the longest side after the resize.
            resize: with "window", "cv2" (OpenCV on 8-bit values, the reference) or "torch" (ours).
            input_format: "RGB" or "BGR", the channel order of input images.
        """
        super().__init__(input_format=input_format, panoptic_min_area=panoptic_min_area, stuff_classes=stuff_classes)
        if not query_templates or any("{}" not in t for t in query_templates):
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.QUERY_TEMPLATES need '{{}}' in each, got {list(query_templates)}.")
        if not 0.0 <= local_weight <= 1.0:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.LOCAL_WEIGHT must be in [0, 1], got {local_weight}.")
        if top_k < 1 or min(short_side, window, stride) < 1:
            raise ValueError("MODEL.DIFFSEG.FREEDA.TOP_K, SHORT_SIDE, WINDOW and STRIDE must be positive.")
        for key, value, allowed in (("QUERY", query, ("sentence", "token")), ("PIPELINE", pipeline, ("window", "whole")),
                                    ("POOLING", pooling, ("token_grid", "exact")), ("RESIZE", resize, ("cv2", "torch"))):
            if value not in allowed:
                raise ValueError(f"MODEL.DIFFSEG.FREEDA.{key} must be one of {list(allowed)}, not {value!r}.")
        if dino_size and dino_size % dino.patch_size:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.DINO_SIZE = {dino_size} must be a multiple of DINOv2's patch "
                             f"size {dino.patch_size} (or 0).")
        if stride > window:
            raise ValueError(f"MODEL.DIFFSEG.FREEDA.STRIDE = {stride} exceeds WINDOW = {window}: the windows would "
                             "leave parts of the image unread.")
        bank.check_models(clip, dino)
        self.bank = bank
        self.clip = clip
        self.dino = dino
        self.top_k = int(top_k)
        self.min_key_similarity = float(min_key_similarity)
        self.query = query
        self.query_templates = list(query_templates)
        self.local_weight = float(local_weight)
        self.local_sigmoid = bool(local_sigmoid)
        self.pipeline = pipeline
        self.pooling = pooling
        self.dino_size = int(dino_size)
        self.long_side_cap = int(long_side_cap)
        self.resize = resize
        self.background_score = float(background_score)
        self.superpixel = (float(superpixel[0]), float(superpixel[1]), int(superpixel[2]))
        self.short_side = int(short_side)
        self.window = int(window)
        self.stride = int(stride)
        if vocabulary:
            self.set_vocabulary(vocabulary, thing_classes)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        from ...pretrained.clip import OpenCLIP
        from ...pretrained.dino import DenseDINO

        check_config(cfg)
        d, f = cfg.MODEL.DIFFSEG, cfg.MODEL.DIFFSEG.FREEDA
        # The bank is read (and checked) before the models load: a wrong folder fails fast.
        bank = load_bank(f.BANK, top_k=f.TOP_K, ef_search=f.EF_SEARCH, nprobe=f.NPROBE)
        clip = OpenCLIP.from_weights(d.CLIP.WEIGHTS, d.CLIP.TEMPLATES)
        dino = DenseDINO.from_weights(d.DINO.WEIGHTS)
        if isinstance(bank, PrototypeBank):  # ours records the models' config strings too
            check_bank_models(bank.manifest, {"clip": d.CLIP.WEIGHTS, "dino": d.DINO.WEIGHTS},
                              model_fingerprint(clip, dino), f.BANK)
        bank.index = index_on_device(bank.index, cfg.MODEL.DEVICE, f.INDEX_DEVICE)
        return {
            "bank": bank,
            "clip": clip,
            "dino": dino,
            **open_vocab_args_from_config(cfg),
            "top_k": f.TOP_K,
            "min_key_similarity": f.MIN_KEY_SIMILARITY,
            "query": f.QUERY,
            "query_templates": list(f.QUERY_TEMPLATES),
            "local_weight": f.LOCAL_WEIGHT,
            "local_sigmoid": f.LOCAL_SIGMOID,
            "pipeline": f.PIPELINE,
            "pooling": f.POOLING,
            "dino_size": f.DINO_SIZE,
            "long_side_cap": f.LONG_SIDE_CAP,
            "resize": f.RESIZE,
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
            if self.query == "sentence":
                queries = self.class_text(names)
            else:
                queries = self.clip.encode_class_queries(names, self.query_templates)
            prototypes, best = self.bank.class_prototypes(queries, self.top_k)
            found = best >= self.min_key_similarity
            for name, sim in zip(names, best.tolist()):
                if sim < self.min_key_similarity:
                    logger.warning(
                        "FreeDA: no key in the bank is close to %r (best cosine %.3f < MIN_KEY_SIMILARITY %.3f); "
                        "its score is the global CLIP score alone.", name, sim, self.min_key_similarity)
            return prototypes.to(self.device), found.to(self.device)

        return self._cached(("prototypes", names, self.top_k, self.min_key_similarity, self.query), compute)

    @property
    def last_timings(self) -> Dict[str, float]:
        """Seconds spent per stage (superpixels, dino, clip, scoring) on the last image this thread
        segmented with this model, for benchmarks. Kept per thread (a context variable), not on the
        model, so concurrent calls never read each other's."""
        owner, timings = _LAST_TIMINGS.get()
        return dict(timings) if owner == id(self) else {}

    def class_text(self, names: Sequence[str]) -> torch.Tensor:
        """The classes' text embeddings for the global score (and the "sentence" query): CLIP sentence
        embeddings of ``query_templates``, averaged as they come and normalised (as the reference), ``(K, C)``."""
        return self.clip.encode_class_names(list(names), self.query_templates, normalize_each=False).to(self.device)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def segment(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int],
                file_name: Optional[str] = None) -> torch.Tensor:
        """Scores ``(K, *out_size)`` of one RGB image ``(3, H, W)`` in [0, 255] for ``names``:
        ``w * local + (1 - w) * global`` per superpixel for prompted classes (the global score
        alone for classes with no close key), ``background_score`` for "background"."""
        timings = {}
        bg = background_index(names)
        prompted = [i for i in range(len(names)) if i != bg]
        if not prompted:
            return torch.full((len(names), *out_size), self.background_score, device=self.device)
        prototypes, found = self.class_prototypes(tuple(names[i] for i in prompted))
        if self.pipeline == "window":
            return self._segment_by_windows(image, names, prompted, prototypes, found, out_size)

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
        text = self.class_text([names[i] for i in prompted])
        global_score = (self.clip.encode_image(image[None]) @ text.T)[0].to(self.device)  # (K',)
        timings["clip"] = time.perf_counter() - start

        start = time.perf_counter()
        local = self._local(features @ prototypes.T)  # (S, K')
        combined = self.local_weight * local + (1 - self.local_weight) * global_score
        per_segment = torch.where(found, combined, global_score.expand_as(combined))
        table = torch.full((len(names), per_segment.shape[0]), self.background_score, device=self.device)
        table[prompted] = per_segment.T
        # Superpixel ids at the output size (nearest), then one lookup: a (K, H, W) result and nothing bigger.
        ids = F.interpolate(labels[None, None].float(), size=out_size, mode="nearest")[0, 0].long()
        scores = table[:, ids]
        timings["scoring"] = time.perf_counter() - start
        _LAST_TIMINGS.set((id(self), timings))
        return scores

    def _superpixel_features(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L2-normalised mean DINOv2 feature of each superpixel: image (3, h, w), labels (h, w) -> (S, Dp).

        Windows are read at their own size; where they overlap, a pixel's features are
        averaged over the windows that cover it.
        """
        h, w = image.shape[-2:]
        num = int(labels.max()) + 1
        wh, ww = window_shape(h, w, self.window)
        corners = sliding_windows(h, w, (wh, ww), self.stride)
        # Each window's pixel counts 1 / (the windows covering it): a pixel's feature is the mean of
        # its windows' features, and a superpixel's the mean of its pixels' features.
        cover = torch.zeros(h, w)
        for y, x in corners:
            cover[y : y + wh, x : x + ww] += 1
        share = 1.0 / cover
        sums = torch.zeros(num, self.dino.embed_dim, device=self.device)
        weights = torch.zeros(num, device=self.device)
        for b in range(0, len(corners), _WINDOW_BATCH):
            batch = corners[b : b + _WINDOW_BATCH]
            crops = torch.stack([image[:, y : y + wh, x : x + ww] for y, x in batch])
            feats = self.dino(crops).to(self.device)  # (n, Dp, g, g)
            for (y, x), f in zip(batch, feats):
                s, c = pool_features(f, labels[y : y + wh, x : x + ww], num, share[y : y + wh, x : x + ww])
                sums += s
                weights += c
        return F.normalize(sums / weights.clamp(min=1e-12)[:, None], dim=-1)

    # ------------------------------------------------------------------ the reference's per-window pipeline
    def _segment_by_windows(
        self, image: torch.Tensor, names: Sequence[str], prompted: Sequence[int], prototypes: torch.Tensor,
        found: torch.Tensor, out_size: Tuple[int, int],
    ) -> torch.Tensor:
        """The reference's test time: resize to ``short_side``; per sliding window, superpixels,
        DINOv2, the CLIP global score and the window's scores; scores averaged where windows
        overlap, then bilinear to ``out_size``: ``(K, *out_size)``."""
        timings = dict.fromkeys(("superpixels", "dino", "clip", "scoring"), 0.0)
        x = resize_short_side(image, self.short_side, self.long_side_cap, self.resize)
        size = tuple(x.shape[-2:])
        text = self.class_text([names[i] for i in prompted])  # (K', C)
        protos = F.normalize(prototypes, dim=-1)
        # Windows of WINDOW along each side, or the whole side where it is shorter (after the long
        # side's cap a very elongated image keeps a short side under WINDOW): mmseg's sliding inference.
        wh, ww = window_shape(size[0], size[1], self.window)
        sums = torch.zeros(len(prompted), *size, device=self.device)
        count = torch.zeros(size, device=self.device)
        for y, x0 in sliding_windows(size[0], size[1], (wh, ww), self.stride):
            crop = x[:, y:y + wh, x0:x0 + ww]
            sums[:, y:y + wh, x0:x0 + ww] += self.window_scores(crop, protos, text, found, timings)
            count[y:y + wh, x0:x0 + ww] += 1
        start = time.perf_counter()
        averaged = (sums / count)[None]
        if tuple(size) != tuple(out_size):
            averaged = F.interpolate(averaged, size=out_size, mode="bilinear", align_corners=False)
        scores = torch.full((len(names), *out_size), self.background_score, device=self.device)
        scores[list(prompted)] = averaged[0]
        timings["scoring"] += time.perf_counter() - start
        _LAST_TIMINGS.set((id(self), timings))
        return scores

    def window_scores(
        self, crop: torch.Tensor, prototypes: torch.Tensor, text: torch.Tensor, found: torch.Tensor,
        timings: Optional[Dict[str, float]] = None,
    ) -> torch.Tensor:
        """One window's class scores ``(K, h, w)``: ``w * local + (1 - w) * global``.

        Args:
            crop: (3, h, w) RGB in [0, 255] (square except along a side shorter than WINDOW).
            prototypes: (K, Dp) L2-normalised class prototypes.
            text: (K, C) class text embeddings (L2-normalised).
            found: (K,) bool, classes with a prototype (the others get the global score alone).
        """
        timings = {} if timings is None else timings
        c = crop.shape[-1]
        start = time.perf_counter()
        labels = felzenszwalb_superpixels(crop, *self.superpixel).to(self.device)
        num = int(labels.max()) + 1
        timings["superpixels"] = timings.get("superpixels", 0.0) + time.perf_counter() - start

        start = time.perf_counter()
        tokens = self.dino.tokens_at(crop[None], self.dino_size or c)[0].to(self.device)  # (Dp, g, g)
        timings["dino"] = timings.get("dino", 0.0) + time.perf_counter() - start

        start = time.perf_counter()
        global_score = (self.clip.encode_image(crop[None], clamp=False) @ text.T)[0].to(self.device)  # (K,)
        timings["clip"] = timings.get("clip", 0.0) + time.perf_counter() - start

        start = time.perf_counter()
        d, g = tokens.shape[0], tokens.shape[-2:]
        flat = tokens.reshape(d, -1).T  # (g*g, Dp)
        if self.pooling == "token_grid":
            weights = token_grid_weights(labels, tuple(g), num).to(self.device)  # (S, g*g)
            pooled = weights @ flat / (weights.sum(1, keepdim=True) + torch.finfo(torch.float32).eps)
            empty = pooled.norm(dim=-1) == 0  # no token weight: the reference's NaN superpixels
        else:
            sums, counts = pool_features(tokens, labels, num)
            pooled = sums / counts.clamp(min=1)[:, None]
            empty = torch.zeros(num, dtype=torch.bool, device=self.device)
        similarity = F.normalize(pooled, dim=-1) @ prototypes.T  # (S, K)
        local = self._local(similarity).T[:, labels]  # (K, h, w)
        if bool(empty.any()):
            # Pixels of such superpixels take the per-token score, upsampled (align_corners) to the window.
            dense = self._local(F.normalize(flat, dim=-1) @ prototypes.T).T.reshape(-1, *g)
            dense = F.interpolate(dense[None], size=tuple(crop.shape[-2:]), mode="bilinear", align_corners=True)[0]
            where = empty[labels]
            local[:, where] = dense[:, where]
        glob = global_score[:, None, None]
        combined = torch.where(found[:, None, None], self.local_weight * local + (1 - self.local_weight) * glob,
                               glob.expand_as(local))
        timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - start
        return combined

    def _local(self, cosine: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(cosine) if self.local_sigmoid else cosine
