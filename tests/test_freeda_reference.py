"""FreeDA's reference test time, tested against the published method's facts (not its code): the
sigmoid local score, the token-grid pooling and its fallback for superpixels that get no weight,
and the per-window averaging."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.freeda.superpixels import token_grid_weights
from diffseg_d2.modeling.meta_arch import freeda as freeda_module


@pytest.fixture(scope="module")
def model(tiny_freeda_cfg_path, freeda_bank):
    cfg = get_diffseg_cfg(tiny_freeda_cfg_path, ["MODEL.DIFFSEG.FREEDA.BANK", str(freeda_bank.path), "DATASETS.TEST", "()"])
    return build_model(cfg).eval()


def test_reference_defaults(model):
    assert (model.pipeline, model.pooling, model.query, model.local_sigmoid) == ("window", "token_grid", "sentence", True)
    assert model.min_key_similarity == -1.0 and len(model.query_templates) == 7


def test_token_grid_weights_are_the_masks_resized_with_aligned_corners():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (53, 41))
    masks = F.one_hot(labels, 6).permute(2, 0, 1)[:, None].float()
    expected = F.interpolate(masks, size=(7, 5), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(token_grid_weights(labels, (7, 5), 6).view(6, 7, 5), expected)


def test_window_score_is_sigmoid_local_and_global_and_empty_superpixels_fall_back(model, monkeypatch):
    c = 112
    crop = torch.rand(3, c, c) * 255
    # Superpixel 0: the whole window but one pixel; superpixel 1: that pixel, which the 9x9 token
    # grid (aligned corners: pixels 0, 13.875, ...) never samples, so it gets no weight.
    labels = torch.zeros(c, c, dtype=torch.long)
    labels[5, 5] = 1
    monkeypatch.setattr(freeda_module, "felzenszwalb_superpixels", lambda *a, **k: labels)
    names = ["person", "dog"]
    prototypes, found = model.class_prototypes(tuple(names))
    text = model.class_text(names)
    protos = F.normalize(prototypes, dim=-1)
    scores = model.window_scores(crop, protos, text, found)

    tokens = model.dino.tokens_at(crop[None], model.dino_size)[0]  # (D, 9, 9)
    g = tokens.shape[-1]
    flat = tokens.reshape(tokens.shape[0], -1).T
    weights = token_grid_weights(labels, (g, g), 2)
    assert weights[1].sum() == 0
    pooled = F.normalize(weights[0] @ flat / weights[0].sum(), dim=-1)
    glob = (model.clip.encode_image(crop[None], clamp=False) @ text.T)[0]
    expected = 0.8 * torch.sigmoid(pooled @ protos.T) + 0.2 * glob
    torch.testing.assert_close(scores[:, 0, 0], expected, rtol=1e-5, atol=1e-6)
    # The pixel of the empty superpixel takes the per-token score upsampled with aligned corners.
    dense = torch.sigmoid(F.normalize(flat, dim=-1) @ protos.T).T.reshape(2, g, g)
    dense = F.interpolate(dense[None], size=(c, c), mode="bilinear", align_corners=True)[0]
    torch.testing.assert_close(scores[:, 5, 5], 0.8 * dense[:, 5, 5] + 0.2 * glob, rtol=1e-5, atol=1e-6)
    # Without the sigmoid (ours), the same window gives the cosine.
    monkeypatch.setattr(model, "local_sigmoid", False)
    plain = model.window_scores(crop, protos, text, found)
    torch.testing.assert_close(plain[:, 0, 0], 0.8 * (pooled @ protos.T) + 0.2 * glob, rtol=1e-5, atol=1e-6)


def test_window_scores_are_averaged_where_windows_overlap(model, monkeypatch):
    # 112 x 280 after the resize: windows at x = 0, 56, 112, 168 (stride 56), each returning its index.
    calls = []

    def numbered(crop, prototypes, text, found, timings=None):
        calls.append(len(calls))
        return torch.full((len(text), *crop.shape[-2:]), float(len(calls) - 1))

    monkeypatch.setattr(model, "window_scores", numbered)
    image = torch.rand(3, 112, 280) * 255
    out = model.segment(image, ["background", "person"], (112, 280))
    assert len(calls) == 4
    row = out[1, 0]
    expected = np.zeros(280)
    for x in range(280):
        covering = [i for i, x0 in enumerate((0, 56, 112, 168)) if x0 <= x < x0 + 112]
        expected[x] = np.mean(covering)
    torch.testing.assert_close(row, torch.tensor(expected, dtype=torch.float32))
    assert torch.all(out[0] == model.background_score)


def test_very_elongated_images_get_windows_as_tall_as_the_image(model, monkeypatch):
    """After the long side's cap, a strip keeps a short side under WINDOW: windows are then the whole
    short side by WINDOW along the long side (mmseg's sliding inference), and every pixel is read."""
    shapes = []

    def numbered(crop, prototypes, text, found, timings=None):
        shapes.append(tuple(crop.shape[-2:]))
        return torch.full((len(text), *crop.shape[-2:]), 1.0)

    monkeypatch.setattr(model, "window_scores", numbered)
    old = model.long_side_cap
    model.long_side_cap = 2 * model.short_side  # the resize stops at the cap: the short side stays under WINDOW
    try:
        image = torch.rand(3, 20, 400) * 255
        out = model.segment(image, ["background", "person"], (20, 400))
    finally:
        model.long_side_cap = old
    h = shapes[0][0]
    assert h < model.window and all(s == (h, model.window) for s in shapes)
    assert torch.isfinite(out).all() and torch.all(out[1] == 1.0)
