"""The ConceptAttention read-out of FLUX (concept tokens through the text stream's weights, maps in the
attention-output space): the model's outputs unchanged, and the maps equal to what the blocks' own attention
modules compute when the concepts are their text input."""
import pytest
import torch
from torch import nn

from diffseg_d2.diffusion import load_diffusion
from diffseg_d2.diffusion.concept_attention import ConceptAttentionStore, record_concept_attention

CONCEPTS = ["dog", "sofa", "sky"]


@pytest.fixture(scope="module")
def flux(_session_cache):
    return load_diffusion("tiny-flux")


def _concepts(d):
    states, pooled = d.concept_embeddings(CONCEPTS)
    # each concept's first T5 state, encoded on its own; the pooled vector of the words joined
    first = d.encode_text(d.tokenize(["sofa"])).tokens[0, d.text_layout.segments["t5"].start]
    torch.testing.assert_close(states[1], first)
    torch.testing.assert_close(pooled, d.encode_text(d.tokenize(["dog sofa sky"])).pooled[0])
    return states, pooled


def _inputs(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 16, 12, generator=g)  # non-square: 8 x 6 tokens
    return latents, d.encode_text(d.tokenize(["a dog on a sofa"]))


def test_recording_concepts_leaves_the_output_bit_identical(flux):
    d = flux
    latents, context = _inputs(d)
    plain = d.denoise(latents, 500, context)
    states, pooled = _concepts(d)
    store = ConceptAttentionStore(states, pooled, frozenset({"transformer_blocks.0", "transformer_blocks.1"}))
    with record_concept_attention(d.transformer, store):
        recorded = d.denoise(latents, 500, context)
    assert torch.equal(plain, recorded)
    maps = store.maps()
    assert maps.shape == (3, 48) and store.count == 2
    torch.testing.assert_close(maps.sum(0), torch.ones(48))  # a softmax over the concepts per image token


def test_maps_are_the_blocks_attention_outputs_with_the_concepts_as_text(flux):
    """Independent route: each block's own attention module, its output projections set to identity, run on
    (image, text) and on (image, concepts) with the concepts' rotary positions at zero; the concept stream
    updated as the text stream is; block 1's map read after block 0 has updated the concepts."""
    d = flux
    t = d.transformer
    latents, context = _inputs(d, 1)
    states, pooled = _concepts(d)
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, k), with_kwargs=True)
             for i, block in enumerate(t.transformer_blocks)]
    calls = {}
    hooks.append(t.register_forward_pre_hook(lambda m, a, k: calls.__setitem__("kwargs", k), with_kwargs=True))
    store = ConceptAttentionStore(states, pooled, frozenset({"transformer_blocks.1"}))
    try:
        with record_concept_attention(t, store):
            d.denoise(latents, 300, context)
    finally:
        for h in hooks:
            h.remove()
    kw = calls["kwargs"]
    with torch.no_grad():
        temb = t.time_text_embed(kw["timestep"] * 1000, kw["guidance"] * 1000, pooled[None])
        stream = t.context_embedder(states[None])
        ids = torch.cat([torch.zeros(len(CONCEPTS), 3), kw["img_ids"]])
        concept_rope = t.pos_embed(ids)
        for i, block in enumerate(t.transformer_blocks):
            k = seen[i]
            attn = block.attn
            norm_x = block.norm1(k["hidden_states"], emb=k["temb"])[0]
            norm_e = block.norm1_context(k["encoder_hidden_states"], emb=k["temb"])[0]
            norm_c, gate, shift, scale, gate_mlp = block.norm1_context(stream, emb=temb)
            out, add_out = attn.to_out[0], attn.to_add_out
            attn.to_out[0], attn.to_add_out = nn.Identity(), nn.Identity()
            try:
                image_out, _ = attn(hidden_states=norm_x, encoder_hidden_states=norm_e, image_rotary_emb=k["image_rotary_emb"])
                _, concept_out = attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=concept_rope)
            finally:
                attn.to_out[0], attn.to_add_out = out, add_out
            if i == 1:
                expected = (concept_out[0] @ image_out[0].T).softmax(0)
            stream = stream + gate.unsqueeze(1) * add_out(concept_out)
            normed = block.norm2_context(stream) * (1 + scale[:, None]) + shift[:, None]
            stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    torch.testing.assert_close(store.maps(), expected, rtol=1e-4, atol=1e-6)


def test_concept_attention_is_refused_on_other_blocks_and_models(_session_cache):
    d = load_diffusion("tiny-flux")
    states, pooled = _concepts(d)
    with pytest.raises(ValueError, match="single_transformer_blocks.0.*is not one of"):
        with record_concept_attention(d.transformer, ConceptAttentionStore(states, pooled,
                                                                           frozenset({"single_transformer_blocks.0"}))):
            pass
    sd3 = load_diffusion("tiny-sd3")
    with pytest.raises(ValueError, match="FLUX's double-stream blocks; this transformer is a SD3Transformer2DModel"):
        with record_concept_attention(sd3.transformer, ConceptAttentionStore(states, pooled, frozenset())):
            pass


def test_diffsegmenter_reads_concept_attention_as_an_option(monkeypatch):
    """READOUT concept: one pass on the empty prompt, the class names as concepts; each class's map is its
    min-max normalised concept map, refined by the chosen block's image-to-image attention."""
    import numpy as np
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.diffusion import JointAttentionStore, minmax_per_map
    from diffseg_d2.diffusion import concept_attention as ca

    cfg = get_diffseg_cfg("configs/tiny/diffsegmenter.yaml", [
        "MODEL.DIFFSEG.SD.WEIGHTS", "tiny-flux", "DATASETS.TEST", "()", "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False",
        "MODEL.DIFFSEG.TRANSFORMER.READOUT", "concept", "MODEL.DIFFSEG.TRANSFORMER.REFINE_BLOCKS", "['transformer_blocks.0']"])
    model = build_model(cfg).eval()
    assert model.transformer_blocks == ("transformer_blocks.0", "transformer_blocks.1")  # every double-stream block
    stores, kept = [], []
    original = ca.ConceptAttentionStore.maps
    monkeypatch.setattr(ca.ConceptAttentionStore, "maps", lambda self: (stores.append(self), original(self))[1])
    refine = JointAttentionStore.refine
    monkeypatch.setattr(JointAttentionStore, "refine", lambda self, maps: (kept.append(self._kept), refine(self, maps))[1])
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    with torch.no_grad():
        maps = model.class_maps(image, CONCEPTS, [0, 1, 2])
    assert maps.shape == (3, 8, 8) and len(stores) == 1 and stores[0].count == 2 and len(kept[0]) == 1
    q, k, image_range = kept[0][0]
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[0][:, image_range][:, :, image_range].mean(0)
    expected = (probs @ minmax_per_map(original(stores[0])).T).T
    torch.testing.assert_close(maps.flatten(1), expected, rtol=1e-5, atol=1e-6)
    cfg.defrost()
    cfg.MODEL.DIFFSEG.SD.WEIGHTS = "tiny-sd3"
    with pytest.raises(ValueError, match="READOUT concept reads FLUX's double-stream blocks; Stable Diffusion 3"):
        build_model(cfg)
