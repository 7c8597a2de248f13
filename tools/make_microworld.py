#!/usr/bin/env python
"""Write micro-world splits to the cache, and optionally a contact sheet of a few scenes.

    python tools/make_microworld.py                                   # val and test, 500 scenes each
    python tools/make_microworld.py --splits train val --count 200
    python tools/make_microworld.py --splits --contact-sheet output/microworld.png --sheet-scenes 8

Files go to ``$DIFFSEG_D2_CACHE/microworld/<split>/`` (see diffseg_d2/microworld/datasets.py);
the datasets ``diffseg_microworld_*`` write the same files on first use, so running this is
only needed to prepare them ahead of time or to look at scenes. The contact sheet shows, per
scene, the image, the shape label and the instance label (scaled up), and the caption.
"""

import argparse
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Label colours: index 0 (background) is dark grey, then distinct colours.
_PALETTE = np.array(
    [
        (40, 40, 40),
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 190),
        (0, 128, 128),
        (230, 190, 255),
        (170, 110, 40),
        (255, 250, 200),
        (128, 0, 0),
        (170, 255, 195),
    ],
    dtype=np.uint8,
)
_CAPTION_HEIGHT = 14


def contact_sheet(seeds: Sequence[int], scale: int = 3) -> Image.Image:
    """One row per scene: image | shape label | instance label, each ``scale`` times larger, then the caption.

    Returns:
        An RGB image of width ``3 * 64 * scale + 4 * 4`` and height
        ``len(seeds) * (64 * scale + 14 + 4) + 4``.
    """
    from diffseg_d2.microworld.scenes import IMAGE_SIZE, render_scene

    side, gap = IMAGE_SIZE * scale, 4
    width = 3 * side + 4 * gap
    row = side + _CAPTION_HEIGHT + gap
    sheet = Image.new("RGB", (width, len(seeds) * row + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, seed in enumerate(seeds):
        scene = render_scene(seed)
        panels = (
            scene.image,
            _PALETTE[scene.shape_label()],
            _PALETTE[np.minimum(scene.instance_label(), len(_PALETTE) - 1)],
        )
        top = gap + r * row
        for c, panel in enumerate(panels):
            big = np.kron(panel, np.ones((scale, scale, 1), dtype=np.uint8))
            sheet.paste(Image.fromarray(big), (gap + c * (side + gap), top))
        draw.text((gap, top + side + 1), f"{seed}: {scene.caption}", fill=(0, 0, 0))
    return sheet


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
    p.add_argument("--captions", metavar="FILE", default=None,
                   help="also write the captions of the first --count train scenes here, one per line "
                        "(input of tools/build_freeda_bank.py)")
    args = p.parse_args(argv)

    from diffseg_d2.microworld.datasets import materialize_split, split_count
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
            Image.fromarray(render_scene(seed).image).save(os.path.join(args.export_scenes, f"{seed}.png"))
        print(f"{len(sheet_seeds)} {args.sheet_split} scenes as PNG: {os.path.abspath(args.export_scenes)}")
        written.append(os.path.abspath(args.export_scenes))
    if args.captions:
        seeds = scene_seeds("train", args.count if args.count is not None else split_count("train"))
        os.makedirs(os.path.dirname(os.path.abspath(args.captions)), exist_ok=True)
        write_text(args.captions, "".join(render_scene(seed).caption + "\n" for seed in seeds))
        print(f"{len(seeds)} train captions: {os.path.abspath(args.captions)}")
        written.append(os.path.abspath(args.captions))
    return written


if __name__ == "__main__":
    main()
