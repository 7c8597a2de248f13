"""What the package's open-vocabulary segmenters share.

``OpenVocabularyMixin`` (every model, ODISE included): the vocabulary (set by config,
by the evaluated dataset, by ``set_vocabulary`` or per input) with its thing classes.
``OpenVocabularySegmenter`` (the training-free ones): the checks of input images, the detectron2
``forward`` contract (``sem_seg``, and ``panoptic_seg`` made from it), and a small
LRU cache for what a method computes once per vocabulary. A subclass implements
``segment(image, names, out_size)`` and, optionally, ``_check_vocabulary(names)``
to reject a vocabulary before it is used.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...checkpoint_safety import refuse_partial_loads
from ...lru import LRUCache
from ...numerics import require_finite
from ...vocabulary import THING, classes_from_metadata, name_key, panoptic_roles, parse_vocabulary, synonym_classes
from .semantic_to_panoptic import semantic_to_panoptic

_CACHE_SIZE = 8


def vocabulary_args_from_config(cfg) -> Dict:
    """``vocabulary`` (``MODEL.DIFFSEG.VOCABULARY``, else ``DATASETS.TEST[0]``'s classes, else
    None), ``thing_classes`` (that dataset's, else None) and ``stuff_classes``
    (``MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES``: which classes of the user's vocabulary are stuff)."""
    vocabulary, things = list(cfg.MODEL.DIFFSEG.VOCABULARY) or None, None
    stuff = list(cfg.MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES) or None
    if vocabulary is not None and stuff:
        panoptic_roles(parse_vocabulary(vocabulary), None, stuff)  # a misspelt stuff class is named now
    if vocabulary is None and len(cfg.DATASETS.TEST):
        vocabulary, things = classes_from_metadata(cfg.DATASETS.TEST[0])
    return dict(vocabulary=vocabulary, thing_classes=things, stuff_classes=stuff)


def dataset_classes(name: str, things: bool = False):
    """A registered dataset's class names (its vocabulary), or with ``things`` its thing classes (or None):
    what a yacs config reads from ``DATASETS.TEST[0]``, for LazyConfig files."""
    vocabulary, thing_classes = classes_from_metadata(name)
    return thing_classes if things else vocabulary


def open_vocab_args_from_config(cfg) -> Dict:
    """The training-free base's keyword arguments from a config: :func:`vocabulary_args_from_config`
    and ``panoptic_min_area`` (None when ``PANOPTIC.ENABLED`` is off)."""
    panoptic = cfg.MODEL.DIFFSEG.PANOPTIC
    return dict(**vocabulary_args_from_config(cfg),
                panoptic_min_area=float(panoptic.MIN_AREA) if panoptic.ENABLED else None)


class OpenVocabularyMixin:
    """The vocabulary of a segmenter: its classes and which of them are things.

    A model calls ``_init_vocabulary()`` in its ``__init__`` and may override
    ``_check_vocabulary(names)`` to reject a vocabulary before it is used.
    """

    def _init_vocabulary(self, stuff_classes: Optional[Sequence[str]] = None) -> None:
        self._vocabulary: Optional[List[str]] = None
        self._roles: List[str] = []
        # The classes that are stuff whenever a vocabulary of the user's names them
        # (MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES).
        self._stuff_classes: List[str] = list(stuff_classes or ())

    @property
    def vocabulary(self) -> Optional[List[str]]:
        return None if self._vocabulary is None else list(self._vocabulary)

    def set_vocabulary(self, names, thing_classes: Optional[Sequence[str]] = None,
                       stuff_classes: Optional[Sequence[str]] = None) -> None:
        """Set the classes to segment (a list, or a comma-separated string of names), checked before use.

        Args:
            names: class names; within a list entry, commas separate synonyms.
            thing_classes: a dataset's countable things (instances, ``panoptic_seg``'s ``isthing``);
                its other classes are stuff.
            stuff_classes: without ``thing_classes``: the classes that are stuff (None: those of
                ``MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES`` that ``names`` holds); the others are
                things, and "background" is void (no segment). See ``panoptic_roles``.
        """
        names = parse_vocabulary(names)
        roles = self._roles_of(names, thing_classes, stuff_classes)
        self._check_vocabulary(names)
        self._vocabulary, self._roles = names, roles

    def set_vocabulary_from_dataset(self, dataset_name: str) -> None:
        """Use the classes and thing classes of a dataset's metadata (the one being evaluated)."""
        self.set_vocabulary(*classes_from_metadata(dataset_name))

    def _roles_of(self, names: Sequence[str], thing_classes, stuff_classes) -> List[str]:
        if thing_classes is None and stuff_classes is None:
            present = {name_key(n) for n in names}
            stuff_classes = [c for c in self._stuff_classes if name_key(c) in present]
        return panoptic_roles(names, thing_classes, stuff_classes)

    def _check_vocabulary(self, names: Sequence[str]) -> None:
        """Raise if ``names`` cannot be segmented (a subclass hook; may warm its caches)."""

    def _input_vocabulary(self, x: Dict) -> Tuple[List[str], List[str]]:
        """``(names, panoptic roles)`` for one input dict: its own ``vocabulary`` (and optional
        ``thing_classes`` / ``stuff_classes``) key, else the model's. Nothing of the model changes,
        so concurrent calls with different vocabularies stay apart."""
        if "vocabulary" in x:
            names = parse_vocabulary(x["vocabulary"])
            roles = self._roles_of(names, x.get("thing_classes"), x.get("stuff_classes"))
            self._check_vocabulary(names)
            return names, roles
        if self._vocabulary is None:
            raise ValueError(
                f"{type(self).__name__} has no vocabulary: set MODEL.DIFFSEG.VOCABULARY or DATASETS.TEST, call "
                "model.set_vocabulary([...]), or pass 'vocabulary' in the input dict."
            )
        return self._vocabulary, self._roles


def thing_mask(roles: Sequence[str]) -> List[bool]:
    """Per class, whether its ``panoptic_roles`` role is a thing."""
    return [r == THING for r in roles]


class OpenVocabularySegmenter(OpenVocabularyMixin, nn.Module):
    """Base of the training-free segmenters (``sem_seg`` output, one channel per class, and ``panoptic_seg``).

    Subclasses call ``super().__init__(input_format=..., panoptic_min_area=..., stuff_classes=...)`` first and
    ``set_vocabulary`` last, once the modules that check a vocabulary exist.

    Args:
        input_format: "RGB" or "BGR", the channel order of input images.
        panoptic_min_area: also return ``panoptic_seg`` (:func:`semantic_to_panoptic`), dropping
            segments under this fraction of the image; None: ``sem_seg`` only.
    """

    # Read by tools/train_net.py: a training-free model is only ever evaluated.
    TRAINING_FREE = True

    def __init__(self, *, input_format: str = "RGB", panoptic_min_area: Optional[float] = None,
                 stuff_classes: Optional[Sequence[str]] = None):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for {type(self).__name__}, not {input_format!r}.")
        if panoptic_min_area is not None and not 0.0 <= panoptic_min_area < 1.0:
            raise ValueError(f"MODEL.DIFFSEG.PANOPTIC.MIN_AREA is a fraction of the image in [0, 1), "
                             f"got {panoptic_min_area}.")
        self.input_format = input_format
        self.panoptic_min_area = panoptic_min_area
        self._init_vocabulary(stuff_classes)
        self._cache = LRUCache(_CACHE_SIZE)
        # An empty buffer that follows .to(): where the model lives (cfg.MODEL.DEVICE).
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        refuse_partial_loads(self)

    # ------------------------------------------------------------------ vocabulary
    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def _cached(self, key: Tuple, compute: Callable[[], object]):
        """A small LRU cache for per-vocabulary work (encoded prompts, class prototypes)."""
        return self._cache.get_or_compute(key, compute)

    # ------------------------------------------------------------------ inference
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            batched_inputs: detectron2 inputs; each has ``image`` (C, H, W) in
                INPUT.FORMAT, optional ``height``/``width`` of the wanted output and
                optional ``vocabulary`` (list of names) for this image only.

        Returns:
            one dict per input with ``sem_seg``: (K, height, width) scores, one
            channel per vocabulary class (see the subclass's ``segment``), and unless
            panoptic output is off, ``panoptic_seg``: ``(ids, segments_info)`` made from
            them (:func:`semantic_to_panoptic`).
        """
        name = type(self).__name__
        if self.training:
            raise RuntimeError(f"{name} is training-free: run it in eval mode (tools/train_net.py --eval-only).")
        results = []
        for x in batched_inputs:
            names, roles = self._input_vocabulary(x)
            image = self._rgb(x["image"])
            out_size = (int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1])))
            scores = require_finite(self.segment_classes(image, names, out_size, x.get("file_name")),
                                    f"{name}'s score computation")
            result = {"sem_seg": scores}
            if self.panoptic_min_area is not None:
                result["panoptic_seg"] = semantic_to_panoptic(scores, roles, self.panoptic_min_area)
            results.append(result)
        return results

    def segment_classes(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int],
                        file_name: Optional[str] = None) -> torch.Tensor:
        """``segment`` with synonyms: each synonym of a class (``"sofa, couch"``) is scored as a class
        of its own, and the class scores the best of them, pixel by pixel (as ODISE's reference does
        with its synonym lists). A vocabulary without synonyms is ``segment`` itself."""
        flat, members = synonym_classes(names)
        if flat == list(names):
            return self.segment(image, names, out_size, file_name)
        scores = self.segment(image, flat, out_size, file_name)
        return torch.stack([scores[idx].amax(0) for idx in members])

    def segment(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int],
                file_name: Optional[str] = None) -> torch.Tensor:
        """Scores ``(K, *out_size)`` of one RGB image ``(3, H, W)`` in [0, 255] for ``names`` (each name
        one prompt: synonyms are split by ``segment_classes``); ``file_name``: the input's, for
        methods that look the image up (DiffSegmenter's per-image class lists)."""
        raise NotImplementedError

    def _rgb(self, image: torch.Tensor) -> torch.Tensor:
        """(C, H, W) input -> (3, H, W) float RGB in [0, 255] on the model's device."""
        if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"Expected an image tensor of shape (C, H, W) with C in (1, 3, 4), got {tuple(image.shape)}."
            )
        if min(image.shape[-2:]) < 1:
            raise ValueError(f"The image is empty: shape {tuple(image.shape)}.")
        image = image.to(self.device, dtype=torch.float32)
        # gray -> 3 channels; alpha is dropped (data/image.py composites it when reading files)
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
        return image.flip(0) if self.input_format == "BGR" else image
