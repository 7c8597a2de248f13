"""Shared fixtures: one temporary cache for the whole session (tiny presets are built once)."""
import contextlib
import os
from pathlib import Path

import pytest


# Tests that take the ``model_device`` fixture build their models on this device ("cpu" when unset);
# tools/gpu_check.sh sets it to "cuda". Every other test stays on the CPU.
TEST_DEVICE_VARIABLE = "DIFFSEG_D2_TEST_DEVICE"


def _requested_test_device() -> str:
    return os.environ.get(TEST_DEVICE_VARIABLE, "").strip() or "cpu"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end tests that start processes or browsers (make test-fast leaves them out)")
    config.addinivalue_line(
        "markers", f"device: builds its models on ${TEST_DEVICE_VARIABLE} (set from the model_device fixture)")


def pytest_report_header(config):
    return f"model_device: {_requested_test_device()!r} (${TEST_DEVICE_VARIABLE})"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    # `-m device` selects the tests that run on the chosen device, without a list to keep up to date.
    for item in items:
        if "model_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def model_device() -> str:
    """``MODEL.DEVICE`` for the tests that take it: ``$DIFFSEG_D2_TEST_DEVICE``, "cpu" when unset.

    A device this machine lacks fails those tests with the config check's message (never a silent skip)."""
    from diffseg_d2.config import check_device

    device = _requested_test_device()
    try:
        check_device(device)
    except ValueError as e:
        pytest.fail(f"${TEST_DEVICE_VARIABLE}={device}: {e}", pytrace=False)
    return device


@contextlib.contextmanager
def patched(obj, **attrs):
    """Set attributes for the block and restore them (monkeypatch loses nn.Module submodules)."""
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Point DIFFSEG_D2_CACHE at a fresh folder so tests never touch the user's cache."""
    old = os.environ.get("DIFFSEG_D2_CACHE")
    os.environ["DIFFSEG_D2_CACHE"] = str(tmp_path_factory.mktemp("diffseg_cache"))
    yield
    if old is None:
        os.environ.pop("DIFFSEG_D2_CACHE", None)
    else:
        os.environ["DIFFSEG_D2_CACHE"] = old


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh DIFFSEG_D2_CACHE for one test (datasets written on first use land here)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DIFFSEG_D2_CACHE", str(path))
    return path


@pytest.fixture
def droot(tmp_path, monkeypatch) -> Path:
    """An empty DETECTRON2_DATASETS root for one test."""
    path = tmp_path / "datasets"
    path.mkdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_cfg_path():
    return os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", "diffsegmenter.yaml")


@pytest.fixture(scope="session")
def tiny_sd(_session_cache):
    """The tiny SD preset loaded through the real loading code, frozen."""
    from diffseg_d2.diffusion import FrozenStableDiffusion, load_stable_diffusion

    return FrozenStableDiffusion(load_stable_diffusion("tiny"))


@pytest.fixture(scope="session")
def tiny_model(_session_cache, tiny_cfg_path):
    """DiffSegmenter built from the tiny config (category filter on, tiny CLIP)."""
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg

    cfg = get_diffseg_cfg(tiny_cfg_path)
    model = build_model(cfg)
    model.eval()
    return model


# ---------------------------------------------------------------- FreeDA (shared by test_freeda_*.py)
@pytest.fixture(scope="session")
def tiny_freeda_cfg_path():
    return os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", "freeda.yaml")


@pytest.fixture(scope="session")
def freeda_bank(_session_cache, tiny_freeda_cfg_path, tmp_path_factory):
    """The tiny FreeDA bank, built once by tools/build_freeda_bank.py in a subprocess, as a user runs it
    (tiny config, its 12 captions, 3 shards of 4). Returns ``.path`` (the bank folder) and ``.stdout``.

    Built with one CPU thread, as every build it is compared with (floats depend on the thread count)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    folder = tmp_path_factory.mktemp("freeda") / "bank"
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "build_freeda_bank.py"), "--config-file", tiny_freeda_cfg_path,
         "--captions", os.path.join(root, "configs", "tiny", "freeda_captions.txt"), "--output", str(folder),
         "--no-progress"],
        capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(path=folder, stdout=proc.stdout, stderr=proc.stderr)


class CodePayload:
    """Unpickling this object creates the file ``marker``: proof that a loader ran the file's code
    (the crafted checkpoints of tests/test_reliability.py and tests/test_security.py)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
