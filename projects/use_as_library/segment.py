#!/usr/bin/env python
"""Segment one image with diffseg_d2 through detectron2's stock DefaultPredictor."""
import argparse

import numpy as np
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

import diffseg_d2  # noqa: F401  (registers DiffSegmenter and the datasets)
from diffseg_d2 import add_diffseg_config, merge_config_file
from diffseg_d2.data.image import read_image_rgb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--vocab", required=True, help="comma-separated class names")
    args = parser.parse_args(argv)

    cfg = get_cfg()
    add_diffseg_config(cfg)  # coexists with any other add_*_config of your project
    merge_config_file(cfg, args.config_file)  # read as data: a yaml tag that would run code is refused
    cfg.MODEL.DIFFSEG.VOCABULARY = ["background"] + [n.strip() for n in args.vocab.split(",")]
    cfg.DATASETS.TEST = ()
    predictor = DefaultPredictor(cfg)

    rgb = read_image_rgb(args.image)
    labels = predictor(rgb[:, :, ::-1])["sem_seg"].argmax(0).cpu().numpy()  # predictor takes BGR
    shares = {name: float(np.mean(labels == i)) for i, name in enumerate(cfg.MODEL.DIFFSEG.VOCABULARY)}
    for name, share in shares.items():
        print(f"{name:>20s}: {100 * share:5.1f} %")
    return shares


if __name__ == "__main__":
    main()
