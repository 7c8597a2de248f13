"""Half precision (MODEL.DIFFSEG.SD.DTYPE bfloat16 and float16) on CPU with the tiny presets: DiffSegmenter,
the FreeDA bank builder and ODISE's diffusion backbone stay finite and close to their float32 results, and the
attention accumulators stay float32 while the UNet runs in half precision.

``FrozenStableDiffusion`` applies SD.DTYPE bfloat16 on every device, so the bfloat16 cases run the config
key's own path. float16 it applies on CUDA only (on CPU its dtype policy, ``_apply``, keeps the parts float32):
for the float16 cases ``in_requested_dtype`` casts the parts itself, which is what that policy does on CUDA,
so that the half-precision code paths (casts at the UNet, VAE and text-encoder boundaries, half queries and
keys in the attention recorders, half features into the float32 projections) run on a CPU. It must come after
the model is built and moved: any later ``.to()`` of the model puts float16 parts back to float32 on CPU.

Where both dtypes measured the same number of epsilons (``torch.finfo(dtype).eps``: 2**-7 for bfloat16, 2**-10
for float16) the bound is in epsilons, one bound serving both: scores, label flips, features, generated images.
Quantities set by thresholds (noun masks, prototypes) or by conditioning (a gradient) get absolute bounds. Every
float32-vs-half difference quoted below was measured on an AMD EPYC CPU (AVX-512 with BF16, no FP16
instructions) with torch 2.14, one thread.

float16 needs no op that CPUs lack: every path runs. Its convolutions, though, have no fast CPU kernel here
(``aten::_slow_conv2d_forward``, about 10x the float32 time), so float16 cases use few steps and small inputs.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from diffseg_d2 import get_diffseg_cfg

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = os.path.join(ROOT, "configs", "tiny")
HALF = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: these tiny models gain nothing from more, and a second thread fighting another process for
    a small machine's cores made each forward pass up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_requested_dtype(diffusion):
    """The SD parts of ``diffusion`` (a ``FrozenStableDiffusion``) in its ``SD.DTYPE``: bfloat16 as the
    config made them, float16 cast here, as on CUDA."""
    if diffusion.requested_dtype == torch.bfloat16:
        assert diffusion.dtype == torch.bfloat16, "SD.DTYPE bfloat16 was not applied on CPU"
    for part in (diffusion.unet, diffusion.vae, diffusion.text_encoder):
        part.to(diffusion.requested_dtype)
    # Without this the comparisons below could pass comparing float32 with float32.
    assert diffusion.dtype == diffusion.requested_dtype
    return diffusion


# ----------------------------------------------------------------------------- DiffSegmenter
VOCAB = ["background", "person", "chair", "bottle", "dining table", "cat", "dog"]


def diffsegmenter(dtype: torch.dtype, conditioning: str):
    from detectron2.modeling import build_model

    # No category filter: it runs CLIP, which SD.DTYPE does not touch, and it could drop the classes compared.
    cfg = get_diffseg_cfg(os.path.join(TINY, "diffsegmenter.yaml"), [
        "DATASETS.TEST", "()", "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False",
        "MODEL.DIFFSEG.CONDITIONING", conditioning, "MODEL.DIFFSEG.SD.DTYPE", DTYPE_NAMES[dtype],
    ])
    model = build_model(cfg).eval()
    in_requested_dtype(model.diffusion)
    return model


@pytest.fixture(scope="module")
def sample_input():
    from diffseg_d2.data.datasets.register_sample import sample_image_path
    from diffseg_d2.data.image import read_image_rgb

    rgb = read_image_rgb(sample_image_path())  # (375, 500, 3), a real VOC photo
    return {"image": torch.as_tensor(rgb).permute(2, 0, 1), "height": 150, "width": 200, "vocabulary": VOCAB}


@pytest.fixture(scope="module")
def float32_scores(sample_input):
    """DiffSegmenter's float32 ``sem_seg`` (K, 150, 200) per conditioning."""
    return {c: diffsegmenter(torch.float32, c)([sample_input])[0]["sem_seg"] for c in ("per_class", "shared")}


@pytest.mark.parametrize("conditioning", ["per_class", "shared"])
@pytest.mark.parametrize("dtype", HALF)
def test_diffsegmenter_in_half_precision_is_close_to_float32(dtype, conditioning, sample_input, float32_scores):
    # per_class: each class refined with its own pass's self-attention (half queries and keys kept in the
    # store); shared: one carrier pass, class prompts read out against it, self-attention summed as it runs.
    scores = diffsegmenter(dtype, conditioning)([sample_input])[0]["sem_seg"]
    reference = float32_scores[conditioning]
    assert scores.dtype == torch.float32 and scores.shape == reference.shape == (len(VOCAB), 150, 200)
    assert torch.isfinite(scores).all()
    assert not torch.equal(scores, reference)  # the half-precision parts did run
    # Scores are per-class min-max normalised maps in [0, 1] (background: 0.4). Measured max |half - float32|:
    # bfloat16 0.037 (4.7 eps) per_class, 0.020 (2.6 eps) shared; float16 0.0026 (2.7 eps) per_class,
    # 0.0031 (3.1 eps) shared. Bound: 12 eps.
    assert (scores - reference).abs().max() <= 12 * eps(dtype)
    # The random weights give nearly flat maps whose top two scores are often within a few eps, so the label
    # map flips at some pixels (always where the float32 top-two margin is under 0.025). Measured share of
    # flipped pixels: bfloat16 8.6% (11 eps) per_class, 3.0% (3.9 eps) shared; float16 0.71% (7.3 eps)
    # per_class, 0.43% (4.4 eps) shared. Bound: 25 eps (bfloat16 19.5%, float16 2.4%).
    flipped = (scores.argmax(0) != reference.argmax(0)).float().mean()
    assert flipped <= 25 * eps(dtype)


# ----------------------------------------------------------------------------- attention accumulators
@pytest.mark.parametrize("dtype", HALF)
def test_attention_accumulators_stay_float32_under_a_half_precision_unet(dtype):
    from diffseg_d2.diffusion import (
        AttentionStore,
        FrozenStableDiffusion,
        available_factors,
        load_stable_diffusion,
        record_attention,
    )

    d = in_requested_dtype(FrozenStableDiffusion(load_stable_diffusion("tiny"), DTYPE_NAMES[dtype]))
    context = d.encode_text(d.tokenize(["a photograph of a cat", "a photograph of a dog"]))  # (2, L, D)
    assert context.dtype == dtype
    latents = torch.randn(2, d.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    cross, self_ = available_factors(d.unet, "cross"), available_factors(d.unet, "self")
    token_index, token_weight = torch.tensor([[5], [5]]), torch.ones(2, 1)  # "cat", "dog" after bos + 4 words
    summed = AttentionStore((16, 16), token_index, token_weight)  # self-attention summed as the layers run
    own = AttentionStore((16, 16), token_index, token_weight, own_self_attention=True)  # queries, keys kept
    for store in (summed, own):
        with record_attention(d.unet, store, cross, self_):
            d.unet_forward(latents, 100, context)

    for factor in cross:
        for store in (summed, own):
            assert store.cross_sum(factor).dtype == store.cross_maps(factor).dtype == torch.float32
            maps = store.cross_maps(factor)  # mean softmax mass on one token: a probability
            assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    for factor in self_:
        attn = summed.self_map(factor)  # (N, N), each row the mean of softmax rows
        assert attn.dtype == torch.float32
        # Rows sum to 1 to float32 precision. Measured largest |row sum - 1|: 2e-7 with the float32
        # accumulator; 2e-3 with a bfloat16 one and 2.5e-4 with a float16 one put in its place.
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[0]), atol=1e-5, rtol=0)
        c = torch.rand(2, attn.shape[0], generator=torch.Generator().manual_seed(1))
        refined = own.refine_own(factor, c)
        assert refined.dtype == torch.float32 and torch.isfinite(refined).all()
        # Each row of the (N, N) maps is a distribution, so refining a map averages it: within [min, max].
        assert (refined >= c.min(1, keepdim=True).values - 1e-5).all()
        assert (refined <= c.max(1, keepdim=True).values + 1e-5).all()


# ----------------------------------------------------------------------------- FreeDA bank builder
CAPTION_INDEX, CAPTION = 2, "a cat sitting on a chair next to a potted plant"


def bank_builder(dtype: torch.dtype):
    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    cfg = get_diffseg_cfg(os.path.join(TINY, "freeda.yaml"), [
        "MODEL.DIFFSEG.SD.DTYPE", DTYPE_NAMES[dtype], "MODEL.DIFFSEG.FREEDA.BUILD.STEPS", "2",
        "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", os.path.join(TINY, "freeda_nouns.txt"),
    ])
    builder = PrototypeBankBuilder.from_config(cfg)
    in_requested_dtype(builder.diffusion)
    return builder


@pytest.fixture(scope="module")
def float32_rows():
    return bank_builder(torch.float32).caption_prototypes(CAPTION_INDEX, CAPTION)


@pytest.mark.parametrize("dtype", HALF)
def test_bank_rows_in_half_precision_are_close_to_float32(dtype, float32_rows):
    rows = bank_builder(dtype).caption_prototypes(CAPTION_INDEX, CAPTION)
    ref = float32_rows
    assert rows.nouns == ref.nouns == ["cat", "chair", "potted plant"]
    assert rows.prototypes.dtype == torch.float32 and torch.isfinite(rows.prototypes).all()
    torch.testing.assert_close(rows.prototypes.norm(dim=-1), torch.ones(3))
    assert torch.equal(rows.keys, ref.keys)  # CLIP keys: SD.DTYPE does not reach CLIP
    assert not torch.equal(rows.image, ref.image)  # the half-precision generation did run
    # The generated image (two DDIM steps, [0, 255]) drifts by rounding alone: measured mean |half - float32|
    # 1.09 (139 eps) in bfloat16, 0.133 (136 eps) in float16. Bound: 400 eps.
    assert (rows.image - ref.image).abs().mean() <= 400 * eps(dtype)
    # Noun masks (maps binarised at 0.4) flip at a few of the 16x16 cells: measured 0.65% (bfloat16),
    # 0.39% (float16). Bound: 3%.
    assert (rows.masks != ref.masks).float().mean() <= 0.03
    # Prototypes (unit DINOv2 means over the masks; DINOv2 stays float32) move with those cells: measured
    # cosine to float32 >= 0.99947 (bfloat16), >= 0.99978 (float16). Bound: 0.995, about 10x the
    # measured 1 - cos.
    assert (rows.prototypes * ref.prototypes).sum(-1).min() >= 0.995


# ----------------------------------------------------------------------------- ODISE backbone
def odise_backbone(dtype: torch.dtype):
    from detectron2.modeling import build_backbone

    cfg = get_diffseg_cfg(os.path.join(TINY, "odise.yaml"), ["MODEL.DIFFSEG.SD.DTYPE", DTYPE_NAMES[dtype]])
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    # The captioner's gates start at 0 (it adds nothing); open them so its conditioning and time offset
    # reach the half-precision UNet.
    with torch.no_grad():
        backbone.captioner.gate.normal_(generator=torch.Generator().manual_seed(1))
        backbone.captioner.time_gate.normal_(generator=torch.Generator().manual_seed(2))
    in_requested_dtype(backbone.diffusion)
    return backbone


@pytest.fixture(scope="module")
def odise_input():
    # 128 x 192 with 128-pixel windows: two overlapping windows, so the stitching runs too.
    return torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def float32_odise(odise_input):
    backbone = odise_backbone(torch.float32)
    with torch.no_grad():
        return backbone, backbone(odise_input)


@pytest.mark.parametrize("dtype", HALF)
def test_odise_features_in_half_precision_are_close_to_float32(dtype, odise_input, float32_odise):
    reference_backbone, reference = float32_odise
    backbone = odise_backbone(dtype)
    # Same trainable parts (projections, captioner) as the float32 backbone: only the SD dtype differs.
    trainable = backbone.state_dict()
    assert trainable.keys() == reference_backbone.state_dict().keys()
    for k, v in reference_backbone.state_dict().items():
        assert torch.equal(trainable[k], v), k
    with torch.no_grad():
        features = backbone(odise_input)
    assert list(features) == list(reference) == ["res2", "res3", "res4", "res5"]
    for level, f in features.items():
        ref = reference[level]
        assert f.dtype == torch.float32 and f.shape == ref.shape  # the projections stay float32
        assert torch.isfinite(f).all()
        assert not torch.equal(f, ref)
        # Relative L2 error, measured over the four levels: bfloat16 0.020 .. 0.031 (2.6 .. 4.0 eps),
        # float16 0.0024 .. 0.0038 (2.4 .. 3.9 eps). Bound: 12 eps.
        assert (f - ref).norm() / ref.norm() <= 12 * eps(dtype), level


def captioner_gate_gradient(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """Gradient of a loss on the backbone's features with respect to the captioner's gate (1, L, D)."""
    backbone = odise_backbone(dtype)
    features = backbone(x)
    sum(F.mse_loss(f, torch.zeros_like(f)) for f in features.values()).backward()
    assert all(p.grad is None for p in backbone.diffusion.parameters())  # the SD parts stay frozen
    return backbone.captioner.gate.grad


@pytest.fixture(scope="module")
def float32_gate_gradient(odise_input):
    return captioner_gate_gradient(torch.float32, odise_input)


@pytest.mark.parametrize("dtype", HALF)
def test_odise_captioner_trains_through_a_half_precision_unet(dtype, odise_input, float32_gate_gradient):
    """Training backpropagates from the features through the frozen half-precision UNet into the captioner."""
    grad = captioner_gate_gradient(dtype, odise_input)
    assert grad is not None and grad.dtype == torch.float32
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # This gradient is ill-conditioned, not the half-precision backward inaccurate: float32 itself is
    # 90 eps (relative L2) off a float64 run, and the UNet's own gradient with respect to its text
    # conditioning is within 2 eps (bfloat16) and 6 eps (float16) of float64. Measured relative L2 error
    # to float32: bfloat16 0.21, float16 0.12 (cosines 0.980 and 0.994). Bound: 0.5; a missing or wrong
    # gradient path gives 1 (zero) or about 1.4 (unrelated).
    error = float((grad - float32_gate_gradient).norm() / float32_gate_gradient.norm())
    assert error <= 0.5, error
