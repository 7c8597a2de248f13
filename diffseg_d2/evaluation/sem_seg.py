"""Build detectron2's own evaluators for the ``diffseg_`` datasets.

Ground-truth PNGs stay as the datasets ship them; :class:`SemSegGTLoader`
applies the dataset's ``gt_label_lut`` metadata when the evaluator reads them.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, SemSegEvaluator
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["SemSegGTLoader", "build_evaluator", "SUPPORTED_EVALUATOR_TYPES"]

logger = logging.getLogger(__name__)

#: ``evaluator_type`` values :func:`build_evaluator` knows.
SUPPORTED_EVALUATOR_TYPES = ("sem_seg",)


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


def build_evaluator(
    dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
) -> DatasetEvaluator:
    """The detectron2 evaluator for a registered dataset, chosen by its ``evaluator_type``.

    Args:
        dataset_name: a name in ``DatasetCatalog``/``MetadataCatalog``.
        output_dir: where the evaluator writes its predictions and results (None: nowhere).
        distributed: gather results from all processes before computing metrics.

    Returns:
        For ``"sem_seg"``: ``SemSegEvaluator`` reading GT through
        :class:`SemSegGTLoader` with the metadata's ``gt_label_lut`` (raw PNG values
        are used as class ids when the metadata has no table).

    Raises:
        ValueError: the metadata has no ``evaluator_type`` or one not in
            :data:`SUPPORTED_EVALUATOR_TYPES`.
    """
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type == "sem_seg":
        lut = meta.get("gt_label_lut", None)
        if lut is None:
            logger.warning(
                "'%s' has no gt_label_lut; raw GT values are used as class ids.", dataset_name
            )
            lut = tuple(range(256))
        return SemSegEvaluator(
            dataset_name,
            distributed=distributed,
            output_dir=output_dir,
            sem_seg_loading_fn=SemSegGTLoader(lut),
        )
    raise ValueError(
        f"No evaluator for dataset '{dataset_name}': its metadata evaluator_type is "
        f"{evaluator_type!r}, supported: {list(SUPPORTED_EVALUATOR_TYPES)}."
    )
