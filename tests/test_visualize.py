"""The demo's picture of a label map (diffseg_d2.visualize) and what make_microworld.py says about it."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diffseg_d2.microworld.scenes import COLOUR_RGB, render_scene
from diffseg_d2.visualize import PALETTE, label_colours, render_overlay

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_label_colours_are_far_from_the_micro_worlds_object_colours():
    objects = np.array(list(COLOUR_RGB.values()), dtype=float)
    distance = np.linalg.norm(PALETTE[:, None].astype(float) - objects[None], axis=-1)
    assert distance.min() > 100
    assert len({tuple(c) for c in label_colours(40)}) == 40  # enough distinct colours past the palette


def test_the_overlay_shows_the_image_and_opaque_labels_with_names():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :, 0] = 205  # a red image: the label panel must not be tinted by it
    label = np.zeros((64, 64), np.int64)
    label[8:40, 8:40] = 2
    out = render_overlay(rgb, label, ["background", "circle", "square"])
    # Magnified 4x to 256 px: the image on the left, pixel for pixel.
    np.testing.assert_array_equal(out[:256:4, :256:4], rgb)
    right = out[:256, out.shape[1] - 256:]
    # Away from the names (drawn at region centroids) each region is its opaque palette colour.
    np.testing.assert_array_equal(right[250, 250], PALETTE[0])
    np.testing.assert_array_equal(right[36, 36], PALETTE[2])
    # The square's name is written on it: some pixels inside the square differ from its colour.
    square = right[32:160, 32:160].reshape(-1, 3)
    assert (square != PALETTE[2]).any(axis=1).sum() > 20
    # Under the panels: the classes with their shares (text drawn, so some dark pixels).
    assert (out[256:] < 100).any()


def test_describe_counts_labels_under_each_object(tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import make_microworld
    finally:
        sys.path.remove(str(REPO_ROOT / "tools"))
    scene = render_scene(1_000_000)
    perfect = scene.shape_label().repeat(4, 0).repeat(4, 1)
    Image.fromarray(perfect).save(tmp_path / "1000000_label.png")
    wrong = np.zeros_like(perfect)  # all background
    Image.fromarray(wrong).save(tmp_path / "1000001_label.png")
    lines = make_microworld.describe_labels(str(tmp_path), ["background", "circle", "square", "triangle", "cross"])
    assert lines[0] == f"1000000: {scene.caption}"
    for obj, line in zip(scene.objects, lines[1:]):
        assert line == f"  {obj.name}: 100% {obj.shape}"
    assert lines[1 + len(scene.objects)] == "  background: 100% background"
    assert lines[2 + len(scene.objects)] == f"1000001: {render_scene(1_000_001).caption}"
    assert all(line.endswith("100% background") for line in lines[3 + len(scene.objects):])


def test_region_names_stay_inside_the_panel_never_overlap_and_contrast_with_their_colour():
    from diffseg_d2.visualize import PALETTE, name_positions

    import imgviz

    label = np.zeros((120, 200), np.int64)
    label[40:80, 60:140] = 1          # a ring's inside ...
    label[30:90, 50:150][label[30:90, 50:150] == 0] = 2  # ... and the ring: both centred on one point
    label[:, 190:] = 3                # a strip along the right edge
    names = {0: "background", 1: "circle", 2: "square", 3: "cross"}
    font = 12
    placed = name_positions(label, names, font, PALETTE[:4])
    boxes = []
    for i, (top, left), colour in placed:
        th, tw = imgviz.draw.text_size(names[i], size=font)
        assert 0 <= top and top + th <= 120 and 0 <= left and left + tw <= 200  # never cut at the edge
        boxes.append((top, left, top + th, left + tw))
        dark = np.dot(PALETTE[i].astype(float), (0.299, 0.587, 0.114)) <= 140
        assert colour == ((255, 255, 255) if dark else (0, 0, 0))
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            A, B = boxes[a], boxes[b]
            assert A[2] <= B[0] or B[2] <= A[0] or A[3] <= B[1] or B[3] <= A[1], (placed[a], placed[b])
    assert {i for i, *_ in placed} >= {0, 1, 2}  # the ring and its inside both named
    # background (dark grey) gets white text
    assert dict((i, c) for i, _, c in placed)[0] == (255, 255, 255)
