"""Turn a panoptic record into the inputs of a Mask2Former-style model (one binary mask per segment)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .image import read_image_rgb

__all__ = ["MaskFormerPanopticMapper", "SUPPORTED_IMAGE_FORMATS"]

logger = logging.getLogger(__name__)

#: ``INPUT.FORMAT`` values the mapper can produce.
SUPPORTED_IMAGE_FORMATS = ("RGB", "BGR")


class MaskFormerPanopticMapper:
    """Read a panoptic record, augment it, and give one mask per segment.

    Use as ``build_detection_train_loader(cfg, mapper=MaskFormerPanopticMapper(cfg, True))``.

    Augmentations (detectron2 transforms, standard config keys): training resizes
    the shortest edge (``INPUT.MIN_SIZE_TRAIN``, ``MAX_SIZE_TRAIN``,
    ``MIN_SIZE_TRAIN_SAMPLING``), then crops when ``INPUT.CROP.ENABLED``
    (``INPUT.CROP.TYPE``, ``INPUT.CROP.SIZE``), then flips (``INPUT.RANDOM_FLIP``);
    testing only resizes (``INPUT.MIN_SIZE_TEST``, ``MAX_SIZE_TEST``). The crop
    expects the resized image to be at least the crop size (smaller images are
    cropped to their own size, so batches then hold images of different sizes).

    The panoptic PNG is transformed like a segmentation map (nearest neighbour) in
    its RGB encoding and decoded afterwards, so segment ids are never interpolated.

    Output, per record:

    - ``"image"``: (C, H, W) uint8 tensor in ``INPUT.FORMAT`` channel order;
    - ``"instances"``: ``Instances`` of image size (H, W) with ``gt_classes`` (N,) int64
      (the record's contiguous ``category_id``, over the dataset's FULL class list) and
      ``gt_masks`` (N, H, W) bool, one per non-crowd segment still present after the
      crop (empty ones dropped); N may be 0;
    - ``"height"``, ``"width"``: the original image size (for resizing predictions back);
    - ``"file_name"``, ``"image_id"``; ``"captions"`` (list of str) when the record has them.

    Args:
        is_train: training (random augmentations) or inference.
        augmentations: applied in order to the image and the panoptic PNG.
        image_format: ``"RGB"`` or ``"BGR"``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
    ):
        if image_format not in SUPPORTED_IMAGE_FORMATS:
            raise ValueError(
                f"INPUT.FORMAT is {image_format!r}; {type(self).__name__} supports "
                f"{list(SUPPORTED_IMAGE_FORMATS)}."
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        logger.info(
            "%s (%s): %s", type(self).__name__, "train" if is_train else "test", augmentations
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        lsj = cfg.INPUT.get("LSJ", None)
        if is_train and lsj is not None and lsj.ENABLED:
            # Large-scale jitter (ODISE's COCO recipe): flip, rescale the image to a random share of
            # a SIZE square, then crop (or pad) it to exactly that square.
            augs: List[T.Augmentation] = [
                T.RandomFlip(horizontal=True),
                T.ResizeScale(min_scale=lsj.MIN_SCALE, max_scale=lsj.MAX_SCALE, target_height=lsj.SIZE, target_width=lsj.SIZE),
                T.FixedSizeCrop(crop_size=(lsj.SIZE, lsj.SIZE)),
            ]
            return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT}
        augs = utils.build_augmentation(cfg, is_train)  # resize [, flip]
        if is_train and cfg.INPUT.CROP.ENABLED:
            augs.insert(1, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Map one record (see the class docstring for the output).

        Raises:
            ValueError: the record has no ``pan_seg_file_name`` (not a panoptic dataset).
        """
        from panopticapi.utils import rgb2id

        if "pan_seg_file_name" not in dataset_dict or "segments_info" not in dataset_dict:
            raise ValueError(
                f"Record of {dataset_dict.get('file_name', '<no file_name>')} has no "
                "'pan_seg_file_name'/'segments_info': this dataset has no panoptic annotations. "
                f"{type(self).__name__} needs a panoptic dataset such as "
                "diffseg_coco_panoptic_train or diffseg_sample_voc_panoptic (see docs/datasets.md)."
            )
        # Only check_image_size writes into the record (top-level height/width); the rest is read.
        record = dict(dataset_dict)  # the loader reuses records across epochs
        image = read_image_rgb(record["file_name"])
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        utils.check_image_size(record, image)
        pan_rgb = utils.read_image(record["pan_seg_file_name"], "RGB")
        if pan_rgb.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"{record['pan_seg_file_name']} is {pan_rgb.shape[1]}x{pan_rgb.shape[0]} but the "
                f"image {record['file_name']} is {image.shape[1]}x{image.shape[0]}."
            )

        aug_input = T.AugInput(image, sem_seg=None)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        pan_ids = rgb2id(transforms.apply_segmentation(pan_rgb))  # (H, W) segment ids

        out: Dict[str, Any] = {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "instances": self._instances(pan_ids, record["segments_info"]),
            "height": record.get("height", pan_rgb.shape[0]),
            "width": record.get("width", pan_rgb.shape[1]),
            "file_name": record["file_name"],
            "image_id": record["image_id"],
        }
        if "captions" in record:
            out["captions"] = list(record["captions"])
        return out

    @staticmethod
    def _instances(pan_ids: np.ndarray, segments_info: List[Dict[str, Any]]) -> Instances:
        """(H, W) segment ids + segments_info -> Instances with gt_classes (N,), gt_masks (N, H, W)."""
        classes, masks = [], []
        for seg in segments_info:
            if seg.get("iscrowd", 0):
                continue
            mask = pan_ids == seg["id"]
            if mask.any():
                classes.append(int(seg["category_id"]))
                masks.append(mask)
        instances = Instances(pan_ids.shape)
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_masks = (
            torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0,) + pan_ids.shape, dtype=torch.bool)
        )
        return instances
