"""Shared fixtures: one temporary cache for the whole session (tiny presets are built once)."""
import os

import pytest


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
