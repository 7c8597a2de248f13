"""The micro-world diffusion-transformer trainer: its tokenizers, the alignment read-out, a short run of the
real command loaded back as an SD3-family substrate, resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_world_words_are_one_t5_piece_each_and_other_words_are_spelt_out():
    import transformers

    from diffseg_d2.microworld.train_transformer import WORLD_WORDS
    from diffseg_d2.pretrained.diffusion_transformers import t5_word_tokenizer

    tok = t5_word_tokenizer(transformers, WORLD_WORDS, model_max_length=24)
    pieces = tok.convert_ids_to_tokens(tok("a red circle, a blue square and a green triangle").input_ids)
    assert pieces == ["\u2581a", "\u2581red", "\u2581circle", ",", "\u2581a", "\u2581blue", "\u2581square", "\u2581and",
                      "\u2581a", "\u2581green", "\u2581triangle", "</s>"]
    assert len(tok("dog", add_special_tokens=False).input_ids) > 1  # not a world word: characters
    assert tok.model_max_length == 24


def test_text_lengths_follow_the_tokenizers_but_never_exceed_the_pipeline_default():
    from types import SimpleNamespace

    from diffseg_d2.pretrained.diffusion_transformers import TRANSFORMER_FAMILIES

    clip, t5_512, t5_24 = (SimpleNamespace(model_max_length=n) for n in (77, 512, 24))
    assert TRANSFORMER_FAMILIES["sd3"].text_lengths([clip], t5_512) == (77, 256)
    assert TRANSFORMER_FAMILIES["flux-dev"].text_lengths([clip], t5_512) == (0, 512)
    assert TRANSFORMER_FAMILIES["sd3"].text_lengths([SimpleNamespace(model_max_length=24)], t5_24) == (24, 24)


def test_alignment_reader_leaves_the_output_unchanged_and_reads_each_words_text_attention():
    from diffseg_d2.diffusion.joint_attention import sd3_query_key
    from diffseg_d2.microworld.train_transformer import MICRO_SD3, AlignmentReader

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**{**MICRO_SD3["transformer"], "num_layers": 2})
    x, text = torch.randn(2, 4, 8, 12), torch.randn(2, 6, 96)
    inputs = dict(hidden_states=x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=text,
                  pooled_projections=torch.randn(2, 96), return_dict=False)
    plain = model(**inputs)[0]
    seen = []
    block = model.transformer_blocks[0].attn
    block.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    reader = AlignmentReader(model)
    reader.requests = [None, (torch.tensor([[1, 2], [4, 0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))]
    read = model(**inputs)[0]
    assert torch.equal(plain, read)
    assert [b for b, _, _ in reader.maps] == [1, 1]  # one entry per block for the one request
    _, n, maps = reader.maps[0]
    assert n == 8 * 12 and maps.shape == (2, n) and maps.requires_grad
    # The first block's read-out, recomputed: image queries' softmax over the text keys, word tokens, heads.
    q, k = sd3_query_key(block, seen[0]["hidden_states"], seen[0]["encoder_hidden_states"])
    probs = (q[1, :, :n] @ k[1, :, n:].transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(0)  # (N, 6)
    expected = torch.stack([(probs[:, 1] + probs[:, 2]) / 2, probs[:, 4]])
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


def _train(out, *extra):
    cmd = [sys.executable, "tools/train_microworld.py", "--threads", "1", "transformer", "--output", str(out),
           "--steps", "2", "--batch", "4", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_short_run_writes_an_sd3_folder_the_substrate_loads_with_short_text(tmp_path):
    from diffseg_d2.diffusion import load_diffusion
    from diffseg_d2.diffusion.frozen_transformer import FrozenDiffusionTransformer

    out = tmp_path / "micro_sd3"
    _train(out)
    summary = json.loads((out / "training.json").read_text())
    assert summary["settings"]["steps"] == 2 and summary["aux_signals"] and summary["train_seconds"] > 0
    assert not (out / "train_state.pt").exists()
    sd = load_diffusion(str(out))
    assert isinstance(sd, FrozenDiffusionTransformer) and sd.family.name == "sd3"
    layout = sd.text_layout
    assert layout.length == 48 and layout.segments == {"clip": slice(0, 24), "t5": slice(24, 48)}
    prompts = sd.class_prompts(["red", "circle"], "a {}")
    ids = prompts.input_ids.sequence
    t5_ids = sd.t5_tokenizer(["red", "circle"], add_special_tokens=False).input_ids
    for row, word_ids in enumerate(t5_ids):  # the class word's position holds its one T5 piece
        assert ids[row, prompts.token_index[row, 0]].item() == word_ids[0]
    latents = sd.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.shape == (1, 4, 16, 16) and sd.image_tokens(latents.shape) == 256
    context = sd.encode_text(prompts.input_ids)
    assert context.tokens.shape == (2, 48, 96) and context.pooled.shape == (2, 96)
    assert sd.denoise(latents.expand(2, -1, -1, -1), 500, context).shape == (2, 4, 16, 16)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from diffseg_d2.microworld import train_transformer as tt

    settings = dict(steps=4, batch=4, checkpoint_every=2, warmup_steps=2)
    torch.set_num_threads(1)
    tt.train_micro_transformer(tmp_path / "whole", tt.TransformerTrainingSettings(**settings))
    real_batch, calls = tt.scene_batch, {"n": 0}

    def failing_batch(start, count):
        calls["n"] += 1
        if calls["n"] == 3:  # the third step is interrupted, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_batch(start, count)

    monkeypatch.setattr(tt, "scene_batch", failing_batch)
    with pytest.raises(KeyboardInterrupt):
        tt.train_micro_transformer(tmp_path / "cut", tt.TransformerTrainingSettings(**settings))
    assert (tmp_path / "cut" / "train_state.pt").is_file()
    monkeypatch.setattr(tt, "scene_batch", real_batch)
    tt.train_micro_transformer(tmp_path / "cut", tt.TransformerTrainingSettings(**settings), resume=True)
    for part in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a = load_file(str(next((tmp_path / "whole" / part).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "cut" / part).glob("*.safetensors"))))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
