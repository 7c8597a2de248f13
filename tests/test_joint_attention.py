"""Exact, streamed read-outs of diffusion transformers' joint attention (SD3's MMDiT, FLUX.1): equal to the
materialised softmax of the same layer, on tiny random transformers of the real block structure, square
and non-square; the model's outputs unchanged by recording."""
import pytest
import torch

from diffseg_d2.diffusion.joint_attention import JointAttentionStore, joint_attention_layers, record_joint_attention
from diffseg_d2.diffusion.readouts import image_self_apply, image_to_text, joint_layout, text_to_image

TOKEN_INDEX = torch.tensor([[1, 2], [4, 0]])  # class 0: text tokens 1-2, class 1: token 4
TOKEN_WEIGHT = torch.tensor([[0.5, 0.5], [1.0, 0.0]])


def _explicit(query, key):
    """The (B, H, S, S) softmax, as attention-map tools materialise it."""
    return (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)


def _expected(probs, image, text, direction, per_element):
    """The read-out from the full probabilities: mean over the class word's tokens and heads."""
    K = TOKEN_INDEX.shape[0]
    out = []
    for k in range(K):
        b = k if per_element else 0
        cols = TOKEN_INDEX[k] + text.start
        if direction == "image_to_text":
            m = (probs[b][:, image][:, :, cols] * TOKEN_WEIGHT[k]).sum(-1)  # (H, N_img)
        else:
            m = (probs[b][:, cols][:, :, image] * TOKEN_WEIGHT[k][:, None]).sum(1)
        out.append(m.mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_streamed_readouts_equal_the_materialised_softmax(image_first, batch):
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 37, 6
    query = torch.randn(batch, 3, n_img + n_txt, 8, generator=g) * 2
    key = torch.randn(batch, 3, n_img + n_txt, 8, generator=g) * 2
    image, text = joint_layout(image_first, n_img, n_txt)
    probs = _explicit(query, key)
    scale = 8 ** -0.5
    got = image_to_text(query, key, image, text, TOKEN_INDEX, TOKEN_WEIGHT, scale, per_element=batch == 2)
    torch.testing.assert_close(got, _expected(probs, image, text, "image_to_text", batch == 2), rtol=1e-5, atol=1e-6)
    got = text_to_image(query, key, image, text, TOKEN_INDEX, TOKEN_WEIGHT, scale, per_element=batch == 2)
    torch.testing.assert_close(got, _expected(probs, image, text, "text_to_image", batch == 2), rtol=1e-5, atol=1e-6)
    maps = torch.rand(2, n_img, generator=g)
    refined = image_self_apply(query, key, image, maps, scale, per_element=batch == 2)
    # A batch of one pass per class refines each class by its own pass, else all by element 0's.
    expected = torch.stack([probs[k if batch == 2 else 0][:, image][:, :, image].mean(0) @ maps[k] for k in range(2)])
    torch.testing.assert_close(refined, expected, rtol=1e-5, atol=1e-6)


def test_more_columns_than_the_head_dimension_are_read_in_slices():
    """The thin matrix goes to the attention kernel in slices as wide as a head: 11 classes of 2 tokens (22
    one-hot columns) and 11 maps with heads of 8 are 3 and 2 slices; the result is the materialised one."""
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 2, 29, 8, generator=g) * 2, torch.randn(1, 2, 29, 8, generator=g) * 2
    image, text = joint_layout(False, 20, 9)
    index = torch.randint(0, 9, (11, 2), generator=g)
    weight = torch.full((11, 2), 0.5)
    probs = _explicit(query, key)[0]  # (H, S, S)
    expected = (probs[:, image][:, :, index + text.start] * weight).sum(-1).mean(0).transpose(0, 1)
    got = image_to_text(query, key, image, text, index, weight, 8 ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    maps = torch.rand(11, 20, generator=g)
    torch.testing.assert_close(image_self_apply(query, key, image, maps, 8 ** -0.5),
                               (probs[:, image][:, :, image].mean(0) @ maps.T).T, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- tiny real transformers
def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4)).eval()


def _flux_inputs(h, w, text=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, 8, generator=g), encoder_hidden_states=torch.randn(1, text, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3))


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()


def _sd35():
    """SD3.5's block structure: query / key RMS norms in every block, and blocks with a second attention
    (``attn2``: the image tokens alone) beside the joint one."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                 qk_norm="rms_norm", dual_attention_layers=(0,)).eval()


def _sd3_inputs(h, w, text=7):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, h, w, generator=g), encoder_hidden_states=torch.randn(1, text, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([500]))


MODELS = {
    "flux": (_flux, _flux_inputs, "diffusers.models.transformers.transformer_flux.dispatch_attention_fn"),
    "sd3": (_sd3, _sd3_inputs, "torch.nn.functional.scaled_dot_product_attention"),
    "sd3.5": (_sd35, _sd3_inputs, "torch.nn.functional.scaled_dot_product_attention"),
}


def _materialising(monkeypatch, target, captured):
    """Replace the layer's attention kernel by the explicit softmax, keeping every layer's probabilities."""
    module_name, attr = target.rsplit(".", 1)
    import importlib

    module = importlib.import_module(module_name)

    def explicit(query, key, value, attn_mask=None, *args, **kwargs):
        flux = module_name.endswith("transformer_flux")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value)) if flux else (query, key, value)
        probs = _explicit(q, k)
        captured.append(probs)
        out = probs @ v
        return out.transpose(1, 2) if flux else out

    monkeypatch.setattr(module, attr, explicit)


@pytest.mark.parametrize("shape", ["square", "non-square"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_recorded_readouts_of_every_block_equal_the_materialised_softmax(kind, shape, monkeypatch):
    """Double- and single-stream blocks (FLUX), joint blocks (SD3): the streamed image-to-text (and
    text-to-image) maps of each block equal the same reduction of that block's explicit (heads, N, N)
    probabilities; and the model's output is bit-identical with and without recording."""
    build, inputs, kernel = MODELS[kind]
    # FLUX: a grid of packed latent tokens; SD3: a latent that its 2x2 patches tile.
    size = {("flux", "square"): (4, 4), ("flux", "non-square"): (3, 5)}.get(
        (kind, shape), (8, 8) if shape == "square" else (6, 10))
    model = build()
    x = inputs(*size)
    layers = joint_attention_layers(model)
    assert layers and kind.startswith("sd3") == all(layers.values())
    if kind == "flux":
        assert any(n.startswith("single_transformer_blocks") for n in layers)
    text_len = x["encoder_hidden_states"].shape[1]
    n_img = size[0] * size[1] // (1 if kind == "flux" else 4)
    with torch.no_grad():
        plain = model(**x).sample
        stores = {}
        for direction in ("image_to_text", "text_to_image"):
            store = JointAttentionStore(TOKEN_INDEX, TOKEN_WEIGHT, direction)
            with record_joint_attention(model, store, list(layers), text_len):
                recorded = model(**x).sample
            assert torch.equal(recorded, plain), "recording changed the model's output"
            stores[direction] = store
        captured = []
        _materialising(monkeypatch, kernel, captured)
        model(**x)
    if kind == "sd3.5":  # its image-only attn2 ran too, and the joint layers normalise queries and keys
        assert any(p.shape[-1] == n_img for p in captured) and model.transformer_blocks[0].attn.norm_q is not None
    captured = [p for p in captured if p.shape[-1] == n_img + text_len]
    assert len(captured) == len(layers)
    for (name, image_first), probs in zip(layers.items(), captured):  # blocks run in this order
        image, text = joint_layout(image_first, n_img, text_len)
        for direction, store in stores.items():
            torch.testing.assert_close(store.layers[name], _expected(probs, image, text, direction, False),
                                       rtol=1e-5, atol=1e-5)


def test_refinement_from_kept_queries_and_keys(monkeypatch):
    model, x = _flux(), _flux_inputs(3, 5)
    layers = list(joint_attention_layers(model))
    store = JointAttentionStore(TOKEN_INDEX, TOKEN_WEIGHT, refine_blocks=frozenset(layers[-1:]))
    with torch.no_grad(), record_joint_attention(model, store, layers, 7):
        model(**x)
    captured = []
    _materialising(monkeypatch, MODELS["flux"][2], captured)
    with torch.no_grad():
        model(**x)
    image, _ = joint_layout(False, 15, 7)
    maps = store.maps()
    expected = (captured[-1][0][:, image][:, :, image].mean(0) @ maps.T).T
    torch.testing.assert_close(store.refine(maps), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no joint-attention blocks"):
        with record_joint_attention(model, store, ["transformer_blocks.9"], 7):
            pass
