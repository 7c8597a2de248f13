"""Reading image files of any common mode as 8-bit RGB.

Detectron2's ``read_image`` converts with PIL's ``convert("RGB")``, which clips
16-bit values to 255 (a white image) and drops alpha onto black. Here:

* grayscale, palette, CMYK, YCbCr -> RGB;
* 16-bit or 32-bit integer images -> scaled to 0..255 by their bit depth;
* float images -> values in [0, 1] scaled to 0..255, others clipped to 0..255;
* alpha (RGBA, LA, palette transparency) -> composited over white;
* EXIF orientation applied;
* multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) -> the first frame,
  with a logged warning naming the file and its frame count;
* images whose header declares more than ``max_pixels`` pixels (``MAX_PIXELS`` unless the caller
  passes another cap) -> :class:`ImageTooLargeError`, before any pixel is decoded: a small, highly
  compressed file can declare hundreds of megapixels and take gigabytes once decoded.
"""
from __future__ import annotations

import logging
import re
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
# The largest image read by default, in pixels (width x height). Decoding holds up to 8 bytes a pixel
# (16-bit RGBA) and the conversion to 8-bit RGB a few more copies, so this bounds a read to a few GB;
# it is above the photos of common cameras (a 48-megapixel one is 8000 x 6000) and below Pillow's own
# limits (a warning past Image.MAX_IMAGE_PIXELS, an error past twice that), so this cap is the one that decides.
MAX_PIXELS = 64_000_000
logger = logging.getLogger(__name__)


class ImageTooLargeError(ValueError):
    """An image file that declares more pixels than the reader accepts; refused before it is decoded."""


def _too_large(path: str, size: Optional[Tuple[int, int]], pixels: int, limit: int) -> ImageTooLargeError:
    declared = f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels"
    return ImageTooLargeError(
        f"The image {path} is too large: {declared}, over the limit of {limit:,} pixels. "
        "Shrink it (or crop it) below the limit and try again."
    )


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
        # 16-bit data (PIL opens 16-bit PNGs as "I;16" or "I"): keep the full range.
        return (arr.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    if mode == "F":
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return (arr.astype(np.float64) * scale).round().clip(0, 255).astype(np.uint8)
    return arr.clip(0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_uint8(np.asarray(img), img.mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, WHITE + (255,))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _frame_count(img: Image.Image) -> int:
    """How many frames an opened image file holds (1 for still formats), or 0 if they cannot be counted."""
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception:  # PIL walks every frame to count them and raises assorted errors at a damaged one
        return 0


def read_image_rgb(path: str, max_pixels: Optional[int] = MAX_PIXELS) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; of a multi-frame file, its first frame (with a warning).

    Args:
        max_pixels: the most pixels (width x height) accepted, checked from the file's header before
            anything is decoded; None: no cap of ours (Pillow's own, 2 x ``Image.MAX_IMAGE_PIXELS``, stays).

    Raises:
        ImageTooLargeError: (a ValueError) the header declares more than ``max_pixels`` pixels, or more
            than Pillow opens at all.
        ValueError: the file is not a readable image, or has no pixels.
    """
    try:
        with Image.open(path) as img:  # reads the header only: img.size is known, no pixel decoded yet
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise _too_large(path, img.size, width * height, max_pixels)
            img.load()
            rgb = pil_to_rgb(img)
            # Counted after the first frame is converted: counting seeks, and a damaged later
            # frame must not make a readable first frame an error.
            frames = _frame_count(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses in Image.open, before the size reaches us, past 2 x MAX_IMAGE_PIXELS (and past
        # 1 x where warnings are errors); its message carries the declared count, ours the advice.
        found = re.search(r"\((\d+) pixels\)", str(e))
        limit = Image.MAX_IMAGE_PIXELS * (2 if isinstance(e, Image.DecompressionBombError) else 1)
        limit = min(limit, max_pixels) if max_pixels is not None else limit
        raise _too_large(path, None, int(found.group(1)) if found else limit + 1, limit) from None
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some corrupt files
        raise ValueError(f"Could not read the image {path}: {e}") from e
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"The image {path} has no pixels.")
    if frames != 1:
        logger.warning(
            "%s has %s frames; only the first is read. To segment another, save that frame as its own file.",
            path, frames or "several (some damaged)",
        )
    return rgb


def shrink_to_long_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 resized (bilinear) so its long side is at most ``max_side``; unchanged if it is."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    logger.info("shrinking a %dx%d image to %dx%d (long side at most %d)", w, h, size[0], size[1], max_side)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
