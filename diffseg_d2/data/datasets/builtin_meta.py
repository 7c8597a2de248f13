"""Class names and label-id mappings of the semantic segmentation benchmarks.

Names are written as natural language for text prompts ("potted plant", not
"pottedplant"; "wood floor", not "floor-wood"), one name per class, in the
order of the contiguous class ids used for evaluation. The raw ids are the
pixel values stored in each benchmark's ground-truth PNGs.

This module holds facts only; turning them into look-up tables and metadata
is done by :mod:`diffseg_d2.data.datasets.register_semseg`.
"""

from __future__ import annotations

from typing import Dict, Tuple

__all__ = [
    "BACKGROUND",
    "IGNORE_LABEL",
    "VOC_CLASSES",
    "PASCAL_CONTEXT_59_CLASSES",
    "COCO_THING_CLASSES",
    "COCO_THING_RAW_IDS",
    "COCO_STUFF_CLASSES",
    "COCO_STUFF_RAW_IDS",
    "COCO_STUFF_171_CLASSES",
    "COCO_STUFF_171_RAW_IDS",
    "COCO_STUFF_171_RAW_ID_TO_CONTIGUOUS",
    "ADE20K_150_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
]

#: Name of the background class of the datasets that have one (VOC, Context-60, COCO-Object).
BACKGROUND = "background"
#: Label value that evaluation ignores, in every dataset here.
IGNORE_LABEL = 255

# --------------------------------------------------------------------------- #
# Pascal VOC 2012: 20 object classes. GT PNGs store 0 = background, 1..20 these
# classes in this order, 255 = object borders / difficult ("void").
# --------------------------------------------------------------------------- #
VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
)

# --------------------------------------------------------------------------- #
# Pascal Context (VOC2010), the 59 most frequent classes used by semantic and
# open-vocabulary segmentation papers. With mmsegmentation's conversion the GT
# PNGs store 0 = background (all other classes), 1..59 these classes in order.
# --------------------------------------------------------------------------- #
PASCAL_CONTEXT_59_CLASSES: Tuple[str, ...] = (
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "potted plant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tv monitor",
    "wall",
    "water",
    "window",
    "wood",
)

# --------------------------------------------------------------------------- #
# COCO-Stuff 164k (stuffthingmaps_trainval2017). PNG value = COCO category id - 1;
# 255 = unlabeled. Things are COCO ids 1..90 (80 used), stuff ids 92..182 (91).
# --------------------------------------------------------------------------- #
COCO_THING_CLASSES: Tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair dryer",
    "toothbrush",
)

#: PNG values of the 80 things (COCO category ids 1..90 minus the 10 unused ones, minus 1).
COCO_THING_RAW_IDS: Tuple[int, ...] = tuple(
    cat_id - 1
    for cat_id in range(1, 91)
    if cat_id not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # ids COCO never used
)

# Dataset names in brackets where the prompt name differs.
COCO_STUFF_CLASSES: Tuple[str, ...] = (
    "banner",
    "blanket",
    "branch",
    "bridge",
    "building",  # building-other
    "bush",
    "cabinet",
    "cage",
    "cardboard",
    "carpet",
    "ceiling",  # ceiling-other
    "ceiling tile",
    "cloth",
    "clothes",
    "clouds",
    "counter",
    "cupboard",
    "curtain",
    "desk",  # desk-stuff
    "dirt",
    "door",  # door-stuff
    "fence",
    "marble floor",  # floor-marble
    "floor",  # floor-other
    "stone floor",
    "tile floor",
    "wood floor",
    "flower",
    "fog",
    "food",  # food-other
    "fruit",
    "furniture",  # furniture-other
    "grass",
    "gravel",
    "ground",  # ground-other
    "hill",
    "house",
    "leaves",
    "light",
    "mat",
    "metal",
    "mirror",  # mirror-stuff
    "moss",
    "mountain",
    "mud",
    "napkin",
    "net",
    "paper",
    "pavement",
    "pillow",
    "plant",  # plant-other
    "plastic",
    "platform",
    "playing field",  # playingfield
    "railing",
    "railroad",
    "river",
    "road",
    "rock",
    "roof",
    "rug",
    "salad",
    "sand",
    "sea",
    "shelf",
    "sky",  # sky-other
    "skyscraper",
    "snow",
    "solid",  # solid-other
    "stairs",
    "stone",
    "straw",
    "structural",  # structural-other
    "table",
    "tent",
    "textile",  # textile-other
    "towel",
    "tree",
    "vegetable",
    "brick wall",  # wall-brick
    "concrete wall",
    "wall",  # wall-other
    "wall panel",
    "stone wall",
    "tile wall",
    "wood wall",
    "water",  # water-other
    "water drops",  # waterdrops
    "window blind",
    "window",  # window-other
    "wood",
)

#: PNG values of the 91 stuff classes (COCO-Stuff ids 92..182, minus 1).
COCO_STUFF_RAW_IDS: Tuple[int, ...] = tuple(range(91, 182))

#: COCO-Stuff-171: things then stuff, sorted by PNG value.
COCO_STUFF_171_CLASSES: Tuple[str, ...] = COCO_THING_CLASSES + COCO_STUFF_CLASSES
#: PNG value of each COCO-Stuff-171 class, aligned with :data:`COCO_STUFF_171_CLASSES`.
COCO_STUFF_171_RAW_IDS: Tuple[int, ...] = COCO_THING_RAW_IDS + COCO_STUFF_RAW_IDS
#: PNG value -> contiguous class id (0..170); values not listed are unlabeled.
COCO_STUFF_171_RAW_ID_TO_CONTIGUOUS: Dict[int, int] = {
    raw: idx for idx, raw in enumerate(COCO_STUFF_171_RAW_IDS)
}

# --------------------------------------------------------------------------- #
# ADE20K SceneParsing (ADEChallengeData2016), 150 classes, the first synonym of
# each line of objectInfo150. GT PNGs store 0 = "other" (ignored), 1..150 these.
# --------------------------------------------------------------------------- #
ADE20K_150_CLASSES: Tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

# --------------------------------------------------------------------------- #
# Cityscapes: the 19 evaluation ("train") classes, in trainId order. GT files
# *_gtFine_labelIds.png store the 34 raw labelIds; all others are ignored.
# --------------------------------------------------------------------------- #
CITYSCAPES_CLASSES: Tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: Raw Cityscapes labelId -> trainId (0..18); labelIds not listed are ignored (255).
CITYSCAPES_LABEL_ID_TO_TRAIN_ID: Dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
