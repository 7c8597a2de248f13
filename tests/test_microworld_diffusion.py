"""The micro-world diffusion trainer: alignment loss, a short run of the real command, resume, loading."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_alignment_loss_prefers_attention_on_the_words_object():
    from diffseg_d2.microworld.scenes import render_scene
    from diffseg_d2.microworld.train_diffusion import alignment_loss

    scene = next(
        s for s in (render_scene(i) for i in range(200))
        if len(s.objects) >= 2 and len({o.colour for o in s.objects}) == len({o.shape for o in s.objects}) == len(s.objects)
    )
    masks = scene.word_masks()  # colour, shape, colour, shape, ...: two words per object
    stack = torch.from_numpy(np.stack([masks[w] for w in masks])).float()  # (W, 64, 64)
    cells = torch.nn.functional.adaptive_avg_pool2d(stack[:, None], 16).flatten(1)  # (W, 256)
    good = cells.clamp(0.05, 0.95)
    shuffled = good.roll(2, dims=0)  # each word attends to the next object's mask
    loss_good = alignment_loss([(0, 256, good)], [stack], pixel_weight=1.0)
    loss_shuffled = alignment_loss([(0, 256, shuffled)], [stack], pixel_weight=1.0)
    assert loss_good < 0.5 * loss_shuffled


def test_word_tokens_find_caption_words():
    import transformers

    from diffseg_d2.pretrained.stable_diffusion import resolve_sd_weights
    from diffseg_d2.microworld.train_diffusion import word_tokens

    tok = transformers.CLIPTokenizer.from_pretrained(resolve_sd_weights("tiny").path, subfolder="tokenizer")
    caption = "a red circle and a blue square"
    pos = word_tokens(tok, caption, ["red", "square", "green"])
    ids = tok(caption).input_ids
    assert tok.decode([ids[pos[0][0]]]).strip() == "red"
    assert tok.decode([ids[pos[1][0]]]).strip() == "square"
    assert pos[2] is None


def _train(out, *extra):
    cmd = [sys.executable, "tools/train_microworld.py", "--threads", "1", "diffusion", "--output", str(out),
           "--vae-steps", "2", "--steps", "3", "--batch", "4", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_short_run_writes_a_stable_diffusion_folder_the_substrate_loads(tmp_path):
    from diffseg_d2.diffusion import FrozenStableDiffusion, load_stable_diffusion
    from diffseg_d2.diffusion.attention import available_factors

    out = tmp_path / "micro"
    _train(out)
    summary = json.loads((out / "training.json").read_text())
    assert summary["settings"]["steps"] == 3 and summary["aux_signals"]
    assert "tools/train_microworld.py" in summary["command"]
    assert not (out / "train_state.pt").exists()
    sd = FrozenStableDiffusion(load_stable_diffusion(str(out)))
    assert sd.latent_factor == 4 and sd.unet.config.sample_size == 16
    assert available_factors(sd.unet, "cross") == [1, 2]
    assert abs(sd.vae.config.scaling_factor - 1.0) > 1e-6  # set from the latents' spread
    latents = sd.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.shape == (1, 4, 16, 16)


@pytest.mark.slow
def test_plain_run_has_no_auxiliary_signal(tmp_path):
    out = tmp_path / "plain"
    _train(out, "--align-weight", "0")
    summary = json.loads((out / "training.json").read_text())
    assert summary["aux_signals"] == [] and summary["final_losses"]["align"] == 0.0


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from diffseg_d2.microworld import train_diffusion as td

    settings = dict(vae_steps=2, vae_batch=4, steps=4, batch=4, checkpoint_every=2)
    torch.set_num_threads(1)
    td.train_micro_diffusion(tmp_path / "whole", td.DiffusionTrainingSettings(**settings))

    real_batch, calls = td.scene_batch, {"n": 0}

    def failing_batch(start, count):
        calls["n"] += 1
        if calls["n"] == 2 + 3:  # 2 VAE steps, then the third UNet step is interrupted
            raise KeyboardInterrupt
        return real_batch(start, count)

    monkeypatch.setattr(td, "scene_batch", failing_batch)
    with pytest.raises(KeyboardInterrupt):
        td.train_micro_diffusion(tmp_path / "cut", td.DiffusionTrainingSettings(**settings))
    assert (tmp_path / "cut" / "train_state.pt").is_file()
    monkeypatch.setattr(td, "scene_batch", real_batch)
    td.train_micro_diffusion(tmp_path / "cut", td.DiffusionTrainingSettings(**settings), resume=True)
    for part in ("unet", "text_encoder", "vae"):
        a = load_file(str(tmp_path / "whole" / part / "diffusion_pytorch_model.safetensors")) if part != "text_encoder" \
            else load_file(str(tmp_path / "whole" / part / "model.safetensors"))
        b = load_file(str(next((tmp_path / "cut" / part).glob("*.safetensors"))))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
