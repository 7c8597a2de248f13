#!/usr/bin/env python
"""A browser app: segment an image with any vocabulary and see its labels with their class names.

    python tools/web_demo.py                     # micro-world models, offline: open http://127.0.0.1:7860
    python tools/web_demo.py --config-file configs/micro/diffsegmenter.yaml configs/diffsegmenter/voc21.yaml
    python tools/web_demo.py --host 0.0.0.0 --port 8080

Pick a config (the method and its weights), upload an image or pick an example, type the
vocabulary and press Segment. Classes are separated by commas, synonyms of one class by
semicolons ("person, sofa;couch, dog"); a "background" class is added in front unless the
vocabulary names one. The page shows the image beside its labels, each region with its class
name, every class's share of the pixels, and offers the label PNG (its values index the
classes in the order shown). Each config's model is built on first use and then reused; a
bad request (no image, an unreadable file, an empty vocabulary, missing weights) gets a
message in the page.
"""
import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (our machines have no network)

import diffseg_d2  # noqa: E402, F401, I001  (first: it silences fvcore's torch.jit deprecation warning)

from diffseg_d2.data.datasets.register_sample import sample_image_path  # noqa: E402
from diffseg_d2.data.image import read_image_rgb, shrink_to_long_side  # noqa: E402
from diffseg_d2.microworld.scenes import render_scene, scene_seeds  # noqa: E402
from diffseg_d2.numerics import NonFiniteError  # noqa: E402
from diffseg_d2.pretrained.weights import MissingWeightsError  # noqa: E402
from diffseg_d2.visualize import render_overlay  # noqa: E402
from diffseg_d2.vocabulary import (  # noqa: E402
    BACKGROUND,
    VocabularyError,
    background_index,
    vocabulary_from_command_line,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/micro/diffsegmenter.yaml", "configs/micro/daam.yaml"]
DEFAULT_VOCAB = "circle, square, triangle, cross"
# Larger uploads are shrunk to this long side first (the models read IMAGE_SIZE anyway).
MAX_SIDE = 1024
logger = logging.getLogger("diffseg_d2.web_demo")


class Segmenters:
    """One detectron2 ``DefaultPredictor`` per config, built on first use and kept."""

    def __init__(self, opts=()):
        self.opts = list(opts)
        self._predictors = {}

    def get(self, config_file: str):
        if config_file not in self._predictors:
            from detectron2.engine import DefaultPredictor

            from diffseg_d2 import get_diffseg_cfg

            cfg = get_diffseg_cfg(config_file, self.opts)
            cfg.DATASETS.TEST = ()  # the vocabulary comes from the page
            logger.info("building the model of %s", config_file)
            self._predictors[config_file] = DefaultPredictor(cfg)
        return self._predictors[config_file]


def class_names(vocab: str):
    """The page's vocabulary -> class names with "background" in front (VocabularyError when bad)."""
    names = vocabulary_from_command_line(vocab or "")
    return names if background_index(names) is not None else [BACKGROUND] + names


def segment(segmenters: Segmenters, config_file: str, image_path, vocab: str, out_dir: Path):
    """One request: ``(overlay or None, markdown shown under it, label PNG path or None)``."""
    if not image_path:
        return None, "**Upload an image or pick an example first.**", None
    try:
        names = class_names(vocab)
    except VocabularyError as e:
        return None, f"**The vocabulary cannot be used:** {e}", None
    try:
        rgb = read_image_rgb(str(image_path))
    except ValueError as e:
        return None, f"**The file cannot be read as an image:** {e}", None
    rgb = shrink_to_long_side(rgb, MAX_SIDE)
    try:
        predictor = segmenters.get(config_file)
        predictor.model.set_vocabulary(names)
        import torch

        with torch.no_grad():
            scores = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["sem_seg"]  # BGR, as cv2.imread
    except (MissingWeightsError, VocabularyError, NonFiniteError, ValueError) as e:
        return None, f"**{Path(config_file).name} cannot segment this:** {e}", None
    label = scores.argmax(dim=0).cpu().numpy().astype(np.uint8 if len(names) <= 256 else np.uint16)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle, label_path = tempfile.mkstemp(prefix="label_", suffix=".png", dir=out_dir)
    os.close(handle)
    Image.fromarray(label).save(label_path)
    lines = ["| class | share of the pixels |", "|---|---|"]
    for i in np.argsort(-np.bincount(label.ravel(), minlength=len(names))):
        share = 100.0 * float((label == i).mean())
        if share > 0:
            lines.append(f"| {names[i]} | {share:.1f} % |")
    note = (f"Label PNG values: {', '.join(f'{i} = {n}' for i, n in enumerate(names))}. "
            f"Config: {config_file}.")
    return render_overlay(rgb, label, names), "\n".join(lines) + "\n\n" + note, label_path


def example_images(folder: Path):
    """The bundled sample photo and four micro-world val scenes (magnified 4x), written once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in scene_seeds("val", 4):
        path = folder / f"{seed}.png"
        if not path.exists():
            Image.fromarray(render_scene(seed).image.repeat(4, 0).repeat(4, 1)).save(path)
        paths.append(str(path))
    return paths + [sample_image_path()]


def build_app(config_files, opts=(), work_dir: Path = None):
    import gradio as gr

    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="diffseg_web_"))
    segmenters = Segmenters(opts)

    def run(config_file, image_path, vocab):
        return segment(segmenters, config_file, image_path, vocab, work_dir / "labels")

    with gr.Blocks(title="diffseg_d2") as app:
        gr.Markdown("## diffseg_d2: open-vocabulary segmentation\nThe default configs run offline with the "
                    "micro-world models the project trains on CPU (see the README, Micro-world): they know "
                    "circles, squares, triangles and crosses in red, green, blue and yellow, nothing else.")
        with gr.Row():
            with gr.Column():
                config = gr.Dropdown(list(config_files), value=config_files[0], label="Config (method and weights)",
                                     elem_id="config")
                image = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-file")
                vocab = gr.Textbox(value=DEFAULT_VOCAB, label="Vocabulary (commas between classes, "
                                   "semicolons between synonyms)", elem_id="vocab")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples(example_images(work_dir / "examples"), inputs=[image], label="Examples")
            with gr.Column():
                overlay = gr.Image(label="Image | labels", type="numpy", elem_id="overlay")
                result = gr.Markdown(elem_id="result")
                label_file = gr.File(label="Label PNG", elem_id="label-file")
        button.click(run, inputs=[config, image, vocab], outputs=[overlay, result, label_file])
    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", nargs="+", default=DEFAULT_CONFIGS, metavar="FILE",
                   help="configs offered in the page (default: the micro-world DiffSegmenter and DAAM, offline)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every config: KEY VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    missing = [c for c in args.config_file if not os.path.isfile(c)]
    if missing:
        raise SystemExit(f"No such config file: {', '.join(missing)} (configs/ holds the shipped ones).")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("The web app needs gradio: pip install -e '.[web]' (make install does).") from None
    app = build_app(args.config_file, args.opts)
    print(f"Serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                       quiet=True, allowed_paths=[str(ROOT)])


if __name__ == "__main__":
    sys.exit(main())
