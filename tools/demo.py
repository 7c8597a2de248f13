#!/usr/bin/env python
"""Segment images with any vocabulary and write an overlay (with legend) and a label PNG per image.

    python tools/demo.py --config-file configs/tiny/diffsegmenter.yaml \
        --input photo.jpg images/ "shots/*.png" --vocab "person,chair,bottle" --output output/demo

Without --input the bundled sample image (a Pascal VOC photo) is segmented.
A "background" class is added in front of the vocabulary unless it names one
already or --no-background is given. Large images are first shrunk to
--max-side pixels on their long side (the model sees IMAGE_SIZE anyway; this
keeps the full-size score maps in memory bounds); their label PNG is upsampled
back to the input's size, the overlay keeps the shrunk size.

Exit status 0 means every input was segmented and written. A wrong request (a bad
vocabulary, an input matching no file) ends with a one-line message before the
model is loaded; an input that could not be read or gave non-finite scores is
reported, nothing is written for it, the others are, and the exit status is 1.
"""
import argparse
import glob
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import diffseg_d2  # noqa: F401, I001  (first: it silences fvcore's torch.jit deprecation warning)
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.data.datasets.register_sample import sample_image_path
from diffseg_d2.data.image import read_image_rgb, shrink_to_long_side
from diffseg_d2.numerics import NonFiniteError
from diffseg_d2.paths import write_atomically
from diffseg_d2.pretrained.weights import MissingWeightsError
from diffseg_d2.visualize import render_overlay
from diffseg_d2.vocabulary import BACKGROUND, VocabularyError, background_index, vocabulary_from_command_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
logger = logging.getLogger("diffseg_d2.demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="diffseg_d2 demo: open-vocabulary segmentation of images")
    p.add_argument("--config-file", required=True, metavar="FILE",
                   help="the method and its weights, e.g. configs/micro/diffsegmenter.yaml (offline), "
                        "configs/diffsegmenter/voc21.yaml (SD 1.5 from the hub)")
    p.add_argument("--input", nargs="+", help="images, folders or glob patterns (default: the bundled sample image)")
    p.add_argument("--vocab", required=True,
                   help="class names separated by commas, synonyms of one class by semicolons "
                        "(e.g. 'person,sofa;couch,dog'), or @FILE with one class per line (commas = synonyms)")
    p.add_argument("--output", required=True, help="folder for <name>_overlay.png and <name>_label.png")
    p.add_argument("--no-background", action="store_true", help="do not add a 'background' class")
    p.add_argument("--max-side", type=int, default=2048, help="shrink larger images to this long side first")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error (missing weights, no hub)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: KEY VALUE ... (they may also trail the other arguments, as in train_net.py)")
    args, extra = p.parse_known_args(argv)
    # Overrides may trail the other arguments without --opts, as train_net.py and build_freeda_bank.py take them;
    # after --input they are split off its list at the first config key.
    if args.input:
        at = next((i for i, item in enumerate(args.input) if _is_config_key(item)), None)
        if at is not None:
            args.input, extra = args.input[:at], args.input[at:] + extra
    if extra and not _is_config_key(extra[0]):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.opts = extra + args.opts
    return args


def _is_config_key(text: str) -> bool:
    """Whether ``text`` names a key of the package's config (``MODEL.DEVICE``, ``OUTPUT_DIR``, ...)."""
    node = get_diffseg_cfg()
    for part in text.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


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


def upsample_nearest(label, size):
    """A label map (h, w) -> (H, W) = ``size`` by nearest neighbour (each output pixel takes the label
    under its centre), so it lines up pixel for pixel with the image it was shrunk from."""
    h, w = label.shape
    rows = np.minimum((np.arange(size[0]) + 0.5) * h / size[0], h - 1).astype(np.int64)
    cols = np.minimum((np.arange(size[1]) + 0.5) * w / size[1], w - 1).astype(np.int64)
    return label[rows[:, None], cols[None, :]]


def main(argv=None):
    """Segment every input and write its overlay and label PNG; return the paths written.

    Raises:
        SystemExit: with a one-line message (exit status 1, no traceback) when the request is wrong
            (vocabulary, inputs), before anything is written; or, once every other input has been
            written, when any input was skipped (unreadable) or failed (non-finite scores), naming them.
    """
    args = parse_args(argv)
    setup_logger(name="diffseg_d2")
    setup_logger(name="diffseg_d2.demo")
    # Everything that can be wrong with the request is checked before a model is loaded or a file written.
    try:
        names = vocabulary_from_command_line(args.vocab)
    except VocabularyError as e:
        raise SystemExit(f"--vocab {args.vocab!r}: {e}") from None
    if not args.no_background and background_index(names) is None:
        names = [BACKGROUND] + names
    files = collect_inputs(args.input) if args.input else [sample_image_path()]
    cfg = get_diffseg_cfg(args.config_file, args.opts)
    cfg.MODEL.DIFFSEG.VOCABULARY = names
    cfg.DATASETS.TEST = ()
    # Building the model checks the vocabulary against its tokenizer (a name too long, one that
    # tokenises to nothing) and encodes it: each error's message names the culprit and the fix.
    try:
        predictor = DefaultPredictor(cfg)
    except MissingWeightsError as e:  # weights not on disk, or the hub not reachable
        if args.debug:
            raise
        raise SystemExit(str(e)) from None
    except VocabularyError as e:
        raise SystemExit(f"Cannot segment with this vocabulary: {e}") from None
    except NonFiniteError as e:  # e.g. the text encoder, run on the vocabulary's prompts
        raise SystemExit(str(e)) from None
    except ValueError as e:  # this package's build-time checks name the config key at fault
        raise SystemExit(f"Could not build the model of {args.config_file}: {e}") from None

    os.makedirs(args.output, exist_ok=True)
    written, skipped, failed = [], [], []
    for path, stem in tqdm(list(zip(files, output_stems(files))), desc="segmenting", unit="image"):
        try:
            full = read_image_rgb(path)
        except ValueError as e:  # one unreadable file does not stop a folder run
            logger.warning("skipping: %s", e)
            skipped.append(path)
            continue
        rgb = shrink_to_long_side(full, args.max_side)
        try:
            with torch.no_grad():
                bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # DefaultPredictor takes BGR like cv2.imread
                scores = predictor(bgr)["sem_seg"]
        except NonFiniteError as e:  # its message names the model part and what to do; no traceback
            logger.error("%s: not segmented, nothing written: %s", path, e)
            failed.append(path)
            continue
        label = scores.argmax(dim=0).cpu().numpy()
        # The label PNG must line up with the input file, so a label computed on the shrunk image is
        # upsampled by nearest neighbour. Asking the model for full-size scores (input height/width)
        # would hold a (K, H, W) float map, the memory --max-side exists to bound; a label is 1 byte a pixel.
        label_png = upsample_nearest(label.astype(np.uint8 if len(names) <= 256 else np.uint16), full.shape[:2])
        overlay_path = os.path.join(args.output, f"{stem}_overlay.png")
        label_path = os.path.join(args.output, f"{stem}_label.png")
        for out_path, array in ((overlay_path, render_overlay(rgb, label, names)), (label_path, label_png)):
            write_atomically(Path(out_path), lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
        written += [overlay_path, label_path]
    logger.info("wrote %d files to %s (label PNG values index the vocabulary: %s)", len(written), args.output, names)
    problems = [f"{len(skipped)} unreadable input(s) skipped: {skipped}"] if skipped else []
    problems += [f"{len(failed)} input(s) failed, a model part produced NaN or infinity: {failed}"] if failed else []
    if problems:
        raise SystemExit(f"Not every input was segmented: {'; '.join(problems)}.")
    return written


if __name__ == "__main__":
    main()
