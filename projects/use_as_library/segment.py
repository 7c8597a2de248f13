#!/usr/bin/env python
"""Segment one image with diffseg_d2 through detectron2's stock DefaultPredictor."""
import argparse

import numpy as np
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

import diffseg_d2  # noqa: F401  (registers DiffSegmenter and the datasets)
from diffseg_d2 import add_diffseg_config, merge_config_file
from diffseg_d2.data.image import read_image_rgb
from diffseg_d2.vocabulary import BACKGROUND, VocabularyError, background_index, vocabulary_from_command_line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--vocab", required=True,
                        help="class names separated by commas, synonyms of one class by semicolons "
                             "('person,sofa;couch'), or @FILE with one class per line")
    args = parser.parse_args(argv)

    cfg = get_cfg()
    add_diffseg_config(cfg)  # coexists with any other add_*_config of your project
    merge_config_file(cfg, args.config_file)  # read as data: a yaml tag that would run code is refused
    # The request is checked before the model loads: a one-line message, no traceback.
    try:
        names = vocabulary_from_command_line(args.vocab)
        rgb = read_image_rgb(args.image)
    except (VocabularyError, OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    if background_index(names) is None:
        names = [BACKGROUND] + names
    cfg.MODEL.DIFFSEG.VOCABULARY = names
    cfg.DATASETS.TEST = ()
    predictor = DefaultPredictor(cfg)

    labels = predictor(rgb[:, :, ::-1])["sem_seg"].argmax(0).cpu().numpy()  # predictor takes BGR
    shares = {name: float(np.mean(labels == i)) for i, name in enumerate(cfg.MODEL.DIFFSEG.VOCABULARY)}
    for name, share in shares.items():
        print(f"{name:>20s}: {100 * share:5.1f} %")
    return shares


if __name__ == "__main__":
    main()
