"""Build detectron2's own evaluators for the ``diffseg_`` datasets, chosen by ``evaluator_type``."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..data.datasets.register_semseg import build_label_lut
from .bootstrap import PerImageSemSegEvaluator
from .sem_seg import SemSegGTLoader

__all__ = [
    "SUPPORTED_EVALUATOR_TYPES",
    "PanopticInstanceCOCOEvaluator",
    "build_evaluator",
    "check_panoptic_dataset",
]

logger = logging.getLogger(__name__)

#: ``evaluator_type`` values :func:`build_evaluator` knows.
SUPPORTED_EVALUATOR_TYPES = ("sem_seg", "coco_panoptic_seg")

_PANOPTIC_EXAMPLES = (
    "diffseg_coco_panoptic_val, diffseg_ade20k_panoptic_val or diffseg_sample_voc_panoptic"
)


class PanopticInstanceCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` for models whose ``pred_classes`` index ALL classes.

    A Mask2Former-style model on a panoptic dataset predicts contiguous ids over
    ``stuff_classes`` (things and stuff), where things need not come first (ADE20K).
    ``COCOEvaluator`` wants thing ids 0..T-1, so before it sees them, predictions of
    stuff classes are dropped and thing ids are renumbered in the order of their
    contiguous ids (the order of ``thing_classes``). Where things are 0..T-1 already
    (COCO, the VOC sample) this changes nothing but the dropping of stuff.

    Args: as ``COCOEvaluator``.
    """

    def __init__(self, dataset_name: str, *args: Any, **kwargs: Any):
        super().__init__(dataset_name, *args, **kwargs)
        full = self._metadata.thing_dataset_id_to_contiguous_id  # dataset id -> id in all classes
        ordered = sorted(full.items(), key=lambda item: item[1])
        self._full_to_thing: Dict[int, int] = {c: rank for rank, (_, c) in enumerate(ordered)}
        meta = self._metadata.as_dict()
        meta["thing_dataset_id_to_contiguous_id"] = {d: rank for rank, (d, _) in enumerate(ordered)}
        # A private copy: the catalog's metadata keeps the full-list ids the model uses.
        self._metadata = Metadata(**meta)

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """As ``COCOEvaluator.process``; ``outputs[i]["instances"].pred_classes`` are ids over all classes."""
        renumbered = []
        for output in outputs:
            if "instances" in output:
                instances = output["instances"].to("cpu")
                classes = instances.pred_classes.tolist()
                keep = [i for i, c in enumerate(classes) if c in self._full_to_thing]
                instances = instances[torch.tensor(keep, dtype=torch.long)]
                instances.pred_classes = torch.tensor(
                    [self._full_to_thing[classes[i]] for i in keep], dtype=torch.long
                )
                output = dict(output, instances=instances)
            renumbered.append(output)
        super().process(inputs, renumbered)


def _is_panoptic(meta: Metadata) -> bool:
    """Whether PQ can be computed on a dataset: a panoptic evaluator type and a panoptic json."""
    return meta.get("evaluator_type", None) == "coco_panoptic_seg" and bool(meta.get("panoptic_json", None))


def _panoptic_dataset_names() -> List[str]:
    return sorted(n for n in MetadataCatalog.list() if n.startswith("diffseg_") and _is_panoptic(MetadataCatalog.get(n)))


def _sem_seg_evaluator(dataset_name: str, lut, output_dir: Optional[str], distributed: bool,
                       per_image: bool = False) -> SemSegEvaluator:
    """detectron2's SemSegEvaluator reading ground-truth PNGs through the value table ``lut``."""
    kind = PerImageSemSegEvaluator if per_image else SemSegEvaluator
    return kind(
        dataset_name, distributed=distributed, output_dir=output_dir, sem_seg_loading_fn=SemSegGTLoader(lut)
    )


def check_panoptic_dataset(dataset_name: str) -> None:
    """Raise ValueError unless ``dataset_name`` has panoptic annotations (PQ can be computed).

    Call it where a config asks for panoptic output on a dataset, before building a model
    or loader, to fail with a clear message instead of deep inside an evaluator.

    Raises:
        ValueError: the metadata's ``evaluator_type`` is not ``"coco_panoptic_seg"`` or it
            has no ``panoptic_json``; the message lists the panoptic datasets registered.
    """
    meta = MetadataCatalog.get(dataset_name)
    if _is_panoptic(meta):
        return
    evaluator_type = meta.get("evaluator_type", None)
    raise ValueError(
        f"Dataset '{dataset_name}' has evaluator_type {evaluator_type!r} and no panoptic "
        f"annotations (panoptic_json); PQ needs a panoptic dataset such as {_PANOPTIC_EXAMPLES} "
        "(see docs/datasets.md). diffseg_d2's panoptic datasets: "
        + ", ".join(_panoptic_dataset_names())
        + "."
    )


def _build_panoptic_evaluator(
    dataset_name: str, meta: Metadata, output_dir: Optional[str], distributed: bool, per_image: bool
) -> DatasetEvaluators:
    check_panoptic_dataset(dataset_name)
    records = DatasetCatalog.get(dataset_name)  # lists the files (writes the sample's)
    for key, exists in (("panoptic_json", os.path.isfile), ("panoptic_root", os.path.isdir)):
        path = meta.get(key, None)
        if not path or not exists(path):
            raise FileNotFoundError(
                f"Dataset '{dataset_name}': the {key} {path} is missing; PQ needs it. "
                "See docs/datasets.md for the layout under $DETECTRON2_DATASETS."
            )
    evaluators: List[DatasetEvaluator] = [
        COCOPanopticEvaluator(dataset_name, output_dir=output_dir)
    ]

    if meta.get("sem_seg_root") and records and all("sem_seg_file_name" in r for r in records):
        # Semantic PNGs of panoptic datasets hold contiguous ids already.
        identity = build_label_lut({i: i for i in range(len(meta.stuff_classes))})
        evaluators.append(_sem_seg_evaluator(dataset_name, identity, output_dir, distributed, per_image))
    else:
        logger.info(
            "'%s' has no semantic PNGs (sem_seg_root): mIoU is not evaluated.", dataset_name
        )

    has_json = meta.get("json_file", None) is not None
    if has_json or any(r.get("annotations") for r in records):
        if not has_json and output_dir is None:
            raise ValueError(
                f"Dataset '{dataset_name}' has instance annotations in its records but no "
                "json_file; COCOEvaluator converts them to a COCO json in output_dir, so pass "
                "output_dir to build_evaluator."
            )
        evaluators.append(
            PanopticInstanceCOCOEvaluator(
                dataset_name, tasks=("segm",), distributed=distributed, output_dir=output_dir
            )
        )
    else:
        logger.info(
            "'%s' has no instance annotations (json_file): mask AP is not evaluated.", dataset_name
        )
    return DatasetEvaluators(evaluators)


def build_evaluator(
    dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True, per_image: bool = False
) -> DatasetEvaluator:
    """The detectron2 evaluator for a registered dataset, chosen by its ``evaluator_type``.

    Args:
        dataset_name: a name in ``DatasetCatalog``/``MetadataCatalog``.
        output_dir: where the evaluators write predictions and results (None: nowhere).
        distributed: gather results from all processes before computing metrics.
        per_image: mIoU through :class:`~diffseg_d2.evaluation.bootstrap.PerImageSemSegEvaluator`,
            which also writes each image's confusion matrix into ``output_dir`` (for intervals).

    Returns:
        For ``"sem_seg"``: ``SemSegEvaluator`` reading GT through
        :class:`SemSegGTLoader` with the metadata's ``gt_label_lut`` (raw PNG values
        are used as class ids when the metadata has no table).

        For ``"coco_panoptic_seg"``: ``DatasetEvaluators`` of ``COCOPanopticEvaluator``
        (PQ, always; results under ``"panoptic_seg"``), ``SemSegEvaluator`` (mIoU, when
        the metadata has ``sem_seg_root`` and the records ``sem_seg_file_name``; under
        ``"sem_seg"``) and :class:`PanopticInstanceCOCOEvaluator` with ``tasks=("segm",)``
        (mask AP, when the metadata has ``json_file`` or the records instance
        ``annotations``; under ``"segm"``). Predictions follow detectron2's formats:
        ``"panoptic_seg"`` = ((H, W) int segment ids, segments_info with contiguous
        ``category_id`` and ``isthing``), ``"sem_seg"`` = (C, H, W) scores over
        ``stuff_classes``, ``"instances"`` with ``pred_masks``, ``pred_classes`` (ids over
        ``stuff_classes``), ``scores``, ``pred_boxes``.

    Raises:
        ValueError: the metadata has no ``evaluator_type`` or one not in
            :data:`SUPPORTED_EVALUATOR_TYPES`, or a panoptic type without ``panoptic_json``.
        FileNotFoundError: a panoptic dataset's json or PNG folder is missing.
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
        return _sem_seg_evaluator(dataset_name, lut, output_dir, distributed, per_image)
    if evaluator_type == "coco_panoptic_seg":
        return _build_panoptic_evaluator(dataset_name, meta, output_dir, distributed, per_image)
    raise ValueError(
        f"No evaluator for dataset '{dataset_name}': its metadata evaluator_type is "
        f"{evaluator_type!r}, supported: {list(SUPPORTED_EVALUATOR_TYPES)}."
    )
