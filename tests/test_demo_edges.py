"""tools/demo.py at its edges: bad vocabularies, inputs it cannot segment, shrunk images, multi-frame files
and non-finite scores. Each ends with a clear message and the exit status a script can rely on."""
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg_d2.data.image import read_image_rgb
from diffseg_d2.numerics import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_tool_under_test", ROOT / "tools" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def _run(cfg_path, out, *extra):
    return demo.main(["--config-file", str(cfg_path), "--output", str(out), *extra])


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def logs(caplog, monkeypatch):
    """caplog for the package's loggers: the demo's setup_logger stops them propagating to the root logger,
    where caplog listens, so its handler is attached to them directly."""
    for name in ("diffseg_d2", "diffseg_d2.demo"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "propagate", False)
        logger.addHandler(caplog.handler)
    yield caplog
    for name in ("diffseg_d2", "diffseg_d2.demo"):
        logging.getLogger(name).removeHandler(caplog.handler)


@pytest.fixture
def no_model(monkeypatch):
    """Make building the model fail loudly: what is checked before it must not get that far."""

    def refuse(cfg):
        raise AssertionError("the model was loaded, but the request could be refused without it")

    monkeypatch.setattr(demo, "DefaultPredictor", refuse)


def _exit_message(excinfo):
    """The message a SystemExit prints (Python prints a str code to stderr and exits with status 1)."""
    code = excinfo.value.code
    assert isinstance(code, str), f"expected a message and a non-zero exit, got exit code {code!r}"
    return code


# ---------------------------------------------------------------- vocabularies
@pytest.mark.parametrize(
    "vocab,says",
    [(" , ", "empty"), ("cat,Cat", "more than once"), ("cat,\u200b,dog", "no visible characters")],
)
def test_a_bad_vocabulary_ends_with_one_line_before_the_model_is_loaded(tiny_cfg_path, tmp_path, no_model, vocab, says):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as excinfo:
        _run(tiny_cfg_path, out, "--vocab", vocab)
    message = _exit_message(excinfo)
    assert says in message and "--vocab" in message and "\n" not in message
    assert not out.exists()


@pytest.mark.slow
def test_the_command_line_prints_no_traceback_for_a_bad_vocabulary(tiny_cfg_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--config-file", tiny_cfg_path, "--vocab", "cat,cat",
         "--output", str(tmp_path / "never")],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("--vocab")
    assert not (tmp_path / "never").exists()


def test_a_vocabulary_only_the_model_can_reject_ends_with_a_message(tiny_cfg_path, tmp_path):
    out = tmp_path / "never"
    too_long = " ".join(["very"] * 100) + " long cat"  # fits no text encoder's 77-token context
    with pytest.raises(SystemExit) as excinfo:
        _run(tiny_cfg_path, out, "--vocab", f"dog,{too_long}")
    message = _exit_message(excinfo)
    assert "tokens long" in message and "\n" not in message
    assert not out.exists()


# ---------------------------------------------------------------- exit status
@pytest.mark.slow
def test_a_skipped_input_makes_the_run_fail_after_the_others_are_written(tiny_cfg_path, tmp_path, logs):
    src = tmp_path / "in"
    src.mkdir()
    _save(src / "good.png", np.full((20, 30, 3), 120, np.uint8))
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        _run(tiny_cfg_path, out, "--vocab", "cat,dog", "--input", str(src))
    message = _exit_message(excinfo)
    assert "broken.png" in message and "good.png" not in message
    assert sorted(os.listdir(out)) == ["good_label.png", "good_overlay.png"]
    assert any("broken.png" in r.getMessage() and r.levelno >= logging.WARNING for r in logs.records)


def test_a_complete_run_returns_what_it_wrote(tiny_cfg_path, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _save(src / "a.png", np.full((20, 30, 3), 120, np.uint8))
    out = tmp_path / "out"
    written = _run(tiny_cfg_path, out, "--vocab", "cat,dog", "--input", str(src))
    assert sorted(os.path.basename(p) for p in written) == ["a_label.png", "a_overlay.png"]
    assert sorted(os.listdir(out)) == ["a_label.png", "a_overlay.png"]


# ---------------------------------------------------------------- shrunk images
def test_the_label_of_a_shrunk_image_has_the_input_size(tiny_cfg_path, tmp_path):
    path = _save(tmp_path / "big.png", np.random.default_rng(0).integers(0, 255, (150, 260, 3), dtype=np.uint8))
    out = tmp_path / "out"
    _run(tiny_cfg_path, out, "--vocab", "cat,dog", "--input", path, "--max-side", "64")
    label = np.asarray(Image.open(out / "big_label.png"))
    assert label.shape == (150, 260)
    assert label.max() <= 2


class BrightnessPredictor:
    """Stands in for DefaultPredictor: class 1 where the BGR image is dark, class 2 where it is bright,
    scores at the size of the image it is given (as the model returns them)."""

    def __init__(self, cfg):
        self.num_classes = len(cfg.MODEL.DIFFSEG.VOCABULARY)

    def __call__(self, bgr):
        bright = torch.from_numpy(bgr.mean(axis=2) > 127).float()
        scores = torch.zeros(self.num_classes, *bright.shape)
        scores[1], scores[2] = 1 - bright, bright
        return {"sem_seg": scores}


def test_the_label_of_a_shrunk_image_lines_up_with_the_input(tiny_cfg_path, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DefaultPredictor", BrightnessPredictor)
    rgb = np.zeros((300, 500, 3), np.uint8)
    rgb[:90, 320:] = 255  # a bright block in the top right corner: a flip or a transpose would move it
    path = _save(tmp_path / "big.png", rgb)
    out = tmp_path / "out"
    _run(tiny_cfg_path, out, "--vocab", "cat,dog", "--input", path, "--max-side", "50")
    label = np.asarray(Image.open(out / "big_label.png"))
    expected = np.where(rgb[:, :, 0] > 127, 2, 1)
    assert label.shape == expected.shape
    # Nearest-neighbour upsampling of a 50x30 label: only a band of one shrunk pixel (10 px) at the
    # block's edges may differ.
    assert (label[:80, 330:] == 2).all() and (label[100:] == 1).all() and (label[:, :310] == 1).all()
    assert (label != expected).mean() < 0.05


# ---------------------------------------------------------------- multi-frame files
def _frames(n):
    return [Image.fromarray(np.full((12, 16, 3), 40 * (i + 1), np.uint8)) for i in range(n)]


@pytest.mark.parametrize("name", ["anim.gif", "pages.tif"])
def test_a_multi_frame_file_is_read_as_its_first_frame_with_a_warning(tmp_path, logs, name):
    path = tmp_path / name
    first, *rest = _frames(3)
    first.save(path, save_all=True, append_images=rest)
    rgb = read_image_rgb(str(path))
    assert rgb.shape == (12, 16, 3) and abs(int(rgb.mean()) - 40) <= 2  # the first frame (GIF palettes round)
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "3 frames" in warnings[0], warnings


def test_a_single_frame_gif_reads_without_a_warning(tmp_path, logs):
    path = tmp_path / "still.gif"
    _frames(1)[0].save(path)
    read_image_rgb(str(path))
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]


def test_the_demo_warns_about_an_animated_gif(tiny_cfg_path, tmp_path, logs):
    path = tmp_path / "anim.gif"
    first, *rest = _frames(4)
    first.save(path, save_all=True, append_images=rest)
    _run(tiny_cfg_path, tmp_path / "out", "--vocab", "cat", "--input", str(path))
    assert any("4 frames" in r.getMessage() and "anim.gif" in r.getMessage() for r in logs.records)


# ---------------------------------------------------------------- non-finite scores
PART = "the UNet (MODEL.DIFFSEG.SD.WEIGHTS)"


def test_non_finite_scores_fail_that_image_only(tiny_cfg_path, tmp_path, monkeypatch, logs):
    real = demo.DefaultPredictor

    class NaNOnTallImages(real):
        """The real predictor, except that a 21-pixel-high image makes the model raise NonFiniteError."""

        def __call__(self, bgr):
            if bgr.shape[0] == 21:
                raise NonFiniteError(PART, bad=5, total=10)
            return super().__call__(bgr)

    monkeypatch.setattr(demo, "DefaultPredictor", NaNOnTallImages)
    src = tmp_path / "in"
    src.mkdir()
    _save(src / "a_nan.png", np.full((21, 30, 3), 90, np.uint8))  # first: the run must go on after it
    _save(src / "b_good.png", np.full((20, 30, 3), 90, np.uint8))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        _run(tiny_cfg_path, out, "--vocab", "cat,dog", "--input", str(src))
    message = _exit_message(excinfo)
    assert "a_nan.png" in message and "b_good.png" not in message
    assert sorted(os.listdir(out)) == ["b_good_label.png", "b_good_overlay.png"]  # nothing for the failed image
    errors = [r for r in logs.records if r.levelno >= logging.ERROR]
    assert any(PART in r.getMessage() and "a_nan.png" in r.getMessage() for r in errors)
    assert all(r.exc_info is None for r in logs.records)  # the message, no traceback


def test_a_damaged_later_frame_still_gives_the_first_frame_with_a_warning(tmp_path, logs):
    path = tmp_path / "cut.gif"
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the first frame whole, a later one cut off
    assert read_image_rgb(str(path)).shape == (40, 50, 3)
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cut.gif" in warnings[0] and "only the first is read" in warnings[0], warnings


def test_non_finite_values_while_the_model_is_built_end_with_a_message(tiny_cfg_path, tmp_path, monkeypatch):
    def nan_text_encoder(cfg):  # building encodes the vocabulary's prompts with the text encoder
        raise NonFiniteError("the text encoder (MODEL.DIFFSEG.SD.WEIGHTS)", bad=3, total=8)

    monkeypatch.setattr(demo, "DefaultPredictor", nan_text_encoder)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as excinfo:
        _run(tiny_cfg_path, out, "--vocab", "cat")
    assert "the text encoder (MODEL.DIFFSEG.SD.WEIGHTS) produced non-finite values" in _exit_message(excinfo)
    assert not out.exists()


def test_missing_weights_end_in_one_message_and_debug_shows_the_traceback(tiny_cfg_path, tmp_path, monkeypatch):
    from diffseg_d2.pretrained.weights import MissingWeightsError

    def unreachable(cfg):
        raise MissingWeightsError("Could not load the UNet from the hub id 'x/y' (MODEL.DIFFSEG.SD.WEIGHTS): offline.")

    monkeypatch.setattr(demo, "DefaultPredictor", unreachable)
    with pytest.raises(SystemExit) as stop:
        _run(tiny_cfg_path, tmp_path / "out", "--vocab", "cat")
    assert "MODEL.DIFFSEG.SD.WEIGHTS" in str(stop.value.code)
    with pytest.raises(MissingWeightsError):
        _run(tiny_cfg_path, tmp_path / "out", "--vocab", "cat", "--debug")
    assert not (tmp_path / "out").exists()
