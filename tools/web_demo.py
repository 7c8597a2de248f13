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
bad request (no image, an unreadable or too large file, an empty or too long vocabulary,
missing weights) gets a message in the page.

Visitors are not trusted: the vocabulary box never reads a file, the server serves no file of
the repository (only its own examples and label folders, and Gradio's upload/output folder,
which is the app's own), an image is refused from its header when it declares more than
MAX_UPLOAD_PIXELS pixels, uploads over MAX_UPLOAD_BYTES are refused while they arrive, and
only the newest requests' files are kept. Each request passes its vocabulary with its image,
so requests served at the same time never mix vocabularies.
"""
import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import gradio

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (our machines have no network)

import diffseg_d2  # noqa: E402, F401, I001  (first: it silences fvcore's torch.jit deprecation warning)

from diffseg_d2.data.datasets.register_sample import sample_image_path  # noqa: E402
from diffseg_d2.data.image import ImageTooLargeError, read_image_rgb, shrink_to_long_side  # noqa: E402
from diffseg_d2.microworld.scenes import render_scene, scene_seeds  # noqa: E402
from diffseg_d2.numerics import NonFiniteError  # noqa: E402
from diffseg_d2.pretrained.weights import MissingWeightsError  # noqa: E402
from diffseg_d2.visualize import render_overlay  # noqa: E402
from diffseg_d2.vocabulary import (  # noqa: E402
    BACKGROUND,
    VocabularyError,
    background_index,
    vocabulary_from_untrusted_text,
)

DEFAULT_CONFIGS = ["configs/micro/diffsegmenter.yaml", "configs/micro/daam.yaml"]
DEFAULT_VOCAB = "circle, square, triangle, cross"
# Larger uploads are shrunk to this long side first (the models read IMAGE_SIZE anyway).
MAX_SIDE = 1024
# Long side of the picture shown under the file input before segmenting.
PREVIEW_SIDE = 512
# Limits for what a visitor may send. An image is refused from its header past this many pixels
# (a 6000 x 4000 photo fits), before decoding: a few-KB PNG can declare hundreds of megapixels.
MAX_UPLOAD_PIXELS = 25_000_000
MAX_UPLOAD_BYTES = "50mb"  # Gradio stops an upload past this size while it arrives
MAX_CLASSES = 64  # each class is a prompt the model encodes and a score map it computes
MAX_VOCABULARY_CHARS = 2000
# Files kept from past requests, newest first; older label links stop working. Each request leaves a
# label PNG in the app's label folder, and an upload and two outputs in Gradio's folder.
LABELS_KEPT = 8
GRADIO_FILES_KEPT = 24
logger = logging.getLogger("diffseg_d2.web_demo")


class Segmenters:
    """One detectron2 ``DefaultPredictor`` per config, built on first use and kept.

    The predictors are shared by every request; requests never change them (the vocabulary travels
    in each input dict, see :func:`predict_scores`), so they may run at the same time.
    """

    def __init__(self, opts: Sequence[str] = ()):
        self.opts = list(opts)
        self._predictors: Dict[str, object] = {}
        self._lock = threading.Lock()  # two first requests at once build one model, not two

    def get(self, config_file: str):
        with self._lock:
            if config_file not in self._predictors:
                from detectron2.engine import DefaultPredictor

                from diffseg_d2 import get_diffseg_cfg

                cfg = get_diffseg_cfg(config_file, self.opts)
                cfg.DATASETS.TEST = ()  # the vocabulary comes from the page
                logger.info("building the model of %s", config_file)
                self._predictors[config_file] = DefaultPredictor(cfg)
            return self._predictors[config_file]


def class_names(vocab: str) -> List[str]:
    """The page's vocabulary -> class names with "background" in front (VocabularyError when bad).

    Parsed as untrusted text: no ``@file``, at most MAX_CLASSES classes and MAX_VOCABULARY_CHARS characters.
    """
    names = vocabulary_from_untrusted_text(vocab or "", max_classes=MAX_CLASSES, max_chars=MAX_VOCABULARY_CHARS)
    return names if background_index(names) is not None else [BACKGROUND] + names


def predict_scores(predictor, rgb: np.ndarray, names: Sequence[str]):
    """Scores ``(K, H, W)`` (torch, K = ``len(names)``) of ``rgb`` ``(H, W, 3)`` uint8 for ``names``.

    What ``DefaultPredictor.__call__`` does (its resize ``predictor.aug``, its input format, output
    at the image's size), except that the vocabulary goes in the input dict instead of being set on
    the shared model: a request served at the same time as another cannot score with its vocabulary.
    """
    import torch

    image = rgb if predictor.input_format == "RGB" else rgb[:, :, ::-1]
    height, width = image.shape[:2]
    image = predictor.aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(image).astype("float32").transpose(2, 0, 1))
    inputs = {"image": tensor, "height": height, "width": width, "vocabulary": list(names)}
    with torch.no_grad():
        return predictor.model([inputs])[0]["sem_seg"]


_pruning = threading.Lock()


def keep_newest_files(folder: Path, keep: int, spare: Collection[str] = ()) -> int:
    """Delete all but the ``keep`` newest files under ``folder`` (by modification time), then empty
    subfolders; return how many files were deleted.

    Files named in ``spare`` (absolute paths) and dot-files (Gradio writes a copy under a dot-name
    and renames it into place) are left alone and not counted.
    """
    with _pruning:  # two requests ending together must not race over the same files
        files = []
        for path in Path(folder).rglob("*"):
            try:
                if path.is_file() and not path.name.startswith(".") and str(path) not in spare:
                    files.append((path.stat().st_mtime, path))
            except OSError:  # gone meanwhile
                continue
        files.sort(key=lambda entry: entry[0], reverse=True)
        for _, path in files[keep:]:
            path.unlink(missing_ok=True)
        for sub in sorted((p for p in Path(folder).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                sub.rmdir()  # only succeeds when empty
            except OSError:
                pass
        return max(0, len(files) - keep)


def _shown_path(message: str, image_path) -> str:
    """``message`` with the server's path of the upload replaced by its file name (folders stay private)."""
    return message.replace(str(image_path), Path(str(image_path)).name)


def segment(segmenters: Segmenters, config_file: str, image_path, vocab: str, out_dir: Path, *,
            max_pixels: Optional[int] = MAX_UPLOAD_PIXELS,
            labels_kept: int = LABELS_KEPT) -> Tuple[Optional[np.ndarray], str, Optional[str]]:
    """One request: ``(overlay or None, markdown shown under it, label PNG path or None)``.

    Nothing is decoded or computed for a request refused by a limit; ``out_dir`` keeps the newest
    ``labels_kept`` label PNGs.
    """
    if not image_path:
        return None, "**Upload an image or pick an example first.**", None
    try:
        names = class_names(vocab)
    except VocabularyError as e:
        return None, f"**The vocabulary cannot be used:** {e}", None
    try:
        rgb = read_image_rgb(str(image_path), max_pixels=max_pixels)
    except ImageTooLargeError as e:
        return None, f"**The image is too large:** {_shown_path(str(e), image_path)}", None
    except ValueError as e:
        return None, f"**The file cannot be read as an image:** {_shown_path(str(e), image_path)}", None
    rgb = shrink_to_long_side(rgb, MAX_SIDE)
    try:
        scores = predict_scores(segmenters.get(config_file), rgb, names)
    except (MissingWeightsError, VocabularyError, NonFiniteError, ValueError) as e:
        return None, f"**{Path(config_file).name} cannot segment this:** {e}", None
    label = scores.argmax(dim=0).cpu().numpy().astype(np.uint8 if len(names) <= 256 else np.uint16)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle, label_path = tempfile.mkstemp(prefix="label_", suffix=".png", dir=out_dir)
    os.close(handle)
    Image.fromarray(label).save(label_path)
    keep_newest_files(out_dir, labels_kept)
    lines = ["| class | share of the pixels |", "|---|---|"]
    for i in np.argsort(-np.bincount(label.ravel(), minlength=len(names))):
        share = 100.0 * float((label == i).mean())
        if share > 0:
            lines.append(f"| {names[i]} | {share:.1f} % |")
    note = (f"Label PNG values: {', '.join(f'{i} = {n}' for i, n in enumerate(names))}. "
            f"Config: {config_file}.")
    return render_overlay(rgb, label, names), "\n".join(lines) + "\n\n" + note, label_path


def preview(image_path, max_pixels: Optional[int] = MAX_UPLOAD_PIXELS) -> Optional[np.ndarray]:
    """The chosen image as it will be segmented (shrunk for the page), or None (no file, or one the request
    would refuse: ``segment`` then says why). Read under the same limits as ``segment``."""
    if not image_path:
        return None
    try:
        rgb = read_image_rgb(str(image_path), max_pixels=max_pixels)
    except ValueError:  # ImageTooLargeError included
        return None
    return shrink_to_long_side(rgb, PREVIEW_SIDE)


def example_images(folder: Path) -> List[str]:
    """The bundled sample photo and four micro-world val scenes (magnified 4x), written once into
    ``folder``: the page refers to no file of the repository."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in scene_seeds("val", 4):
        path = folder / f"{seed}.png"
        if not path.exists():
            Image.fromarray(render_scene(seed).image.repeat(4, 0).repeat(4, 1)).save(path)
        paths.append(str(path))
    sample = folder / Path(sample_image_path()).name
    if not sample.exists():
        shutil.copyfile(sample_image_path(), sample)
    return paths + [str(sample)]


@dataclass
class WebApp:
    """The page and the folders it owns; :meth:`launch` serves it.

    Attributes:
        blocks: the Gradio app.
        work_dir: the app's folder: ``examples/`` and ``labels/`` (the only folders served besides
            Gradio's) and ``gradio/``, Gradio's upload and output folder for this app.
    """

    blocks: "gradio.Blocks"
    work_dir: Path

    @property
    def gradio_temp_dir(self) -> Path:
        return self.work_dir / "gradio"

    def launch_kwargs(self) -> Dict:
        """What ``gr.Blocks.launch`` needs: no repository path is allowed, uploads are capped."""
        return dict(allowed_paths=[str(self.work_dir / "examples"), str(self.work_dir / "labels")],
                    max_file_size=MAX_UPLOAD_BYTES, share=False,
                    show_error=False)  # an unexpected exception's text (paths) stays in the server's log

    def launch(self, **kwargs):
        """Serve the page: ``gr.Blocks.launch`` with :meth:`launch_kwargs`, ``kwargs`` added (host, port, ...)."""
        # Gradio's server reads its upload folder from GRADIO_TEMP_DIR when it starts.
        os.environ["GRADIO_TEMP_DIR"] = str(self.gradio_temp_dir)
        return self.blocks.queue().launch(**{**self.launch_kwargs(), **kwargs})


def build_app(config_files: Sequence[str], opts: Sequence[str] = (), work_dir: Optional[Path] = None) -> WebApp:
    """The page for ``config_files`` (each built on first use with ``opts``) with its own ``work_dir``
    (a new temporary folder, deleted at exit, when None).

    Sets GRADIO_TEMP_DIR to ``work_dir/gradio`` for this process: Gradio keeps uploads and outputs
    there, and the app deletes all but the newest GRADIO_FILES_KEPT of them after each request
    (a folder that is the app's own, so nothing of another app is touched).
    """
    import gradio as gr

    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="diffseg_web_"))
        atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    work_dir = Path(work_dir).resolve()
    web = WebApp(blocks=None, work_dir=work_dir)
    web.gradio_temp_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(web.gradio_temp_dir)  # read by every component as it is made
    segmenters = Segmenters(opts)
    offered = list(config_files)
    spare: set = set()  # the examples' copies in Gradio's folder, made while the page is built

    def run(config_file, image_path, vocab):
        if config_file not in offered:  # Gradio checks the dropdown's choices too; an API call is no page
            return None, "**Pick one of the configs offered.**", None
        try:
            return segment(segmenters, config_file, image_path, vocab, work_dir / "labels")
        finally:
            keep_newest_files(web.gradio_temp_dir, GRADIO_FILES_KEPT, spare)

    with gr.Blocks(title="diffseg_d2") as app:
        gr.Markdown("## diffseg_d2: open-vocabulary segmentation\nThe default configs run offline with the "
                    "micro-world models the project trains on CPU (see the README, Micro-world): they know "
                    "circles, squares, triangles and crosses in red, green, blue and yellow, nothing else.")
        with gr.Row():
            with gr.Column():
                config = gr.Dropdown(offered, value=offered[0], label="Config (method and weights)",
                                     elem_id="config")
                image = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-file")
                shown = gr.Image(label="The image", type="numpy", interactive=False, elem_id="preview", height=260)
                vocab = gr.Textbox(value=DEFAULT_VOCAB, label="Vocabulary (commas between classes, "
                                   "semicolons between synonyms)", elem_id="vocab", max_length=MAX_VOCABULARY_CHARS)
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples(example_images(work_dir / "examples"), inputs=[image], label="Examples")
            with gr.Column():
                overlay = gr.Image(label="Image | labels", type="numpy", elem_id="overlay")
                result = gr.Markdown(elem_id="result")
                label_file = gr.File(label="Label PNG", elem_id="label-file")
        image.change(preview, inputs=[image], outputs=[shown], api_name=False)
        button.click(run, inputs=[config, image, vocab], outputs=[overlay, result, label_file], api_name="segment")
    spare.update(str(p) for p in web.gradio_temp_dir.rglob("*") if p.is_file())
    web.blocks = app
    return web


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
    web = build_app(args.config_file, args.opts)
    print(f"Serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    web.launch(server_name=args.host, server_port=args.port, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
