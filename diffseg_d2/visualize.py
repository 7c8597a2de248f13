"""Pictures of label maps: an opaque label panel with class names, beside the image (tools/demo.py)."""

import textwrap
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .vocabulary import display_name

__all__ = ["MIN_OVERLAY_SIDE", "PALETTE", "label_colours", "name_positions", "render_overlay"]

# Overlays of smaller images are magnified so the class names fit.
MIN_OVERLAY_SIDE = 256
# Label colours, background first: none of them near the micro-world's red, green, blue and yellow
# objects (or skin and sky), so a region's colour is never read as the object's own. More classes
# take imgviz's colour map.
PALETTE = np.array([
    (40, 40, 40), (230, 60, 230), (70, 230, 230), (245, 245, 245), (150, 90, 210),
    (255, 170, 200), (110, 110, 0), (160, 160, 160), (90, 0, 60),
], dtype=np.uint8)


def label_colours(count: int) -> np.ndarray:
    """(count, 3) uint8 colours of labels 0..count-1 (:data:`PALETTE`, then imgviz's 256-colour map, cycled)."""
    import imgviz

    if count <= len(PALETTE):
        return PALETTE[:count]
    more = imgviz.label_colormap()[1:]  # its 0 is black
    return np.concatenate([PALETTE, more[np.arange(count - len(PALETTE)) % len(more)]])


def render_overlay(rgb: np.ndarray, label: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The image and, beside it, its labels in opaque colours with each region's class name on it.

    The labels are not blended into the image, whose own colours would mix with them. Under the
    two panels: each class present with its share of the pixels. Images with a side under
    :data:`MIN_OVERLAY_SIDE` are magnified by an integer factor (nearest neighbour) first.

    Args:
        rgb: (H, W, 3) uint8 image.
        label: (H, W) integer labels indexing ``names``.
        names: the class names (a class with synonyms is shown by its first).

    Returns:
        (H', W', 3) uint8.
    """
    import imgviz

    factor = max(1, -(-MIN_OVERLAY_SIDE // min(rgb.shape[:2])))
    if factor > 1:  # nearest neighbour: every pixel's label stays visible as it was predicted
        rgb, label = rgb.repeat(factor, 0).repeat(factor, 1), label.repeat(factor, 0).repeat(factor, 1)
    present = [int(i) for i in np.unique(label)]
    font = max(10, min(rgb.shape[:2]) // 16)
    # Names on regions of at least 1 % of the image (smaller ones are listed under the panels only).
    names = [display_name(n) for n in names]
    named = {i: names[i] for i in present if (label == i).mean() >= 0.01}
    colours = label_colours(len(names))
    labels = colours[label]
    for i, (y, x), colour in name_positions(label, named, font, colours):
        labels = imgviz.draw.text(labels, (y, x), named[i], size=font, color=colour)
    gap = np.full((rgb.shape[0], max(4, rgb.shape[1] // 32), 3), 255, dtype=np.uint8)
    panels = np.concatenate([rgb, gap, labels], axis=1)
    shares = ", ".join(f"{names[i]} {100.0 * (label == i).mean():.0f}%" for i in present)
    # Wrapped to the panels' width (the font is monospaced, about 0.6 em a character).
    lines = textwrap.wrap(shares, width=max(10, int(panels.shape[1] / (0.6 * font)) - 1))
    caption = np.full((font * (len(lines) + 1), panels.shape[1], 3), 255, dtype=np.uint8)
    for row, line in enumerate(lines):
        caption = imgviz.draw.text(caption, (font // 2 + row * font, 4), line, size=font, color=(0, 0, 0))
    return np.concatenate([panels, caption], axis=0)


def name_positions(label: np.ndarray, named: Dict[int, str], font: int,
                   colours: np.ndarray) -> List[Tuple[int, Tuple[int, int], Tuple[int, int, int]]]:
    """Where each region's name is written on the label panel: ``(label, (top, left), text colour)``.

    Largest region first, each name is centred on the point of its region farthest from the region's
    border, else on the next farthest points, at the first place where its box lies inside the panel
    and overlaps no name already placed; a name with no such place is left to the list under the
    panels. The text is black on a light region colour and white on a dark one.
    """
    import imgviz
    from scipy import ndimage

    H, W = label.shape
    step = max(1, max(H, W) // 256)  # distances on a grid of at most ~256 cells a side
    coarse = label[::step, ::step]
    placed: List[Tuple[int, int, int, int]] = []
    out = []
    for i in sorted(named, key=lambda k: -int((coarse == k).sum())):
        th, tw = imgviz.draw.text_size(named[i], size=font)
        if th > H or tw > W:
            continue
        dist = ndimage.distance_transform_edt(np.pad(coarse == i, 1))[1:-1, 1:-1]
        order = np.argsort(-dist, axis=None)[: int((dist > 0).sum())]
        for flat in order[:: max(1, len(order) // 64)]:  # up to ~64 candidates, farthest first
            cy, cx = (int(v) * step for v in np.unravel_index(flat, dist.shape))
            top = min(max(cy - th // 2, 0), H - th)
            left = min(max(cx - tw // 2, 0), W - tw)
            box = (top, left, top + th, left + tw)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                placed.append(box)
                luminance = float(np.dot(colours[i].astype(float), (0.299, 0.587, 0.114)))
                out.append((i, (top, left), (0, 0, 0) if luminance > 140 else (255, 255, 255)))
                break
    return out
