"""What every training-free open-vocabulary semantic segmenter of the package shares.

The vocabulary (set by config, by the evaluated dataset, by ``set_vocabulary`` or
per input), the checks of input images, the detectron2 ``forward`` contract, and
a small LRU cache for what a method computes once per vocabulary. A subclass
implements ``segment(image, names, out_size)`` and, optionally,
``_check_vocabulary(names)`` to reject a vocabulary before it is used.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...checkpoint_safety import refuse_partial_loads
from ...lru import LRUCache
from ...numerics import require_finite
from ...vocabulary import parse_vocabulary, vocabulary_from_metadata

_CACHE_SIZE = 8


def vocabulary_from_config(cfg) -> Optional[List[str]]:
    """``MODEL.DIFFSEG.VOCABULARY``, else the classes of ``DATASETS.TEST[0]``, else None."""
    vocabulary = list(cfg.MODEL.DIFFSEG.VOCABULARY) or None
    if vocabulary is None and len(cfg.DATASETS.TEST):
        vocabulary = vocabulary_from_metadata(cfg.DATASETS.TEST[0])
    return vocabulary


class OpenVocabularySegmenter(nn.Module):
    """Base of the training-free segmenters (``sem_seg`` output, one channel per class).

    Subclasses call ``super().__init__(input_format=...)`` first and ``set_vocabulary`` last,
    once the modules that check a vocabulary exist.
    """

    # Read by tools/train_net.py: a training-free model is only ever evaluated.
    TRAINING_FREE = True

    def __init__(self, *, input_format: str = "RGB"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for {type(self).__name__}, not {input_format!r}.")
        self.input_format = input_format
        self._vocabulary: Optional[List[str]] = None
        self._cache = LRUCache(_CACHE_SIZE)
        # An empty buffer that follows .to(): where the model lives (cfg.MODEL.DEVICE).
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)
        refuse_partial_loads(self)

    # ------------------------------------------------------------------ vocabulary
    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def vocabulary(self) -> Optional[List[str]]:
        return None if self._vocabulary is None else list(self._vocabulary)

    def set_vocabulary(self, names) -> None:
        """Set the classes to segment (a list or a comma-separated string), checked before use."""
        names = parse_vocabulary(names)
        self._check_vocabulary(names)
        self._vocabulary = names

    def set_vocabulary_from_dataset(self, dataset_name: str) -> None:
        """Use the ``stuff_classes`` of a registered dataset (the one being evaluated)."""
        self.set_vocabulary(vocabulary_from_metadata(dataset_name))

    def _check_vocabulary(self, names: Sequence[str]) -> None:
        """Raise if ``names`` cannot be segmented (a subclass hook; may warm its caches)."""

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
            channel per vocabulary class (see the subclass's ``segment``).
        """
        name = type(self).__name__
        if self.training:
            raise RuntimeError(f"{name} is training-free: run it in eval mode (tools/train_net.py --eval-only).")
        results = []
        for x in batched_inputs:
            if "vocabulary" in x:
                names = parse_vocabulary(x["vocabulary"])
                self._check_vocabulary(names)
            elif self._vocabulary is not None:
                names = self._vocabulary
            else:
                raise ValueError(
                    f"{name} has no vocabulary: set MODEL.DIFFSEG.VOCABULARY or DATASETS.TEST, call "
                    "model.set_vocabulary([...]), or pass 'vocabulary' in the input dict."
                )
            image = self._rgb(x["image"])
            out_size = (int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1])))
            scores = require_finite(self.segment(image, names, out_size), f"{name}'s score computation")
            results.append({"sem_seg": scores})
        return results

    def segment(self, image: torch.Tensor, names: Sequence[str], out_size: Tuple[int, int]) -> torch.Tensor:
        """Scores ``(K, *out_size)`` of one RGB image ``(3, H, W)`` in [0, 255] for ``names``."""
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
