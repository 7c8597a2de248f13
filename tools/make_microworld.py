#!/usr/bin/env python
"""Write micro-world splits to the cache, and optionally a contact sheet of a few scenes.

    python tools/make_microworld.py                                   # val and test, 500 scenes each
    python tools/make_microworld.py --splits train val --count 200
    python tools/make_microworld.py --splits --contact-sheet output/microworld.png --sheet-scenes 8

Files go to ``$DIFFSEG_D2_CACHE/microworld/<split>/`` (see diffseg_d2/data/datasets/register_microworld.py);
the datasets ``diffseg_microworld_*`` write the same files on first use, so running this is
only needed to prepare them ahead of time or to look at scenes. The contact sheet shows, per
scene, the image, the shape label and the instance label (scaled up), and the caption.
"""

import argparse
import glob
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

_CAPTION_HEIGHT = 14


def contact_sheet(seeds: Sequence[int], scale: int = 3) -> Image.Image:
    """One row per scene: image | shape label | instance label, each ``scale`` times larger, then the caption.

    Returns:
        An RGB image of width ``3 * 64 * scale + 4 * 4`` and height
        ``len(seeds) * (64 * scale + 14 + 4) + 4``.
    """
    from diffseg_d2.microworld.scenes import IMAGE_SIZE, render_scene
    from diffseg_d2.visualize import label_colours

    palette = label_colours(8)

    side, gap = IMAGE_SIZE * scale, 4
    width = 3 * side + 4 * gap
    row = side + _CAPTION_HEIGHT + gap
    sheet = Image.new("RGB", (width, len(seeds) * row + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, seed in enumerate(seeds):
        scene = render_scene(seed)
        panels = (
            scene.image,
            palette[scene.shape_label()],
            palette[np.minimum(scene.instance_label(), len(palette) - 1)],
        )
        top = gap + r * row
        for c, panel in enumerate(panels):
            big = np.kron(panel, np.ones((scale, scale, 1), dtype=np.uint8))
            sheet.paste(Image.fromarray(big), (gap + c * (side + gap), top))
        draw.text((gap, top + side + 1), f"{seed}: {scene.caption}", fill=(0, 0, 0))
    return sheet


def describe_labels(folder: str, names: Sequence[str]) -> List[str]:
    """What a demo run labelled each object of the exported scenes: one line per object.

    Reads ``<seed>_label.png`` (values index ``names``) from ``folder``, renders scene ``seed``
    again, magnifies its masks to the label's size and counts the labels under each object and
    under the background. Every sentence about the demo's pictures is checked against these.
    """
    from diffseg_d2.microworld.scenes import render_scene

    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "*_label.png"))):
        stem = os.path.basename(path)[: -len("_label.png")]
        if not stem.isdigit():
            continue
        label = np.asarray(Image.open(path))
        scene = render_scene(int(stem))
        factor = label.shape[0] // scene.image.shape[0]
        if factor < 1 or label.shape != (scene.image.shape[0] * factor, scene.image.shape[1] * factor):
            raise SystemExit(f"{path}: a {label.shape} label does not match scene {stem} scaled by a whole factor")
        regions = [(obj.name, obj.mask) for obj in scene.objects]
        regions.append(("background", scene.instance_label() == 0))
        lines.append(f"{stem}: {scene.caption}")
        for name, mask in regions:
            under = label[mask.repeat(factor, 0).repeat(factor, 1)]
            counts = np.bincount(under.ravel(), minlength=len(names))
            order = np.argsort(-counts)
            shares = ", ".join(f"{100.0 * counts[i] / under.size:.0f}% {names[i]}" for i in order[:3] if counts[i])
            lines.append(f"  {name}: {shares}")
    if not lines:
        raise SystemExit(f"no <seed>_label.png of micro-world scenes in {folder}")
    return lines


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Run the tool; returns the folders (and sheet) written, as printed."""
    from diffseg_d2.microworld.scenes import SPLITS, render_scene, scene_seeds

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--splits",
        nargs="*",
        default=["val", "test"],
        choices=sorted(SPLITS),
        help="splits to write (none: only the contact sheet)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=None,
        help="scenes per split (default: $DIFFSEG_D2_MICROWORLD_COUNT or train 2000, val/test 500)",
    )
    p.add_argument("--contact-sheet", default=None, help="write a PNG contact sheet of scenes here")
    p.add_argument(
        "--sheet-split",
        default="val",
        choices=sorted(SPLITS),
        help="split the sheet's scenes come from",
    )
    p.add_argument("--sheet-scenes", type=int, default=8, help="number of scenes on the sheet")
    p.add_argument("--scale", type=int, default=3, help="magnification of the sheet's panels")
    p.add_argument("--export-scenes", metavar="DIR", default=None,
                   help="also write the first --sheet-scenes scenes of --sheet-split as <seed>.png into DIR "
                        "(inputs for tools/demo.py)")
    p.add_argument("--export-scale", type=int, default=1,
                   help="magnify the exported scenes by this whole factor (nearest neighbour; a model resizing "
                        "to 64 px without antialias gets the scene back exactly)")
    p.add_argument("--describe", metavar="DIR", default=None,
                   help="print what tools/demo.py labelled each object of exported scenes (<seed>_label.png "
                        "in DIR), with --vocab")
    p.add_argument("--vocab", default="background,circle,square,triangle,cross",
                   help="the label PNGs' classes, in order (for --describe)")
    p.add_argument("--captions", metavar="FILE", default=None,
                   help="also write the captions of the first --count train scenes here, one per line "
                        "(input of tools/build_freeda_bank.py)")
    args = p.parse_args(argv)

    from diffseg_d2.data.datasets.register_microworld import materialize_split, split_count
    from diffseg_d2.microworld.train_state import write_text

    written = []
    sheet_seeds = scene_seeds(args.sheet_split, args.sheet_scenes) if args.contact_sheet or args.export_scenes else ()
    for split in args.splits:
        files = materialize_split(split, args.count)
        print(f"{split}: {files.count} scenes in {files.folder}")
        written.append(str(files.folder))
    if args.contact_sheet:
        out = os.path.abspath(args.contact_sheet)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        contact_sheet(sheet_seeds, args.scale).save(out)
        print(f"contact sheet of {len(sheet_seeds)} {args.sheet_split} scenes: {out}")
        written.append(out)
    if args.export_scenes:
        os.makedirs(args.export_scenes, exist_ok=True)
        for seed in sheet_seeds:
            image = render_scene(seed).image.repeat(args.export_scale, 0).repeat(args.export_scale, 1)
            Image.fromarray(image).save(os.path.join(args.export_scenes, f"{seed}.png"))
        print(f"{len(sheet_seeds)} {args.sheet_split} scenes as PNG: {os.path.abspath(args.export_scenes)}")
        written.append(os.path.abspath(args.export_scenes))
    if args.captions:
        seeds = scene_seeds("train", args.count if args.count is not None else split_count("train"))
        os.makedirs(os.path.dirname(os.path.abspath(args.captions)), exist_ok=True)
        write_text(args.captions, "".join(render_scene(seed).caption + "\n" for seed in seeds))
        print(f"{len(seeds)} train captions: {os.path.abspath(args.captions)}")
        written.append(os.path.abspath(args.captions))
    if args.describe:
        for line in describe_labels(args.describe, [n.strip() for n in args.vocab.split(",")]):
            print(line)
    return written


if __name__ == "__main__":
    main()
