"""The micro-world: small procedural scenes of coloured shapes with exact masks and a caption.

A scene is a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image of 1 to 3 objects, each one of
:data:`SHAPES` in one of :data:`COLOURS`, on a textured low-saturation background, with
per-pixel masks and a caption such as ``"a red circle, a blue square and a green cross"``.
Everything is a function of the seed (:func:`render_scene`); splits are seed ranges
(:data:`SPLITS`, :func:`scene_seeds`).

How a scene is made (all sizes at 64 px; they scale with ``size``):

- Background: a grey-to-brown base (level 60..180, tint at most 14 per channel) plus one
  texture (per-pixel noise only, a linear gradient, faint triangle-wave stripes or smooth
  blotches) and per-pixel noise. Its saturation (max - min channel) stays below
  :data:`BACKGROUND_MAX_CHROMA`, so saturated colours only ever belong to objects.
- Objects: 1, 2 or 3 (probabilities 0.2, 0.4, 0.4) distinct (colour, shape) pairs. Each
  fits a square box of side 14..28 px placed anywhere inside the image; shapes are upright
  (no rotation): a disc, a filled square, an isosceles triangle with its apex up, a plus sign
  with arms a third of the box wide. Later objects are drawn over earlier ones; a placement
  that would leave an earlier object less than :data:`MIN_VISIBLE_FRACTION` of its own area
  visible is drawn again (up to 100 tries, then the object is left out).
- Colour: the named RGB of :data:`COLOUR_RGB`, shifted per object by up to 12 per channel,
  plus per-pixel noise that is mostly luminance (the same on all channels), so every object
  pixel is nearer its own named colour than any other and far more saturated than the
  background.
- Masks are rasterised exactly with numpy (a pixel belongs to a shape when its centre does;
  no antialiasing), and the image is filled through the same masks, so image and labels
  agree per pixel. Only numpy's ``Generator`` (PCG64) and elementwise arithmetic are used,
  no trigonometry and no drawing library (whose rasterisation changes between versions), so
  the output is identical across runs and machines (a test pins digests of a few scenes).
- Caption order: objects left to right by the x of their visible centroid (ties: by y,
  then by drawing order); ``objects`` and the instance ids follow the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "COLOUR_SHAPE_CLASSES",
    "IMAGE_SIZE",
    "SPLITS",
    "MIN_VISIBLE_FRACTION",
    "BACKGROUND_MAX_CHROMA",
    "OBJECT_MIN_CHROMA",
    "SceneObject",
    "Scene",
    "render_scene",
    "scene_seeds",
    "caption_of",
]

#: Shape words, in label order (shape label ``1 + SHAPES.index(shape)``).
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Colour words, in label order.
COLOURS: Tuple[str, ...] = ("red", "green", "blue", "yellow")
#: The named RGB of each colour (uint8 values), before per-object and per-pixel variation.
COLOUR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 200, 45),
}
#: ``"<colour> <shape>"`` names in colour-shape label order (label ``1 + index``).
COLOUR_SHAPE_CLASSES: Tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
#: Side of a scene in pixels.
IMAGE_SIZE = 64
#: Seed range ``[start, stop)`` of each split; the ranges are disjoint.
SPLITS: Dict[str, Tuple[int, int]] = {
    "train": (0, 1_000_000),
    "val": (1_000_000, 1_000_500),
    "test": (2_000_000, 2_000_500),
}
#: Every object keeps at least this fraction of its own area visible after occlusion.
MIN_VISIBLE_FRACTION = 0.4
#: Background pixels have ``max(rgb) - min(rgb) <= BACKGROUND_MAX_CHROMA``.
BACKGROUND_MAX_CHROMA = 40
#: Object pixels have ``max(rgb) - min(rgb) >= OBJECT_MIN_CHROMA``.
OBJECT_MIN_CHROMA = 80

# Object box side range at 64 px, and how many objects a scene holds with what probability.
_OBJECT_SIDE = (14, 28)
_OBJECT_COUNTS = (1, 2, 3)
_OBJECT_COUNT_P = (0.2, 0.4, 0.4)
_PLACEMENT_TRIES = 100
_COLOUR_JITTER = 12  # per object, per channel, uniform in [-12, 12]
_OBJECT_LUMA_NOISE = (7.0, 18.0)  # per pixel: std, clip
_OBJECT_CHROMA_NOISE = (3.0, 6.0)  # per pixel and channel: std, clip
_BACKGROUND_TINT_MAX = 14.0
_BACKGROUND_CHROMA_NOISE = (2.0, 5.0)


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        mask: (H, W) bool, the pixels where the object is VISIBLE (after occlusion).
        bbox: ``(x0, y0, x1, y1)`` of ``mask`` in pixels, ends exclusive.
    """

    shape: str
    colour: str
    mask: np.ndarray
    bbox: Tuple[int, int, int, int]

    @property
    def name(self) -> str:
        """``"<colour> <shape>"``, e.g. ``"red circle"`` (a name of :data:`COLOUR_SHAPE_CLASSES`)."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene (see the module docstring). Treat the arrays as read-only.

    Attributes:
        seed: the seed it was rendered from.
        image: (H, W, 3) uint8 RGB.
        objects: 1..3 objects in caption order (left to right).
        caption: e.g. ``"a red circle and a blue square"``.
    """

    seed: int
    image: np.ndarray
    objects: Tuple[SceneObject, ...]
    caption: str

    def shape_label(self) -> np.ndarray:
        """(H, W) uint8: 0 = background, ``1 + SHAPES.index(shape)`` on each object."""
        label = np.zeros(self.image.shape[:2], dtype=np.uint8)
        for obj in self.objects:
            label[obj.mask] = 1 + SHAPES.index(obj.shape)
        return label

    def colour_shape_label(self) -> np.ndarray:
        """(H, W) uint8: 0 = background, ``1 + COLOURS.index(c) * len(SHAPES) + SHAPES.index(s)``."""
        label = np.zeros(self.image.shape[:2], dtype=np.uint8)
        for obj in self.objects:
            label[obj.mask] = 1 + COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
        return label

    def instance_label(self) -> np.ndarray:
        """(H, W) int32: 0 = no object, ``i + 1`` on ``objects[i]``."""
        label = np.zeros(self.image.shape[:2], dtype=np.int32)
        for i, obj in enumerate(self.objects):
            label[obj.mask] = i + 1
        return label

    def word_masks(self) -> Dict[str, np.ndarray]:
        """Each caption word that names an object -> (H, W) bool mask of the object(s) it names.

        Both the colour word and the shape word of an object map to its mask; a word shared by
        several objects (two red objects, two circles) maps to the union of their masks.
        """
        return self.mentions([True] * len(self.objects))[1]

    def mentions(self, keep_colour: Sequence[bool],
                 named: Optional[Sequence[bool]] = None) -> Tuple[str, Dict[str, np.ndarray]]:
        """A caption that names some objects, some by shape alone, and its word masks.

        Args:
            keep_colour: per object (caption order), whether its colour word is said:
                ``[True, False]`` gives ``"a red circle and a square"``.
            named: per object, whether the caption names it at all (None: every object;
                at least one must be).

        Returns:
            ``(caption, word masks)``: for each word said, the union of the masks of every
            object it fits (mentioned or not), as :meth:`word_masks`.
        """
        named = [True] * len(self.objects) if named is None else list(named)
        if len(keep_colour) != len(self.objects) or len(named) != len(self.objects):
            raise ValueError(f"keep_colour has {len(keep_colour)} and named {len(named)} entries for "
                             f"{len(self.objects)} objects")
        names, out = [], {}
        for obj, keep, said in zip(self.objects, keep_colour, named):
            if not said:
                continue
            words = (obj.colour, obj.shape) if keep else (obj.shape,)
            names.append(" ".join(words))
            for word in words:
                if word not in out:  # a said word names every object it fits, named or not
                    out[word] = np.logical_or.reduce([o.mask for o in self.objects if word in (o.colour, o.shape)])
        return caption_of(names), out


def caption_of(names: Sequence[str]) -> str:
    """Join ``"<colour> <shape>"`` names into a caption.

    Args:
        names: e.g. ``["red circle", "blue square", "green cross"]`` (at least one).

    Returns:
        ``"a red circle"``, ``"a red circle and a blue square"``,
        ``"a red circle, a blue square and a green cross"``.
    """
    parts = [f"a {n}" for n in names]
    if not parts:
        raise ValueError("a caption needs at least one object")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_seeds(split: str, count: Optional[int] = None) -> range:
    """The seeds of a split: the first ``count`` of its range (all of it when None).

    Raises:
        KeyError: ``split`` is not in :data:`SPLITS`.
        ValueError: ``count`` is negative or larger than the split.
    """
    if split not in SPLITS:
        raise KeyError(f"Unknown micro-world split {split!r}; splits: {list(SPLITS)}")
    start, stop = SPLITS[split]
    if count is None:
        return range(start, stop)
    if not 0 <= count <= stop - start:
        raise ValueError(f"split {split!r} has {stop - start} scenes; asked for {count}")
    return range(start, start + count)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def _clipped_normal(rng: np.random.Generator, std: float, clip: float, shape) -> np.ndarray:
    return np.clip(rng.normal(0.0, std, shape), -clip, clip)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float64 RGB of low saturation (see the module docstring)."""
    scale = size / IMAGE_SIZE
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    level = rng.uniform(60.0, 180.0)
    tint = rng.uniform(0.0, _BACKGROUND_TINT_MAX)  # brownish: more red, less blue
    kind = int(rng.integers(4))
    if kind == 0:  # noise only (stronger)
        luma = _clipped_normal(rng, 10.0, 25.0, (size, size))
    elif kind == 1:  # linear gradient along a random direction
        d = rng.uniform(-1.0, 1.0, 2)
        d = d / max(float(np.sqrt(d @ d)), 1e-6)
        amp = rng.uniform(15.0, 45.0)
        luma = amp * ((xs * d[0] + ys * d[1]) / (size * 1.5))
    elif kind == 2:  # faint stripes: triangle wave, horizontal/vertical/diagonal
        period = rng.uniform(6.0, 16.0) * scale
        direction = int(rng.integers(4))
        coord = (ys, xs, xs + ys, xs - ys)[direction]
        amp = rng.uniform(10.0, 25.0)
        luma = amp * (np.abs((coord / period) % 1.0 - 0.5) * 2.0 - 0.5)
    else:  # smooth blotches: bilinear upsampling of a coarse noise grid
        cells = int(rng.integers(3, 7))
        grid = rng.normal(0.0, 1.0, (cells + 1, cells + 1))
        gy, gx = ys / size * cells, xs / size * cells
        iy, ix = np.minimum(gy.astype(int), cells - 1), np.minimum(gx.astype(int), cells - 1)
        fy, fx = gy - iy, gx - ix
        smooth = (
            grid[iy, ix] * (1 - fy) * (1 - fx)
            + grid[iy, ix + 1] * (1 - fy) * fx
            + grid[iy + 1, ix] * fy * (1 - fx)
            + grid[iy + 1, ix + 1] * fy * fx
        )
        luma = rng.uniform(12.0, 22.0) * np.clip(smooth, -1.5, 1.5)
    luma = luma + _clipped_normal(rng, 5.0, 12.0, (size, size))
    base = np.array([level + tint, level, level - tint])
    return base + luma[..., None] + _clipped_normal(rng, *_BACKGROUND_CHROMA_NOISE, (size, size, 3))


def _shape_mask(shape: str, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies in ``shape`` drawn in the box at (x0, y0)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    inside_box = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
    if shape == "square":
        return inside_box
    cx, cy = x0 + side / 2.0, y0 + side / 2.0
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (side / 2.0) ** 2
    if shape == "triangle":  # apex at the top centre, base along the bottom of the box
        return inside_box & (2.0 * np.abs(xs - cx) <= ys - y0)
    if shape == "cross":
        arm = max(3, int(round(side / 3.0)))
        lo = (side - arm) // 2
        band_x = (xs >= x0 + lo) & (xs < x0 + lo + arm)
        band_y = (ys >= y0 + lo) & (ys < y0 + lo + arm)
        return inside_box & (band_x | band_y)
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")


def _bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _place_objects(
    rng: np.random.Generator, pairs: Sequence[Tuple[str, str]], size: int
) -> List[Tuple[str, str, np.ndarray]]:
    """Draw order placement: ``[(colour, shape, full mask)]`` keeping the visibility floor."""
    lo = max(4, int(round(_OBJECT_SIDE[0] * size / IMAGE_SIZE)))
    hi = max(lo, int(round(_OBJECT_SIDE[1] * size / IMAGE_SIZE)))
    placed: List[Tuple[str, str, np.ndarray]] = []
    covered = np.zeros((size, size), dtype=bool)  # union of the masks placed so far
    for colour, shape in pairs:
        for _ in range(_PLACEMENT_TRIES):
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            mask = _shape_mask(shape, x0, y0, side, size)
            if covered.any() and not _keeps_visible(placed, mask):
                continue
            placed.append((colour, shape, mask))
            covered |= mask
            break
    return placed


def _keeps_visible(placed: Sequence[Tuple[str, str, np.ndarray]], new: np.ndarray) -> bool:
    """Whether every placed object keeps the visibility floor once ``new`` is drawn on top."""
    for i, (_, _, full) in enumerate(placed):
        visible = full & ~new
        for _, _, later in placed[i + 1 :]:
            visible &= ~later
        if visible.sum() < MIN_VISIBLE_FRACTION * full.sum():
            return False
    return True


def render_scene(seed: int, size: int = IMAGE_SIZE) -> Scene:
    """Render the scene of ``seed`` (deterministic; see the module docstring).

    Args:
        seed: any non-negative int; :data:`SPLITS` says which seeds belong to which split.
        size: side in pixels (object sizes and textures scale with it); at least 16.

    Returns:
        The :class:`Scene`: image (size, size, 3) uint8 RGB, 1..3 objects in caption order
        (left to right) with their visible masks, and the caption.
    """
    if size < 16:
        raise ValueError(f"scene size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    canvas = _background(rng, size)
    count = int(rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_P))
    pair_ids = rng.permutation(len(COLOURS) * len(SHAPES))[:count]
    pairs = [(COLOURS[int(p) // len(SHAPES)], SHAPES[int(p) % len(SHAPES)]) for p in pair_ids]

    placed = _place_objects(rng, pairs, size)
    visible = []
    for i, (colour, shape, full) in enumerate(placed):
        mask = full.copy()
        for _, _, later in placed[i + 1 :]:
            mask &= ~later
        visible.append(mask)
        # Fill the FULL mask: later objects overwrite it where they cover it.
        rgb = np.asarray(COLOUR_RGB[colour], dtype=np.float64)
        rgb = rgb + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        pixels = (
            rgb
            + _clipped_normal(rng, *_OBJECT_LUMA_NOISE, (size, size))[..., None]
            + _clipped_normal(rng, *_OBJECT_CHROMA_NOISE, (size, size, 3))
        )
        canvas[full] = pixels[full]
    image = np.rint(np.clip(canvas, 0.0, 255.0)).astype(np.uint8)

    objects = [
        SceneObject(shape=shape, colour=colour, mask=mask, bbox=_bbox(mask))
        for (colour, shape, _), mask in zip(placed, visible)
    ]
    order = sorted(
        range(len(objects)),
        key=lambda i: (
            float(np.nonzero(visible[i])[1].mean()),
            float(np.nonzero(visible[i])[0].mean()),
            i,
        ),
    )
    ordered = tuple(objects[i] for i in order)
    return Scene(
        seed=int(seed), image=image, objects=ordered, caption=caption_of([o.name for o in ordered])
    )
