"""Writing datasets in COCO's formats (the bundled sample, the micro-world): PNG and JSON writers
for ``paths.write_atomically``, a mask's box and its RLE."""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List


def save_png(array) -> Callable[[str], None]:
    """A writer for ``paths.write_atomically``: ``array`` (uint8 H x W or H x W x 3) as a PNG."""
    from PIL import Image

    return lambda tmp: Image.fromarray(array).save(tmp, format="PNG")


def save_json(content: Any) -> Callable[[str], None]:
    """A writer for ``paths.write_atomically``: ``content`` as JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(content, f)

    return write


def mask_bbox_xywh(mask) -> List[int]:
    """COCO ``[x, y, w, h]`` of a boolean mask's pixel extent (w = x1 - x0 + 1)."""
    import numpy as np

    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def coco_rle(mask) -> Dict[str, Any]:
    """A boolean mask as a JSON-ready COCO RLE (``counts`` as text)."""
    import numpy as np
    import pycocotools.mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
