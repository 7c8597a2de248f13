"""The micro CLIP and the micro dense encoder trainers: short runs write folders that the real loaders
(OpenCLIP.from_weights, DenseDINO.from_weights) open, an interrupted run resumes to the same weights,
training.json says what was trained and how, and the losses' pieces behave.
"""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffseg_d2.tiling import sliding_windows
from diffseg_d2.microworld import train_clip, train_dense
from diffseg_d2.microworld.train_clip import ClipTrainingSettings, train_micro_clip
from diffseg_d2.microworld.train_dense import DenseTrainingSettings, train_micro_dense
from diffseg_d2.pretrained.clip import OpenCLIP
from diffseg_d2.pretrained.dino import DenseDINO

TEMPLATES = ["a photo of a {}.", "a photo of the {}."]


def small_clip_settings(**kw) -> ClipTrainingSettings:
    base = dict(steps=6, scenes_per_step=6, crops_per_step=6, warmup_steps=2, embed_dim=16, vision_width=32,
                vision_layers=1, text_width=32, text_layers=1, checkpoint_every=3)
    return ClipTrainingSettings(**{**base, **kw})


def small_dense_settings(**kw) -> DenseTrainingSettings:
    base = dict(steps=6, batch=4, warmup_steps=2, embed_dim=32, depth=1, num_heads=2, checkpoint_every=3)
    return DenseTrainingSettings(**{**base, **kw})


def safetensors_state(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, module, stop_step: int):
    """Make ``module.training_batch`` raise at ``stop_step`` (after the checkpoint before it was written)."""
    real = module.training_batch

    def batch(settings, step):
        if step == stop_step:
            raise Interrupted
        return real(settings, step)

    monkeypatch.setattr(module, "training_batch", batch)
    return real


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("micro_clip")
    return train_micro_clip(out, small_clip_settings(), command="pytest clip")


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("micro_dense")
    return train_micro_dense(out, small_dense_settings(), command="pytest dense")


# ----------------------------------------------------------------------------- micro CLIP
def test_clip_folder_opens_with_open_clip_loader(clip_folder):
    names = sorted(p.name for p in clip_folder.iterdir())
    assert names == ["open_clip_config.json", "open_clip_model.safetensors", "training.json"]
    clip = OpenCLIP.from_weights(str(clip_folder), TEMPLATES)
    images = torch.rand(2, 3, 64, 64) * 255
    image_emb = clip.encode_image(images)
    assert image_emb.shape == (2, 16)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    names = clip.encode_class_names(["red circle", "circle", "blue square"])
    assert names.shape == (3, 16) and not torch.allclose(names[0], names[1])
    words = clip.encode_words_in_context(["a photo of a red circle.", "a blue square"], ["circle", "blue"])
    assert words.shape == (2, 16)
    dense = clip.encode_dense(images)
    assert dense.shape == (2, 16, 8, 8)  # patch 8 on 64 px
    # The training's patch branch is encode_dense averaged over the image.
    model = clip.model
    pixels = (F.interpolate(images, size=(64, 64)) - clip.pixel_mean) / clip.pixel_std
    pooled, patches = train_clip.encode_image_and_patches(model, pixels)
    assert torch.allclose(patches, dense.mean((2, 3)), atol=1e-4)
    assert torch.allclose(F.normalize(pooled, dim=-1), image_emb, atol=1e-5)


def test_clip_training_json(clip_folder):
    info = json.loads((clip_folder / "training.json").read_text())
    assert info["settings"] == asdict(small_clip_settings())
    assert info["seed"] == 0 and info["command"] == "pytest clip" and info["torch_threads"] == 1
    assert set(info["final_losses"]) == {"loss", "image", "patches"} and info["final_losses"]["image"] > 0
    assert any("box" in s for s in info["aux_signals"])


def test_clip_resume_gives_the_uninterrupted_weights(clip_folder, tmp_path, monkeypatch):
    settings = small_clip_settings()
    interrupt_at(monkeypatch, train_clip, 4)
    with pytest.raises(Interrupted):
        train_micro_clip(tmp_path, settings)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["history"]["loss"]) == 3
    monkeypatch.undo()
    train_micro_clip(tmp_path, settings, resume=True)
    assert not (tmp_path / "train_state.pt").exists()
    resumed = safetensors_state(tmp_path / "open_clip_model.safetensors")
    straight = safetensors_state(clip_folder / "open_clip_model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_encode_text_prefix_matches_encode_text():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**train_clip.model_config(small_clip_settings())).eval()
    ids = open_clip.tokenizer.SimpleTokenizer()(["a red circle", "a photo of a blue square and a green cross."])
    with torch.no_grad():
        assert torch.allclose(train_clip.encode_text_prefix(model, ids), model.encode_text(ids), atol=1e-5)


def test_positives_follow_the_captions():
    red_circle, blue_square = ("red", "circle"), ("blue", "square")
    contents = [frozenset([red_circle]), frozenset([red_circle, blue_square])]
    specs = [
        ((red_circle,), False),  # "a red circle": both images
        (((None, "circle"),), False),  # "a circle": both
        ((red_circle, blue_square), True),  # the whole caption of image 1 only
        ((red_circle,), True),  # the whole caption of image 0 only
        ((("blue", "circle"),), False),  # neither
    ]
    expected = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(train_clip.positives(specs, contents), expected)


def test_training_texts_use_the_eval_templates():
    _, texts, specs, contents = train_clip.training_batch(small_clip_settings(scenes_per_step=30), 0)
    assert any(t.startswith("a photo of a ") and t.endswith(".") for t in texts)
    target = train_clip.positives(specs, contents)
    assert bool(target.diagonal().all())  # every text describes its own image


# ----------------------------------------------------------------------------- micro dense encoder
def test_dense_folder_opens_with_dino_loader(dense_folder):
    names = sorted(p.name for p in dense_folder.iterdir())
    assert names == ["config.json", "model.safetensors", "training.json"]
    dino = DenseDINO.from_weights(str(dense_folder))
    assert dino.patch_size == 8 and dino.embed_dim == 32
    images = torch.rand(2, 3, 64, 64) * 255
    assert dino(images).shape == (2, 32, 8, 8)
    assert dino(torch.rand(1, 3, 96, 80) * 255).shape == (1, 32, 12, 10)
    assert dino(torch.rand(1, 3, 70, 70) * 255).shape == (1, 32, 9, 9)  # resized to the nearest multiple of 8
    # FreeDA's sliding windows at micro sizes: 64 px windows every 32 px over a 64x128 image.
    image = torch.rand(3, 64, 128) * 255
    corners = sliding_windows(64, 128, 64, 32)
    assert corners == [(0, 0), (0, 32), (0, 64)]
    crops = torch.stack([image[:, y : y + 64, x : x + 64] for y, x in corners])
    feats = dino(crops)
    assert feats.shape == (3, 32, 8, 8)
    assert not torch.allclose(feats[0], feats[1])  # different windows, different content


def test_dense_training_json(dense_folder):
    info = json.loads((dense_folder / "training.json").read_text())
    assert info["settings"] == asdict(small_dense_settings())
    assert info["seed"] == 0 and info["command"] == "pytest dense" and info["torch_threads"] == 1
    assert info["final_losses"]["patch_contrastive"] > 0
    assert any("instance masks" in s for s in info["aux_signals"])
    config = json.loads((dense_folder / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2" and config["model_args"]["patch_size"] == 8
    assert config["pretrained_cfg"]["tag"] == "microworld"


def test_dense_resume_gives_the_uninterrupted_weights(dense_folder, tmp_path, monkeypatch):
    settings = small_dense_settings()
    interrupt_at(monkeypatch, train_dense, 5)
    with pytest.raises(Interrupted):
        train_micro_dense(tmp_path, settings)
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    train_micro_dense(tmp_path, settings, resume=True)
    assert not (tmp_path / "train_state.pt").exists()
    resumed = safetensors_state(tmp_path / "model.safetensors")
    straight = safetensors_state(dense_folder / "model.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_picked_patches_are_pure_and_balanced():
    shares = torch.zeros(1, 4, 16, 16)
    shares[0, 0] = 1.0
    shares[0, :, :8, :8] = 0.0
    shares[0, 1, :8, :8] = 1.0  # instance 1: the top-left 8x8 patch of a 2x2 grid
    shares[0, 0, 8:, 8:] = 0.5
    shares[0, 2, 8:, 8:] = 0.5  # a mixed patch: below the purity floor, left out
    image, token, region = train_dense.pick_patches(shares, 8, 4, torch.Generator().manual_seed(0))
    picked = sorted(zip(token.tolist(), region.tolist()))
    assert picked == [(0, 1), (1, 0), (2, 0)]
    assert image.tolist() == [0, 0, 0]


def test_supervised_contrastive_prefers_grouped_features():
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    grouped = F.normalize(torch.eye(3).repeat_interleave(2, 0) + 0.01 * torch.randn(6, 3), dim=-1)
    mixed = grouped[torch.tensor([0, 2, 4, 1, 3, 5])]
    assert train_dense.supervised_contrastive(grouped, ids, 0.1) < train_dense.supervised_contrastive(mixed, ids, 0.1)


def test_contrast_groups_share_background_and_ignore_objects_across_scenes():
    image = torch.tensor([0, 0, 0, 1, 1])
    region = torch.tensor([0, 1, 1, 0, 1])
    ids, ignore = train_dense.contrast_groups(image, region)
    assert ids[0] == ids[3]  # backgrounds of both scenes: one group
    assert ids[1] == ids[2] and ids[1] != ids[4] and ids[1] != ids[0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1, 4] = expected[2, 4] = expected[4, 1] = expected[4, 2] = True
    assert torch.equal(ignore, expected)
    # A sample whose pairs are all ignored (and which has no positive) is as if absent.
    z = F.normalize(torch.randn(5, 8), dim=-1)
    ids = torch.tensor([0, 0, 1, 1, 2])
    ignore = torch.zeros(5, 5, dtype=torch.bool)
    ignore[4, :] = ignore[:, 4] = True
    with_it = train_dense.supervised_contrastive(z, ids, 0.1, ignore)
    assert torch.isclose(with_it, train_dense.supervised_contrastive(z[:4], ids[:4], 0.1))
