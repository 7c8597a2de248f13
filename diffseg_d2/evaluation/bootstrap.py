"""Per-image confusion matrices and bootstrap intervals of mIoU over images.

:class:`PerImageSemSegEvaluator` is detectron2's ``SemSegEvaluator`` that also keeps
each image's confusion matrix and writes them to ``sem_seg_per_image.npz`` in its
output folder (``TEST.PER_IMAGE_CONFUSION True`` turns it on in ``tools/train_net.py``).
From those, :func:`bootstrap_miou` gives a percentile interval of mIoU by resampling
images with replacement, and :func:`bootstrap_difference` the interval of the
difference between two methods evaluated on the same images (a paired bootstrap: each
resample draws the same images for both).

mIoU is computed exactly as ``SemSegEvaluator.evaluate`` does (classes with ground-truth
pixels, ignore pixels in the extra last row/column), so the point estimate equals the
evaluator's.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.comm import all_gather, is_main_process, synchronize

__all__ = [
    "PER_IMAGE_FILE",
    "PerImageSemSegEvaluator",
    "miou_from_confusion",
    "load_per_image_confusion",
    "bootstrap_weights",
    "bootstrap_miou",
    "bootstrap_difference",
    "excludes_zero",
]

#: File name of the per-image confusion matrices in the evaluator's output folder.
PER_IMAGE_FILE = "sem_seg_per_image.npz"


class PerImageSemSegEvaluator(SemSegEvaluator):
    """``SemSegEvaluator`` that also writes each image's confusion matrix (see the module docstring).

    The file holds ``file_names`` (N,) and ``confusion`` (N, K+1, K+1) int64, indexed
    ``[predicted, ground truth]`` as detectron2's, the last index being "ignore".
    """

    def reset(self):
        super().reset()
        self._per_image = []

    def process(self, inputs, outputs):
        for one_input, one_output in zip(inputs, outputs):
            before = self._conf_matrix.copy()
            super().process([one_input], [one_output])
            self._per_image.append((one_input["file_name"], self._conf_matrix - before))

    def evaluate(self):
        per_image = self._per_image
        if self._distributed:
            synchronize()
            per_image = [item for part in all_gather(per_image) for item in part]
        results = super().evaluate()
        if self._output_dir and is_main_process() and per_image:
            os.makedirs(self._output_dir, exist_ok=True)
            names = np.array([name for name, _ in per_image])
            confusion = np.stack([conf for _, conf in per_image]).astype(np.int64)
            np.savez_compressed(os.path.join(self._output_dir, PER_IMAGE_FILE), file_names=names, confusion=confusion)
        return results


def load_per_image_confusion(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(file_names (N,), confusion (N, K+1, K+1))`` written by :class:`PerImageSemSegEvaluator`."""
    with np.load(path, allow_pickle=False) as data:
        return data["file_names"], data["confusion"]


def miou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """mIoU (in %) of summed confusion matrices ``(..., K+1, K+1)``, as ``SemSegEvaluator``."""
    conf = np.asarray(confusion, dtype=float)[..., :-1, :-1]
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    pos_gt = conf.sum(-2)
    pos_pred = conf.sum(-1)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    iou = np.where(valid, tp / np.where(valid, union, 1.0), 0.0)
    return 100.0 * iou.sum(-1) / np.maximum(valid.sum(-1), 1)


def bootstrap_weights(images: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, images) counts: how often each image is drawn in each resample with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images))
    weights = np.zeros((resamples, images))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    return weights


def _resampled_miou(per_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return miou_from_confusion(np.einsum("bn,nij->bij", weights, per_image.astype(float)))


def _percentile_interval(values: np.ndarray, level: float) -> Tuple[float, float]:
    tail = 100.0 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_miou(per_image: np.ndarray, weights: np.ndarray, level: float = 0.95) -> Tuple[float, float, float]:
    """``(mIoU, low, high)``: the point estimate and the percentile interval over the resamples.

    Args:
        per_image: (N, K+1, K+1) confusion matrices of N images.
        weights: :func:`bootstrap_weights` ``(resamples, N)``.
    """
    if per_image.shape[0] != weights.shape[1]:
        raise ValueError(f"{per_image.shape[0]} images but resample weights for {weights.shape[1]}")
    point = float(miou_from_confusion(per_image.sum(0)))
    return (point, *_percentile_interval(_resampled_miou(per_image, weights), level))


def bootstrap_difference(a: np.ndarray, b: np.ndarray, weights: np.ndarray,
                         level: float = 0.95) -> Tuple[float, float, float]:
    """``(mIoU(a) - mIoU(b), low, high)`` with the paired percentile interval (same images drawn for both).

    Raises:
        ValueError: ``a`` and ``b`` are not the same number of images of the same classes.
    """
    if a.shape != b.shape:
        raise ValueError(f"per-image confusion shapes differ: {a.shape} vs {b.shape}; evaluate both on the same images")
    point = float(miou_from_confusion(a.sum(0)) - miou_from_confusion(b.sum(0)))
    return (point, *_percentile_interval(_resampled_miou(a, weights) - _resampled_miou(b, weights), level))


def excludes_zero(interval: Sequence[float]) -> bool:
    """Whether a ``(point, low, high)`` difference interval lies wholly on one side of zero."""
    _, low, high = interval
    return low > 0 or high < 0
