#!/usr/bin/env python
"""Segment images with any vocabulary and write an overlay (with legend) and a label PNG per image.

    python tools/demo.py --config-file configs/tiny/diffsegmenter.yaml \
        --input photo.jpg images/ "shots/*.png" --vocab "person,chair,bottle" --output output/demo

Without --input the bundled sample image (a Pascal VOC photo) is segmented.
A "background" class is added in front of the vocabulary unless it names one
already or --no-background is given. Large images are first shrunk to
--max-side pixels on their long side (the model sees IMAGE_SIZE anyway; this
keeps the full-size score maps in memory bounds).
"""
import argparse
import glob
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.data.datasets.register_sample import sample_image_path
from diffseg_d2.data.image import read_image_rgb
from diffseg_d2.paths import write_atomically
from diffseg_d2.vocabulary import BACKGROUND, background_index, parse_vocabulary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
logger = logging.getLogger("diffseg_d2.demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="diffseg_d2 demo: open-vocabulary segmentation of images")
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--input", nargs="+", help="images, folders or glob patterns (default: the bundled sample image)")
    p.add_argument("--vocab", required=True, help="comma-separated class names, e.g. 'person,dog,car'")
    p.add_argument("--output", required=True, help="folder for <name>_overlay.png and <name>_label.png")
    p.add_argument("--no-background", action="store_true", help="do not add a 'background' class")
    p.add_argument("--max-side", type=int, default=2048, help="shrink larger images to this long side first")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def collect_inputs(patterns):
    """Expand files, folders and globs into a sorted, de-duplicated list of image files."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [os.path.join(pattern, f) for f in sorted(os.listdir(pattern))]
            found = [f for f in found if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
        if not found:
            raise SystemExit(f"--input {pattern!r} matches no image file.")
        files.extend(found)
    return list(dict.fromkeys(files))


def output_stems(files):
    """Unique output names: the file stem, with a counter where two inputs share one."""
    stems, used = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        n = used.get(stem, 0)
        used[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def shrink(rgb, max_side):
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    logger.info("shrinking a %dx%d image to %dx%d (--max-side %d)", w, h, size[0], size[1], max_side)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


# Overlays of smaller images (micro-world scenes are 64x64) are magnified so the legend fits.
MIN_OVERLAY_SIDE = 256


def render_overlay(rgb, label, names):
    import imgviz

    factor = max(1, -(-MIN_OVERLAY_SIDE // min(rgb.shape[:2])))
    if factor > 1:  # nearest neighbour: every pixel's label stays visible as it was predicted
        rgb, label = rgb.repeat(factor, 0).repeat(factor, 1), label.repeat(factor, 0).repeat(factor, 1)
    present = {int(i): names[int(i)] for i in np.unique(label)}
    return imgviz.label2rgb(label, image=rgb, label_names=present, font_size=max(12, min(rgb.shape[:2]) // 25), loc="rb")


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="diffseg_d2")
    setup_logger(name="diffseg_d2.demo")
    # Everything that can be wrong with the request is checked before a model is loaded or a file written.
    names = parse_vocabulary(args.vocab)
    if not args.no_background and background_index(names) is None:
        names = [BACKGROUND] + names
    files = collect_inputs(args.input) if args.input else [sample_image_path()]
    cfg = get_diffseg_cfg(args.config_file, args.opts)
    cfg.MODEL.DIFFSEG.VOCABULARY = names
    cfg.DATASETS.TEST = ()
    predictor = DefaultPredictor(cfg)  # checks the vocabulary against the tokenizer

    os.makedirs(args.output, exist_ok=True)
    written, skipped = [], []
    for path, stem in tqdm(list(zip(files, output_stems(files))), desc="segmenting", unit="image"):
        try:
            rgb = shrink(read_image_rgb(path), args.max_side)
        except ValueError as e:  # one unreadable file does not stop a folder run
            logger.warning("skipping: %s", e)
            skipped.append(path)
            continue
        with torch.no_grad():
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # DefaultPredictor takes BGR like cv2.imread
            scores = predictor(bgr)["sem_seg"]
        label = scores.argmax(dim=0).cpu().numpy()
        label_png = label.astype(np.uint8 if len(names) <= 256 else np.uint16)
        overlay_path = os.path.join(args.output, f"{stem}_overlay.png")
        label_path = os.path.join(args.output, f"{stem}_label.png")
        for out_path, array in ((overlay_path, render_overlay(rgb, label, names)), (label_path, label_png)):
            write_atomically(Path(out_path), lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
        written += [overlay_path, label_path]
    logger.info("wrote %d files to %s (label PNG values index the vocabulary: %s)", len(written), args.output, names)
    if skipped:
        logger.warning("%d unreadable input(s) skipped: %s", len(skipped), skipped)
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
