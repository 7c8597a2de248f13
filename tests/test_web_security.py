"""tools/web_demo.py against an untrusted visitor: what the page may read, serve, decode and keep.

- The vocabulary box never opens a file (the command line's ``@file`` syntax is refused there).
- The launched server refuses every repository file on Gradio's file route and serves the labels it made.
- An image is refused from its header when it declares too many pixels: the decoder never runs,
  in the web app, in ``read_image_rgb`` and in ``tools/demo.py``; a too long vocabulary gets a message.
- Requests do not pile up files: the label folder and Gradio's upload/cache folder stay bounded.
- Concurrent requests on one shared model each get their own vocabulary's answer.
- The label PNG a request returns is the argmax of the model's scores, and the shares shown are its pixel counts.

The HTTP tests launch the app on 127.0.0.1 (a free port) and talk to it with httpx and gradio_client.
"""
import builtins
import importlib.util
import io
import logging
import os
import pathlib
import re
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffseg_d2 import vocabulary as vocabulary_module
from diffseg_d2.data import image as image_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import web_demo  # noqa: E402

MICRO = str(ROOT / "configs" / "micro" / "diffsegmenter.yaml")
needs_gradio = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gradio", "gradio_client", "httpx")),
    reason="needs the web extra (pip install -e '.[web]')",
)


# ---------------------------------------------------------------- helpers
def _scene_file(folder: Path, seed: int) -> str:
    """A micro-world val scene magnified 4x (256 px), saved as PNG; its path."""
    from diffseg_d2.microworld.scenes import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"scene_{seed}.png"
    Image.fromarray(render_scene(seed).image.repeat(4, 0).repeat(4, 1)).save(path)
    return str(path)


def _val_seed(i: int) -> int:
    from diffseg_d2.microworld.scenes import scene_seeds

    return scene_seeds("val", i + 1)[i]


def _zeros_png(path: Path, width: int, height: int, bit_depth: int) -> Path:
    """A valid grayscale PNG of zeros, ``width`` x ``height``, written row by row (never held in memory):
    hundreds of megapixels in a few hundred KB, the shape of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte 0, then the row's zero samples
    pack = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(height):
        idat += pack.compress(row)
    idat += pack.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", bytes(idat)))
        f.write(chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if Pillow decodes any pixel data (ImageFile.load runs the decoder)."""
    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(getattr(self, "size", None))
        raise AssertionError(f"Pillow decoded an image of size {self.size}: its header declared too many pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    return calls


@pytest.fixture(scope="module")
def segmenters():
    """One Segmenters shared by the module's tests (the micro model is built once)."""
    return web_demo.Segmenters()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_under(*folders: Path):
    """Regular files under the folders (recursively), as a set of paths."""
    return {p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- 3. the vocabulary never reads a file
def test_the_vocabulary_box_never_opens_a_file(tmp_path, monkeypatch, segmenters):
    secret = tmp_path / "secret.txt"
    marker = "zebracorn_7f3a91"
    secret.write_text(f"{marker}\n")
    # The command line keeps its @file syntax (checked before open is watched).
    assert vocabulary_module.vocabulary_from_command_line(f"@{secret}") == [marker]

    attempts = []
    real_open, real_io_open, real_path_open = builtins.open, io.open, pathlib.Path.open

    def watched(opener):
        def open_unless_secret(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) == str(secret):
                attempts.append(file)
                raise AssertionError(f"the web app opened {file}")
            return opener(file, *args, **kwargs)
        return open_unless_secret

    monkeypatch.setattr(builtins, "open", watched(real_open))
    monkeypatch.setattr(io, "open", watched(real_io_open))
    monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: watched(real_path_open)(self, *a, **k))
    scene = _scene_file(tmp_path, _val_seed(0))
    for vocab in (f"@{secret}", f"  @{secret}", f"circle, @{secret}", f"circle; @{secret}, square"):
        overlay, text, label = web_demo.segment(segmenters, MICRO, scene, vocab, tmp_path / "labels")
        assert marker not in text, text
        assert overlay is None and label is None and "cannot be used" in text and "@" in text, text
    with pytest.raises(vocabulary_module.VocabularyError, match="file"):
        vocabulary_module.vocabulary_from_untrusted_text(f"@{secret}")
    assert not attempts


def test_a_too_long_vocabulary_gets_a_message_before_the_model_runs(tmp_path, monkeypatch):
    segmenters = web_demo.Segmenters()

    def refuse(config_file):
        raise AssertionError("the model was used for a vocabulary that should have been refused")

    monkeypatch.setattr(segmenters, "get", refuse)
    scene = _scene_file(tmp_path, _val_seed(0))
    many = ", ".join(f"class {i}" for i in range(web_demo.MAX_CLASSES + 1))
    long_text = "circle, " + "x" * web_demo.MAX_VOCABULARY_CHARS
    for vocab, limit in ((many, web_demo.MAX_CLASSES), (long_text, web_demo.MAX_VOCABULARY_CHARS)):
        overlay, text, label = web_demo.segment(segmenters, MICRO, scene, vocab, tmp_path / "labels")
        assert overlay is None and label is None and "cannot be used" in text and f"{limit:,}" in text, text
    # At the limits the vocabulary is accepted.
    names = vocabulary_module.vocabulary_from_untrusted_text(
        ", ".join(f"c{i}" for i in range(web_demo.MAX_CLASSES)),
        max_classes=web_demo.MAX_CLASSES, max_chars=web_demo.MAX_VOCABULARY_CHARS)
    assert len(names) == web_demo.MAX_CLASSES


# ---------------------------------------------------------------- 5a. images refused from their header
def test_a_huge_image_is_refused_from_its_header_without_decoding(tmp_path, no_decoding):
    # ~169 megapixels of 16 bits, ~330 KB on disk: Pillow only warns below 2 x MAX_IMAGE_PIXELS and would
    # decode it (GBs once converted); a 400-megapixel 1-bit one trips Pillow's own DecompressionBombError.
    for width, height, depth in ((13000, 13000, 16), (20000, 20000, 1)):
        path = _zeros_png(tmp_path / f"bomb_{width}_{depth}.png", width, height, depth)
        assert path.stat().st_size < 2_000_000
        with pytest.raises(image_module.ImageTooLargeError) as excinfo:
            image_module.read_image_rgb(str(path))
        message = str(excinfo.value)
        assert isinstance(excinfo.value, ValueError)
        assert f"{width * height:,}" in message and f"{image_module.MAX_PIXELS:,}" in message, message
        assert "shrink" in message.lower() and "decompression bomb" not in message.lower(), message
    assert not no_decoding


def test_the_pixel_cap_is_a_parameter_and_pillows_own_limit_is_caught(tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(np.full((100, 120, 3), 7, np.uint8)).save(small)
    with pytest.raises(image_module.ImageTooLargeError, match="12,000 pixels.*5,000"):
        image_module.read_image_rgb(str(small), max_pixels=5000)
    assert image_module.read_image_rgb(str(small), max_pixels=12000).shape == (100, 120, 3)
    assert image_module.read_image_rgb(str(small), max_pixels=None).shape == (100, 120, 3)
    # No cap of ours: Pillow's DecompressionBombError (raised in Image.open) becomes the same clear error.
    bomb = _zeros_png(tmp_path / "bomb.png", 20000, 20000, 1)
    with pytest.raises(image_module.ImageTooLargeError, match="400,000,000") as excinfo:
        image_module.read_image_rgb(str(bomb), max_pixels=None)
    assert "shrink" in str(excinfo.value).lower()


def test_the_web_app_refuses_a_huge_image_with_a_message(tmp_path, no_decoding, segmenters):
    # 64 megapixels: under Pillow's own warning, over the web app's lower cap.
    path = _zeros_png(tmp_path / "big.png", 8000, 8000, 1)
    overlay, text, label = web_demo.segment(segmenters, MICRO, str(path), "circle", tmp_path / "labels")
    assert overlay is None and label is None, text
    assert "64,000,000" in text and f"{web_demo.MAX_UPLOAD_PIXELS:,}" in text and "shrink" in text.lower(), text
    assert not no_decoding


def test_the_preview_decodes_no_huge_image(tmp_path, no_decoding):
    path = _zeros_png(tmp_path / "big.png", 8000, 8000, 1)
    assert web_demo.preview(str(path)) is None and web_demo.preview(None) is None
    assert not no_decoding


def test_the_preview_is_the_image_shrunk_for_the_page(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((300, 1200, 3), 9, np.uint8)).save(wide)
    shown = web_demo.preview(str(wide))
    assert shown.shape == (128, web_demo.PREVIEW_SIDE, 3) and int(shown.max()) == 9
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert web_demo.preview(str(tmp_path / "junk.png")) is None


def test_the_demo_skips_a_huge_image_with_the_same_message(tmp_path, caplog, monkeypatch):
    spec = importlib.util.spec_from_file_location("demo_tool_for_web_security", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for name in ("diffseg_d2", "diffseg_d2.demo"):  # demo's setup_logger stops propagation to caplog's root
        monkeypatch.setattr(logging.getLogger(name), "propagate", False)
        logging.getLogger(name).addHandler(caplog.handler)
    try:
        bomb = _zeros_png(tmp_path / "bomb.png", 20000, 20000, 1)
        good = _scene_file(tmp_path, _val_seed(0))
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as excinfo:
            demo.main(["--config-file", MICRO, "--output", str(out), "--vocab", "circle",
                       "--input", str(bomb), good])
    finally:
        for name in ("diffseg_d2", "diffseg_d2.demo"):
            logging.getLogger(name).removeHandler(caplog.handler)
    assert "bomb.png" in str(excinfo.value.code) and "unreadable" in str(excinfo.value.code)
    assert sorted(os.listdir(out)) == ["scene_%d_label.png" % _val_seed(0), "scene_%d_overlay.png" % _val_seed(0)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("400,000,000" in w and "shrink" in w.lower() for w in warnings), warnings


# ---------------------------------------------------------------- 6. no cross-talk between requests
def test_concurrent_requests_each_get_their_own_vocabulary(tmp_path, segmenters):
    vocabularies = ["circle", "circle, square", "square, triangle, cross", "cross",
                    "red circle, blue square, green triangle, yellow cross", "triangle, circle"]
    scenes = [_scene_file(tmp_path / "in", _val_seed(i % 3)) for i in range(len(vocabularies))]

    def answer(i: int, results: dict, key):
        overlay, text, label_path = web_demo.segment(segmenters, MICRO, scenes[i], vocabularies[i],
                                                     tmp_path / f"labels_{i}")
        results[key] = (text, np.asarray(Image.open(label_path)))

    sequential = {}
    for i in range(len(vocabularies)):
        answer(i, sequential, i)
    for i, (text, label) in sequential.items():  # the answers differ, so a mix-up would show
        names = web_demo.class_names(vocabularies[i])
        assert f"Label PNG values: {', '.join(f'{k} = {n}' for k, n in enumerate(names))}." in text
        assert int(label.max()) < len(names)
    concurrent, errors = {}, []
    start = threading.Barrier(len(vocabularies) * 2)

    def worker(i: int, repeat: int):
        try:
            start.wait()
            answer(i, concurrent, (i, repeat))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, r)) for r in range(2) for i in range(len(vocabularies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for (i, _), (text, label) in concurrent.items():
        assert text == sequential[i][0]
        assert int(label.max()) < len(web_demo.class_names(vocabularies[i]))
        np.testing.assert_array_equal(label, sequential[i][1], err_msg=f"request {i} ({vocabularies[i]!r})")
    assert len(concurrent) == 2 * len(vocabularies)


def test_segment_does_not_change_the_shared_model(tmp_path, segmenters):
    predictor = segmenters.get(MICRO)
    before = predictor.model.vocabulary
    web_demo.segment(segmenters, MICRO, _scene_file(tmp_path, _val_seed(1)), "circle, square", tmp_path / "labels")
    assert predictor.model.vocabulary == before


# ---------------------------------------------------------------- the label PNG is the model's answer
def test_the_label_png_is_the_argmax_and_the_shares_are_its_pixel_counts(tmp_path, segmenters):
    from detectron2.engine import DefaultPredictor

    from diffseg_d2 import get_diffseg_cfg

    vocab = "circle, square, triangle, cross"
    scene = _scene_file(tmp_path, _val_seed(2))
    overlay, text, label_path = web_demo.segment(segmenters, MICRO, scene, vocab, tmp_path / "labels")
    label = np.asarray(Image.open(label_path))
    names = web_demo.class_names(vocab)
    # Independently: a predictor whose config holds the vocabulary, on the same BGR image.
    cfg = get_diffseg_cfg(MICRO)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.DIFFSEG.VOCABULARY = names
    rgb = np.asarray(Image.open(scene).convert("RGB"))
    scores = DefaultPredictor(cfg)(np.ascontiguousarray(rgb[:, :, ::-1]))["sem_seg"]
    assert scores.shape == (len(names),) + rgb.shape[:2]
    expected = scores.argmax(0).numpy()
    np.testing.assert_array_equal(label, expected)
    assert len(np.unique(label)) >= 2  # a scene with objects: not a trivial all-background answer
    assert overlay.ndim == 3 and overlay.shape[1] >= 2 * rgb.shape[1]  # the image beside its labels
    shown = dict(re.findall(r"^\| (.+?) \| ([\d.]+) % \|$", text, flags=re.M))
    counts = np.bincount(label.ravel(), minlength=len(names))
    expected_shares = {names[k]: f"{100.0 * c / label.size:.1f}" for k, c in enumerate(counts) if c}
    assert shown == expected_shares, (shown, expected_shares)


# ---------------------------------------------------------------- 4. and 5c: the launched server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app launched on 127.0.0.1 with its own work folder: ``(web app, base URL, gradio_client.Client)``."""
    if any(importlib.util.find_spec(m) is None for m in ("gradio", "gradio_client", "httpx")):
        pytest.skip("needs the web extra (pip install -e '.[web]')")
    from gradio_client import Client

    old_temp = os.environ.get("GRADIO_TEMP_DIR")
    work = tmp_path_factory.mktemp("web")
    web = web_demo.build_app([MICRO], work_dir=work / "app")
    port = _free_port()
    web.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    yield web, url, client
    if hasattr(client, "close"):
        client.close()
    web.blocks.close()
    if old_temp is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old_temp


def _request(client, image: str, vocab: str = "circle, square, triangle, cross"):
    from gradio_client import handle_file

    return client.predict(MICRO, handle_file(image), vocab, api_name="/segment")


@needs_gradio
def test_the_server_serves_no_repository_file(served, tmp_path):
    import httpx

    web, url, client = served
    overlay, text, label = _request(client, _scene_file(tmp_path, _val_seed(0)))
    assert "share of the pixels" in text
    label_url = label["url"]
    got = httpx.get(label_url if label_url.startswith("http") else url + label_url, timeout=30)
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
    # The label file the request wrote, in the app's own folder, is served too (the only folder besides examples).
    written = sorted((web.work_dir / "labels").glob("*.png"), key=lambda p: p.stat().st_mtime)[-1]
    assert httpx.get(f"{url}/gradio_api/file={written}", timeout=30).status_code == 200
    for path in (ROOT / "README.md", ROOT / "setup.py", ROOT / "tools" / "web_demo.py",
                 ROOT / "configs" / "micro" / "diffsegmenter.yaml", "README.md", "setup.py",
                 f"{web.work_dir}/labels/{os.path.relpath(ROOT / 'README.md', web.work_dir / 'labels')}"):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            response = httpx.get(f"{url}{route}{path}", timeout=30)
            assert response.status_code in (403, 404), (route, path, response.status_code)
            assert b"diffseg_d2" not in response.content
    assert str(ROOT) not in " ".join(web.launch_kwargs()["allowed_paths"])


@needs_gradio
def test_forty_requests_leave_a_bounded_number_of_files(served, tmp_path):
    web, url, client = served
    folders = (web.work_dir, web.gradio_temp_dir)
    _request(client, _scene_file(tmp_path / "warm", _val_seed(0)))
    before = _files_under(*folders)
    for i in range(40):  # each request uploads a different image: nothing is deduplicated
        _request(client, _scene_file(tmp_path / "in", 10_000 + i))
    new = _files_under(*folders) - before
    print(f"\n40 requests: {len(new)} new files in the app's folders, {len(_files_under(*folders))} in all")
    assert len(new) < 40, sorted(str(p) for p in new)
    labels = list((web.work_dir / "labels").glob("*.png"))
    assert len(labels) <= web_demo.LABELS_KEPT


# ---------------------------------------------------------------- load test
@pytest.mark.slow
@needs_gradio
def test_load_rss_and_files_stay_flat(served, tmp_path):
    """100 HTTP requests on loopback, each with a new image: process RSS and the app's files stay flat.

    Prints the numbers (run with -s): requests, seconds, RSS and file count/size at start, after warm-up, at the end."""
    import psutil

    web, url, client = served
    proc = psutil.Process()
    folders = (web.work_dir, web.gradio_temp_dir)

    def snapshot():
        files = _files_under(*folders)
        return proc.memory_info().rss / 2**20, len(files), sum(p.stat().st_size for p in files if p.exists()) / 2**10

    start = snapshot()
    for i in range(10):  # warm-up: the model, caches, allocator pools
        _request(client, _scene_file(tmp_path / "warm", 20_000 + i))
    warm = snapshot()
    requests, t0 = 100, time.perf_counter()
    for i in range(requests):
        vocab = ["circle", "circle, square", "square, triangle, cross", "red circle, cross"][i % 4]
        _, text, _ = _request(client, _scene_file(tmp_path / "in", 30_000 + i), vocab)
        assert "share of the pixels" in text
    seconds = time.perf_counter() - t0
    end = snapshot()
    print(f"\nload test: {requests} requests in {seconds:.1f} s ({seconds / requests * 1000:.0f} ms each); "
          f"RSS {start[0]:.0f} MiB at start, {warm[0]:.0f} MiB after warm-up, {end[0]:.0f} MiB at the end; "
          f"files {start[1]} ({start[2]:.0f} KiB), {warm[1]} ({warm[2]:.0f} KiB), {end[1]} ({end[2]:.0f} KiB)")
    assert end[1] <= warm[1] + 4, (warm, end)  # bounded: the newest requests' files only
    assert end[0] - warm[0] < 100, (warm, end)  # MiB
