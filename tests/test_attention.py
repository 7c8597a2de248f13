"""The attention recorder against a direct softmax(QK^T / sqrt(d)) on the tiny UNet."""
import pytest
import torch

from diffseg_d2.diffusion import AttentionStore, attention_layers, build_class_prompts, record_attention
from diffseg_d2.diffusion import attention as attention_module

NAMES = ["person", "potted plant", "tv monitor"]


def _capture_inputs(unet):
    """Forward pre-hooks that keep every attention layer's (hidden_states, context) inputs."""
    captured, handles = {}, []
    modules = dict(unet.named_modules())
    for name in attention_layers(unet):
        module_name = name[: -len(".processor")]

        def hook(mod, args, kwargs, module_name=module_name):
            captured[module_name] = (args[0], kwargs.get("encoder_hidden_states"))

        handles.append(modules[module_name].register_forward_pre_hook(hook, with_kwargs=True))
    return captured, handles


def _probs(attn, hidden, context):
    """softmax(QK^T / sqrt(d)) per head: (B, H, N, L)."""
    q = attn.to_q(hidden)
    k = attn.to_k(context)
    b, h = q.shape[0], attn.heads
    d = q.shape[-1] // h
    q = q.view(b, -1, h, d).transpose(1, 2)
    k = k.view(k.shape[0], -1, h, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)


@pytest.fixture(scope="module")
def setup(tiny_sd):
    torch.manual_seed(0)
    prompts = build_class_prompts(tiny_sd.tokenizer, NAMES, "a photograph of {}.")
    context = tiny_sd.encode_text(prompts.input_ids).tokens  # (K, L, D)
    latents = torch.randn(1, 4, 16, 16)
    return tiny_sd, prompts, context, latents


def _expected_cross(unet, captured, prompts, factor, per_class, class_context=None):
    layers = [n[: -len(".processor")] for n, (kind, f) in attention_layers(unet).items() if kind == "cross" and f == factor]
    modules = dict(unet.named_modules())
    total = 0
    for name in layers:
        attn = modules[name]
        hidden, context = captured[name]
        if per_class:
            probs = _probs(attn, hidden, context)  # (K, H, N, L): element k is class k
        else:
            probs = torch.cat([_probs(attn, hidden[:1], class_context[k : k + 1]) for k in range(len(NAMES))])
        maps = []
        for k in range(len(NAMES)):
            n = int((prompts.token_weight[k] > 0).sum())
            idx = prompts.token_index[k, :n]
            maps.append(probs[k][:, :, idx].mean(-1).mean(0))  # mean over sub-words, then heads
        total = total + torch.stack(maps)
    return total / len(layers)


def test_attention_layers_are_classified_by_kind_and_factor(tiny_sd):
    layers = attention_layers(tiny_sd.unet)
    kinds = {(k, f) for k, f in layers.values()}
    # tiny UNet: cross and self attention at factors 1 and 2 (down and up blocks) and 4 (mid block)
    assert kinds == {("self", 1), ("self", 2), ("self", 4), ("cross", 1), ("cross", 2), ("cross", 4)}


def test_per_class_recording_matches_direct_softmax(setup):
    sd, prompts, context, latents = setup
    unet = sd.unet
    k = len(NAMES)
    store = AttentionStore((16, 16), prompts.token_index, prompts.token_weight)
    captured, handles = _capture_inputs(unet)
    try:
        with torch.no_grad():
            plain = sd.unet_forward(latents.expand(k, -1, -1, -1), 100, context)
            with record_attention(unet, store, cross_factors=[1, 2, 4], self_factors=[1]):
                recorded = sd.unet_forward(latents.expand(k, -1, -1, -1), 100, context)
    finally:
        for h in handles:
            h.remove()
    # the recorder computes each layer's output like the default processor
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for factor in (1, 2, 4):
            expected = _expected_cross(unet, captured, prompts, factor, per_class=True)
            h, w = store.resolution(factor)
            got = store.cross_maps(factor)
            assert got.shape == (k, h, w)
            torch.testing.assert_close(got.flatten(1), expected, atol=1e-6, rtol=1e-4)
        # self-attention at factor 1: mean over layers, heads and batch
        modules = dict(unet.named_modules())
        names = [n[: -len(".processor")] for n, (kd, f) in attention_layers(unet).items() if kd == "self" and f == 1]
        expected_self = sum(
            _probs(modules[n], captured[n][0], captured[n][0]).mean(dim=(0, 1)) for n in names
        ) / len(names)
        got_self = store.self_map(1)
        assert got_self.shape == (256, 256)
        torch.testing.assert_close(got_self, expected_self, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(got_self.sum(-1), torch.ones(256), atol=1e-5, rtol=0)


def test_shared_readout_matches_direct_softmax_against_class_keys(setup, monkeypatch):
    sd, prompts, context, latents = setup
    unet = sd.unet
    carrier = sd.encode_text(sd.tokenize(["a photograph of person, potted plant, tv monitor."]))
    monkeypatch.setattr(attention_module, "_CHUNK_BYTES", 1024)  # force the chunked path
    store = AttentionStore((16, 16), prompts.token_index, prompts.token_weight, readout_context=context)
    captured, handles = _capture_inputs(unet)
    try:
        with torch.no_grad(), record_attention(unet, store, cross_factors=[1, 2, 4]):
            sd.unet_forward(latents, 100, carrier)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for factor in (1, 2, 4):
            expected = _expected_cross(unet, captured, prompts, factor, per_class=False, class_context=context)
            torch.testing.assert_close(store.cross_maps(factor).flatten(1), expected, atol=1e-6, rtol=1e-4)


def test_only_chosen_layers_are_recorded_and_originals_come_back(setup):
    sd, prompts, context, latents = setup
    unet = sd.unet
    before = dict(unet.attn_processors)
    with torch.no_grad():
        plain = sd.unet_forward(latents, 100, context[:1])
    store = AttentionStore((16, 16), prompts.token_index, prompts.token_weight, readout_context=context)
    with record_attention(unet, store, cross_factors=[2], self_factors=[1]):
        with torch.no_grad():
            recorded = sd.unet_forward(latents, 100, context[:1])
        # Layers not chosen run their original processor.
        for name, proc in unet.attn_processors.items():
            assert proc.original is before[name], name
    assert store.cross_factors() == [2]
    assert sorted(store._self) == [1]
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    assert all(unet.attn_processors[n] is p for n, p in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(unet, store, cross_factors=[1]):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_asking_for_a_missing_factor_is_an_error(setup):
    sd, prompts, context, _ = setup
    store = AttentionStore((16, 16), prompts.token_index, prompts.token_weight)
    with pytest.raises(ValueError, match="factors \\[8\\]"):
        with record_attention(sd.unet, store, cross_factors=[8]):
            pass


def test_store_accumulates_without_per_layer_copies():
    store = AttentionStore((4, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    for value in (1.0, 3.0):
        store.add_cross(1, slice(0, 2), torch.full((2, 16), value))
    store.add_self(1, torch.eye(16) * 4, count=4)
    assert len(store._cross) == 1 and store._cross[1].shape == (2, 16)
    torch.testing.assert_close(store.cross_maps(1), torch.full((2, 4, 4), 2.0))
    torch.testing.assert_close(store.self_map(1), torch.eye(16))
