"""Reading semantic ground truth for detectron2's ``SemSegEvaluator``.

Ground-truth PNGs stay as the datasets ship them; :class:`SemSegGTLoader`
applies the dataset's ``gt_label_lut`` metadata when the evaluator reads them.
"""

from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["SemSegGTLoader"]

logger = logging.getLogger(__name__)


class SemSegGTLoader:
    """Read a ground-truth PNG as integers and map raw values to class ids through a table.

    Passed to ``SemSegEvaluator(sem_seg_loading_fn=...)``; a class rather than a
    closure so that it pickles (multi-process evaluation).

    Args:
        lut: 256 ints, ``lut[raw value] = contiguous class id or ignore label``.
    """

    def __init__(self, lut: Sequence[int]):
        if len(lut) != 256:
            raise ValueError(f"gt_label_lut must have 256 entries, got {len(lut)}")
        self.lut = np.asarray(lut, dtype=np.int64)

    def __call__(self, filename: str, dtype: Union[np.dtype, type, str] = int) -> np.ndarray:
        """Load ``filename``.

        Args:
            filename: a single-channel PNG (grey or palette) of raw label values.
            dtype: dtype of the returned array (``SemSegEvaluator`` asks for ``int``).

        Returns:
            (H, W) array of class ids, with the ignore label where the table says so.
        """
        with PathManager.open(filename, "rb") as f:
            raw = np.asarray(Image.open(f))
        if raw.ndim != 2:
            raise ValueError(
                f"{filename}: expected a single-channel label PNG, got shape {raw.shape}"
            )
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(
                f"{filename}: label values {raw.min()}..{raw.max()} are outside 0..255"
            )
        return self.lut[raw.astype(np.int64)].astype(
            dtype
        )  # fancy indexing gives a new, writable array

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lut=<256 entries, {int((self.lut != 255).sum())} mapped>)"
