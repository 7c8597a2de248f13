"""The FreeDA segmenter on the tiny presets and the tiny bank: outputs, vocabularies, the per-vocabulary
cache, the fallback for classes the bank does not know, and the tools (train_net, demo) as a user runs them."""
import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.data.datasets.register_sample import sample_image_path
from diffseg_d2.data.image import read_image_rgb
from diffseg_d2.freeda import BankError

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["background", "person", "dog", "sofa"]
sys.path.insert(0, str(ROOT / "tools"))
import demo  # noqa: E402


@pytest.fixture(scope="module")
def freeda_cfg(tiny_freeda_cfg_path, freeda_bank):
    """``freeda_cfg(*opts)``: the tiny FreeDA config reading the tiny bank, no test dataset."""

    def make(*opts):
        return get_diffseg_cfg(tiny_freeda_cfg_path, ["MODEL.DIFFSEG.FREEDA.BANK", str(freeda_bank.path),
                                                      "DATASETS.TEST", "()", *[str(o) for o in opts]])

    return make


@pytest.fixture(scope="module")
def model(freeda_cfg):
    m = build_model(freeda_cfg("MODEL.DIFFSEG.VOCABULARY", str(VOCAB)))
    m.eval()
    return m


@pytest.fixture(scope="module")
def sample_rgb():
    return read_image_rgb(sample_image_path())  # (375, 500, 3) uint8, a real VOC photo


def _image(rgb):
    return torch.as_tensor(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def _global_scores(model, image, names):
    """The CLIP image-text cosine of each name over the whole image: the "whole" pipeline's global score."""
    return (model.clip.encode_image(image.float()[None]) @ model.class_text(names).T)[0]


@contextlib.contextmanager
def _records(logger_name):
    """Records of one logger. detectron2's setup_logger (called by the tools) stops propagation to the
    root logger, so pytest's caplog may not see them: listen on the logger itself."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("crop", [(slice(None), slice(None)), (slice(40, 101), slice(150, 293)),
                                  (slice(100, 250), slice(0, 40))], ids=["375x500", "61x143", "150x40"])
def test_whole_image_pipeline_scores_every_class_at_the_input_size(freeda_cfg, sample_rgb, crop, model_device):
    cfg = freeda_cfg("MODEL.DIFFSEG.VOCABULARY", str(VOCAB), "MODEL.DIFFSEG.FREEDA.PIPELINE", "whole",
                     "MODEL.DIFFSEG.FREEDA.LOCAL_SIGMOID", "False", "MODEL.DIFFSEG.FREEDA.MIN_KEY_SIMILARITY", "0.5",
                     "MODEL.DEVICE", model_device)
    predictor = DefaultPredictor(cfg)
    rgb = sample_rgb[crop]
    sem_seg = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["sem_seg"]  # BGR, like cv2.imread
    h, w = rgb.shape[:2]
    assert sem_seg.shape == (len(VOCAB), h, w)
    assert sem_seg.device.type == torch.device(model_device).type
    assert torch.isfinite(sem_seg).all()
    assert torch.all(sem_seg[0] == cfg.MODEL.DIFFSEG.BACKGROUND_THRESHOLD)
    # prompted classes: w * cosine(superpixel, prototype) + (1 - w) * global, the cosine in [-1, 1]
    model, weight = predictor.model, cfg.MODEL.DIFFSEG.FREEDA.LOCAL_WEIGHT
    _, found = model.class_prototypes(tuple(VOCAB[1:]))
    assert found.all()  # the tiny bank has keys for all three (MIN_KEY_SIMILARITY 0.5)
    local = (sem_seg[1:] - (1 - weight) * _global_scores(model, _image(rgb), VOCAB[1:])[:, None, None]) / weight
    assert local.abs().max() <= 1 + 1e-4
    assert all(channel.unique().numel() > 1 for channel in sem_seg[1:])  # superpixels differ


def test_the_output_size_follows_height_and_width(model, sample_rgb):
    x = _image(sample_rgb)
    full = model([{"image": x}])[0]["sem_seg"]
    small = model([{"image": x, "height": 150, "width": 200}])[0]["sem_seg"]
    assert full.shape == (4, 375, 500) and small.shape == (4, 150, 200)
    old = model.pipeline
    model.pipeline = "whole"
    try:
        full = model([{"image": x}])[0]["sem_seg"]
        small = model([{"image": x, "height": 150, "width": 200}])[0]["sem_seg"]
    finally:
        model.pipeline = old
    assert set(small.unique().tolist()) <= set(full.unique().tolist())  # the same superpixel scores, resampled


def test_per_input_vocabulary_and_set_vocabulary_agree(model, sample_rgb):
    x = _image(sample_rgb)
    names = ["dog", "background", "person"]
    per_input = model([{"image": x, "vocabulary": names}])[0]["sem_seg"]
    assert per_input.shape == (3, 375, 500)
    assert model.vocabulary == VOCAB  # the model's own vocabulary is unchanged
    base = model([{"image": x}])[0]["sem_seg"]  # background, person, dog, sofa
    # a class's scores do not depend on the other classes: channels follow the names
    torch.testing.assert_close(per_input, base[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    try:
        model.set_vocabulary("dog, background, person")
        assert model.vocabulary == names
        torch.testing.assert_close(model([{"image": x}])[0]["sem_seg"], per_input)
    finally:
        model.set_vocabulary(VOCAB)
    no_background = model([{"image": x, "vocabulary": ["sofa", "dog"]}])[0]["sem_seg"]
    torch.testing.assert_close(no_background, base[[3, 2]], atol=1e-5, rtol=1e-5)


def test_class_prototypes_are_retrieved_once_per_vocabulary(model, sample_rgb, monkeypatch):
    calls = []
    original = model.bank.class_prototypes

    def counting(queries, k):
        calls.append(queries.shape[0])
        return original(queries, k)

    monkeypatch.setattr(model.bank, "class_prototypes", counting)
    x = _image(sample_rgb[:120, :160])
    names = ["cat", "chair", "bottle"]  # a vocabulary no other test uses
    first = model([{"image": x, "vocabulary": names}])[0]["sem_seg"]
    again = model([{"image": x, "vocabulary": names}])[0]["sem_seg"]
    assert calls == [3] and torch.equal(first, again)
    model([{"image": x, "vocabulary": ["background"] + names}])  # background is not queried: same classes
    assert calls == [3]
    model([{"image": x, "vocabulary": ["boat", "bus"]}])
    model([{"image": x, "vocabulary": ["boat", "bus"]}])
    assert calls == [3, 2]


def test_a_class_without_a_close_key_falls_back_to_the_global_clip_score(freeda_cfg, sample_rgb):
    model = build_model(freeda_cfg("MODEL.DIFFSEG.FREEDA.MIN_KEY_SIMILARITY", 1.01,
                                   "MODEL.DIFFSEG.FREEDA.PIPELINE", "whole")).eval()
    x = _image(sample_rgb)
    names = ["background", "dog", "sofa"]
    with _records("diffseg_d2.modeling.meta_arch.freeda") as records:
        out = model([{"image": x, "vocabulary": names}])[0]["sem_seg"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    for name in ("dog", "sofa"):
        assert any(f"{name!r}" in w and "MIN_KEY_SIMILARITY" in w for w in warnings), warnings
    expected = _global_scores(model, x, ["dog", "sofa"])
    for k in (1, 2):
        assert torch.all(out[k] == out[k, 0, 0])  # constant over the image
        torch.testing.assert_close(out[k, 0, 0], expected[k - 1])
    assert torch.all(out[0] == model.background_score)
    with _records("diffseg_d2.modeling.meta_arch.freeda") as records:
        model([{"image": x, "vocabulary": names}])
    assert not records  # warned once per vocabulary, not per image


def test_only_the_classes_without_a_close_key_fall_back(model, sample_rgb):
    candidates = ["horse", "cow", "giraffe", "bottle", "train", "xylophone", "tv monitor", "kite"]
    _, best = model.bank.class_prototypes(model.class_text(candidates), model.top_k)
    near, far = candidates[int(best.argmax())], candidates[int(best.argmin())]
    assert best.max() - best.min() > 1e-3
    x = _image(sample_rgb)
    old = model.min_key_similarity, model.pipeline
    model.min_key_similarity, model.pipeline = float(best.max() + best.min()) / 2, "whole"
    try:
        out = model([{"image": x, "vocabulary": [near, far]}])[0]["sem_seg"]
    finally:
        model.min_key_similarity, model.pipeline = old
    assert out[0].unique().numel() > 1  # the close class gets local (superpixel) scores
    assert torch.all(out[1] == out[1, 0, 0])  # the other the global score alone
    torch.testing.assert_close(out[1, 0, 0], _global_scores(model, x, [far])[0])


def test_the_segmenter_is_training_free(model, sample_rgb):
    model.train()
    try:
        with pytest.raises(RuntimeError, match="training-free"):
            model([{"image": _image(sample_rgb)}])
    finally:
        model.eval()


# ----------------------------------------------------------------------------- the bank it reads
def test_a_missing_or_unfinished_bank_fails_before_the_models_load(freeda_cfg, freeda_bank, tmp_path, monkeypatch):
    import shutil

    from diffseg_d2.pretrained.clip import OpenCLIP

    monkeypatch.setattr(OpenCLIP, "from_weights", classmethod(lambda cls, *a: pytest.fail("CLIP was loaded")))
    with pytest.raises(BankError, match="is not a folder"):
        build_model(freeda_cfg("MODEL.DIFFSEG.FREEDA.BANK", tmp_path / "nowhere"))
    unfinished = tmp_path / "bank"
    shutil.copytree(freeda_bank.path, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(BankError, match="interrupted.*--resume"):
        build_model(freeda_cfg("MODEL.DIFFSEG.FREEDA.BANK", unfinished))


# ----------------------------------------------------------------------------- tools
def _run(args, tmp_path):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)


@pytest.mark.slow
def test_train_net_eval_only_prints_miou(tiny_freeda_cfg_path, freeda_bank, tmp_path):
    proc = _run([str(ROOT / "tools" / "train_net.py"), "--config-file", tiny_freeda_cfg_path, "--eval-only",
                 "MODEL.DIFFSEG.FREEDA.BANK", str(freeda_bank.path), "OUTPUT_DIR", str(tmp_path / "eval")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "diffseg_sample_voc [sem_seg]" in table
    miou = float(re.search(r"\| mIoU\s*\|\s*([\d.]+)", table).group(1))
    assert 0.0 <= miou <= 100.0
    for cls in ("background", "person", "chair", "bottle", "dining table"):  # the classes in the sample's GT
        assert re.search(rf"\| {cls}\s*\|", table), cls
    assert (tmp_path / "eval" / "inference" / "diffseg_sample_voc" / "sem_seg_evaluation.pth").exists()


@pytest.mark.slow
def test_train_net_refuses_to_train_freeda(tiny_freeda_cfg_path, tmp_path):
    proc = _run([str(ROOT / "tools" / "train_net.py"), "--config-file", tiny_freeda_cfg_path,
                 "OUTPUT_DIR", str(tmp_path / "train")], tmp_path)
    assert proc.returncode != 0 and "FreeDA is training-free: run with --eval-only" in proc.stderr, proc.stderr[-3000:]


def test_demo_writes_overlay_and_label_images(tiny_freeda_cfg_path, freeda_bank, sample_rgb, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(sample_rgb[:90, :130]).save(src / "crop.png")
    out = tmp_path / "out"
    written = demo.main(["--config-file", tiny_freeda_cfg_path, "--input", str(src / "crop.png"),
                         "--vocab", "person,chair,bottle", "--output", str(out),
                         "--opts", "MODEL.DIFFSEG.FREEDA.BANK", str(freeda_bank.path)])
    assert sorted(os.path.basename(p) for p in written) == ["crop_label.png", "crop_overlay.png"]
    assert sorted(os.listdir(out)) == ["crop_label.png", "crop_overlay.png"]  # no temporary files
    label = np.asarray(Image.open(out / "crop_label.png"))
    overlay = np.asarray(Image.open(out / "crop_overlay.png"))
    # The label keeps the input size; the overlay of an image under 256 px is magnified (x3 here),
    # the image on its left.
    assert label.shape == (90, 130)
    np.testing.assert_array_equal(overlay[:270:3, :390:3], sample_rgb[:90, :130])
    assert label.max() <= 3  # background + 3 classes


def test_whole_pipeline_averages_each_pixels_features_over_its_windows(model):
    """PIPELINE whole: where windows overlap, a pixel's feature is the MEAN over the windows that
    cover it (each counts once), and a superpixel's feature the mean over its pixels; computed here
    pixel by pixel from the windows' upsampled DINO features."""
    import torch.nn.functional as F

    from diffseg_d2.tiling import sliding_windows, window_shape

    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 40, 72, generator=g) * 255
    labels = torch.randint(0, 6, (40, 72), generator=g)
    labels[:, 30:42] = 6  # a superpixel across the overlap of the two 40-wide windows
    window, stride = model.window, model.stride
    try:
        model.window, model.stride = 40, 32
        wh, ww = window_shape(40, 72, 40)
        corners = sliding_windows(40, 72, (wh, ww), 32)
        assert len(corners) == 2  # columns 0..39 and 32..71: 8 shared columns
        got = model._superpixel_features(image, labels)
    finally:
        model.window, model.stride = window, stride
    total = torch.zeros(model.dino.embed_dim, 40, 72)
    cover = torch.zeros(40, 72)
    for y, x in corners:
        f = model.dino(image[None, :, y:y + wh, x:x + ww])[0]
        total[:, y:y + wh, x:x + ww] += F.interpolate(f[None].float(), size=(wh, ww), mode="bilinear",
                                                      align_corners=False)[0]
        cover[y:y + wh, x:x + ww] += 1
    per_pixel = total / cover
    expected = torch.stack([per_pixel[:, labels == s].mean(-1) for s in range(7)])
    torch.testing.assert_close(got, F.normalize(expected, dim=-1), rtol=1e-4, atol=1e-5)
