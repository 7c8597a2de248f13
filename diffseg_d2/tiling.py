"""Sliding windows over an image: where they start, for ODISE's backbone and FreeDA's segmenter.

Windows are placed every ``stride`` pixels and the last one is flush with the border,
so every pixel is covered and no window leaves the image (mmseg's sliding inference,
FreeDA's reference; ODISE's reference tiles the same way).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start offsets of ``window``-pixel windows every ``stride`` pixels covering ``length`` pixels."""
    if window > length:
        raise ValueError(f"a window of {window} pixels does not fit in {length}: crop the window to the image first")
    if stride < 1:
        raise ValueError(f"the window stride must be at least 1 pixel, got {stride}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def window_shape(height: int, width: int, window: int) -> Tuple[int, int]:
    """The crop of a sliding ``window`` over a ``height`` x ``width`` image: ``window`` along each
    side, or the whole side where it is shorter."""
    return min(window, height), min(window, width)


def sliding_windows(height: int, width: int, window: Union[int, Sequence[int]], stride: int) -> List[Tuple[int, int]]:
    """Top-left corners ``(y, x)`` of ``window`` crops covering an image, the last ones flush with
    the bottom/right border. ``window`` is a side or ``(window_height, window_width)``; it must not
    exceed the image's sides (see :func:`window_shape`)."""
    wh, ww = (window, window) if isinstance(window, int) else window
    return [(y, x) for y in window_starts(height, wh, stride) for x in window_starts(width, ww, stride)]
