"""Test helper: a panoptic record's ground truth, read back as a model's outputs.

Fed to detectron2's evaluators, it must score 100; with some classes swapped (``relabel``)
it must score less. Shared by the panoptic-data and micro-world tests.
"""
from typing import Any, Dict, Optional

import numpy as np
import torch
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import rgb2id
from PIL import Image


def png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def pan_ids(path: str) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG (id = R + 256 G + 256^2 B)."""
    return rgb2id(np.asarray(Image.open(path).convert("RGB")).astype(np.uint32))


def prediction_from_ground_truth(
    record: Dict[str, Any], num_classes: int, relabel: Optional[Dict[int, int]] = None
) -> Dict[str, Any]:
    """The record's ground truth as ``panoptic_seg``, ``sem_seg`` (one-hot scores; labels at or
    above ``num_classes``, i.e. ignored pixels, become class 0) and ``instances`` (one per thing
    segment, score 1); ``relabel`` changes some contiguous class ids."""
    relabel = relabel or {}
    pan = pan_ids(record["pan_seg_file_name"])
    segs = record["segments_info"]
    cls = {s["id"]: relabel.get(s["category_id"], s["category_id"]) for s in segs}
    segments_info = [{"id": s["id"], "category_id": cls[s["id"]], "isthing": s["isthing"]} for s in segs]
    sem = png(record["sem_seg_file_name"]).astype(np.int64)
    sem = np.vectorize(lambda v: relabel.get(v, v))(sem)
    sem = torch.as_tensor(np.where(sem < num_classes, sem, 0))
    scores = torch.nn.functional.one_hot(sem, num_classes).permute(2, 0, 1).float()
    things = [s for s in segs if s["isthing"]]
    masks = torch.stack([torch.from_numpy(pan == s["id"]) for s in things])
    instances = Instances(pan.shape)
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor([cls[s["id"]] for s in things], dtype=torch.int64)
    instances.scores = torch.ones(len(things))
    return {
        "panoptic_seg": (torch.from_numpy(pan.astype(np.int32)), segments_info),
        "sem_seg": scores,
        "instances": instances,
    }
