"""Security and reliability: weights-only loading on every route, exact loads, concurrent calls,
non-finite results and out-of-range settings (README, "Security and reliability")."""
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CodePayload  # tests/conftest.py


ROOT = Path(__file__).resolve().parent.parent
TINY_DIFFSEG = str(ROOT / "configs" / "tiny" / "diffsegmenter.yaml")
TINY_ODISE = str(ROOT / "configs" / "tiny" / "odise.yaml")
MICRO_DIFFSEG = str(ROOT / "configs" / "micro" / "diffsegmenter.yaml")
PANOPTIC_FPN = str(ROOT / "projects" / "diffusion_panoptic_fpn" / "configs" / "tiny.yaml")
TINY_FREEDA = str(ROOT / "configs" / "tiny" / "freeda.yaml")
MICRO_DAAM = str(ROOT / "configs" / "micro" / "daam.yaml")
# One config per model of the package that detectron2 can build: the meta-architectures, and the
# diffusion backbone under a stock architecture.
EVERY_MODEL = {"DiffSegmenter": TINY_DIFFSEG, "DAAM": MICRO_DAAM, "FreeDA": TINY_FREEDA, "ODISE": TINY_ODISE,
               "DiffusionUNetBackbone": PANOPTIC_FPN, "build_diffusion_unet_fpn_backbone": PANOPTIC_FPN}


def _cfg(path, *opts):
    from diffseg_d2 import get_diffseg_cfg

    return get_diffseg_cfg(path, list(opts))


# ------------------------------------------------------------------ 1. checkpoints
@pytest.fixture
def crafted(tmp_path):
    """A pickle and a zip-format .pth checkpoint that each run code when fully unpickled."""
    import pickle

    marker = tmp_path / "PAYLOAD_RAN"
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": CodePayload(marker)}}))
    pth = tmp_path / "model.pth"
    torch.save({"model": {"w": CodePayload(marker)}}, pth)
    return marker, pkl, pth


def test_every_registered_model_of_the_package_is_covered_below():
    """A model added to the package must be added to EVERY_MODEL, and so to the tests below."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    import diffseg_d2  # noqa: F401  (registers the package's models)

    ours = {name for registry in (META_ARCH_REGISTRY, BACKBONE_REGISTRY) for name, obj in registry
            if obj.__module__.startswith("diffseg_d2")}
    assert ours == set(EVERY_MODEL)


@pytest.mark.parametrize("config", sorted(set(EVERY_MODEL.values())))
def test_no_route_unpickles_a_crafted_checkpoint(config, crafted):
    """DefaultPredictor and a stock DetectionCheckpointer (the example project's route) both build
    the model before they open MODEL.WEIGHTS: the build refuses the file, its code never runs."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from diffseg_d2.checkpoint_safety import UnsafeCheckpointError

    marker, pkl, pth = crafted
    for weights, expected in ((pkl, "is a pickle file"), (pth, "cannot be read weights-only")):
        cfg = _cfg(config, "MODEL.WEIGHTS", str(weights))
        with pytest.raises(UnsafeCheckpointError, match=rf"MODEL\.WEIGHTS = .*{weights.name}.*{expected}"):
            DefaultPredictor(cfg)
        with pytest.raises(UnsafeCheckpointError):
            DetectionCheckpointer(build_model(cfg)).load(cfg.MODEL.WEIGHTS)
        assert not marker.exists(), f"the payload of {weights.name} ran"


def test_stock_checkpointer_refuses_a_checkpoint_of_another_model(tmp_path):
    """A checkpoint of another architecture through detectron2's own checkpointer (fvcore would only
    warn and predict with an untrained head) and through a plain load_state_dict(strict=False)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from diffseg_d2.checkpoint_safety import CheckpointMismatchError

    alien = tmp_path / "alien.pth"
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 4)}}, alien)
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint .* not in this model"):
        DefaultPredictor(_cfg(TINY_ODISE, "MODEL.WEIGHTS", str(alien)))
    # A training-free model has nothing to load: any key is one too many.
    with pytest.raises(CheckpointMismatchError, match=r"not in this model \(1\)"):
        DefaultPredictor(_cfg(TINY_DIFFSEG, "MODEL.WEIGHTS", str(alien)))

    # The diffusion backbone under detectron2's PanopticFPN: its own keys must all be there.
    model = build_model(_cfg(PANOPTIC_FPN))
    state = {k: v for k, v in model.state_dict().items() if ".projections." not in k}
    torch.save({"model": state}, tmp_path / "no_projections.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="DiffusionUNetBackbone.*missing from the checkpoint"):
        DetectionCheckpointer(model).load(str(tmp_path / "no_projections.pth"))
    with pytest.raises(CheckpointMismatchError):
        model.load_state_dict(state, strict=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint changed weights"
    # ... and the whole state dict still loads through the stock checkpointer.
    torch.save({"model": before}, tmp_path / "full.pth")
    DetectionCheckpointer(model).load(str(tmp_path / "full.pth"))


# ------------------------------------------------------------------ 2. concurrent calls
def _scenes(n):
    from diffseg_d2.microworld.scenes import render_scene

    return [np.ascontiguousarray(render_scene(seed).image[:, :, ::-1]) for seed in range(n)]


@pytest.mark.parametrize("conditioning", ["shared", "per_class"])
def test_concurrent_calls_give_the_sequential_results(conditioning):
    from detectron2.engine import DefaultPredictor

    cfg = _cfg(MICRO_DIFFSEG, "MODEL.DIFFSEG.CONDITIONING", conditioning,
               "MODEL.DIFFSEG.VOCABULARY", "['background', 'circle', 'square', 'triangle', 'cross']")
    predictor = DefaultPredictor(cfg)
    images = _scenes(8)
    expected = [predictor(im)["sem_seg"] for im in images]
    results, errors = [None] * len(images), []
    start = threading.Barrier(4)

    def work(worker):
        try:
            start.wait()
            for i in range(worker, len(images), 4):
                results[i] = predictor(images[i])["sem_seg"]
        except Exception as e:  # reported below with the others
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Once no call records any more, the UNet runs its own processors again.
    assert not any("Recording" in type(p).__name__ for p in predictor.model.diffusion.unet.attn_processors.values())


def test_concurrent_feature_recordings_stay_apart(tiny_sd):
    from diffseg_d2.diffusion import feature_taps, record_inputs, tap_modules

    taps = feature_taps(tiny_sd, {"unet": range(6)})
    modules = tap_modules(tiny_sd, taps)
    names = [t.name for t in taps]
    context = tiny_sd.empty_prompt_context()
    latents = [torch.randn(1, tiny_sd.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(s))
               for s in range(6)]

    def features(x):
        with record_inputs(modules) as rec:
            tiny_sd.unet_forward(x, 10, context)
        return rec.collected(names)

    expected = [features(x) for x in latents]
    results = [None] * len(latents)
    start = threading.Barrier(3)

    def work(worker):
        start.wait()
        for i in range(worker, len(latents), 3):
            results[i] = features(latents[i])

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


# ------------------------------------------------------------------ 4. non-finite results
def _corrupt_safetensors(path: Path) -> None:
    """Overwrite the tensor payload with 0xFF bytes (float NaN); header and size stay valid."""
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    data[header:] = b"\xff" * (len(data) - header)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part,pattern", [("unet", "the UNet"), ("vae", "the VAE encoder")])
def test_corrupted_weights_are_an_error_naming_the_part(tmp_path, part, pattern):
    from detectron2.engine import DefaultPredictor

    from diffseg_d2.pretrained.stable_diffusion import resolve_sd_weights
    from diffseg_d2.numerics import NonFiniteError

    folder = tmp_path / "sd"
    shutil.copytree(resolve_sd_weights("tiny").path, folder)
    for f in (folder / part).glob("*.safetensors"):
        _corrupt_safetensors(f)
    cfg = _cfg(TINY_DIFFSEG, "MODEL.DIFFSEG.SD.WEIGHTS", str(folder), "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False",
               "MODEL.DIFFSEG.VOCABULARY", "['background', 'dog', 'cat']")
    predictor = DefaultPredictor(cfg)
    image = np.full((40, 50, 3), 120, dtype=np.uint8)
    with pytest.raises(NonFiniteError, match=rf"{pattern} \(MODEL\.DIFFSEG\.SD\.WEIGHTS\) produced non-finite values"):
        predictor(image)


def test_non_finite_scores_of_a_segmenter_are_an_error(tiny_model):
    from diffseg_d2.numerics import NonFiniteError

    image = torch.full((3, 32, 32), 100.0)
    original = tiny_model.segment
    try:
        tiny_model.segment = lambda *a, **k: original(*a, **k) * float("nan")
        with pytest.raises(NonFiniteError, match="DiffSegmenter's score computation"):
            tiny_model([{"image": image, "vocabulary": ["background", "dog"]}])
    finally:
        del tiny_model.segment


# ------------------------------------------------------------------ 5. settings
@pytest.mark.parametrize("opts,pattern", [
    (["MODEL.DIFFSEG.NOISE_STEP", "5000"], r"MODEL\.DIFFSEG\.NOISE_STEP = 5000 must be a timestep in \[0, 999\]"),
    (["MODEL.DIFFSEG.NOISE_STEP", "-1"], r"MODEL\.DIFFSEG\.NOISE_STEP = -1 is out of range"),
    (["MODEL.DIFFSEG.BACKGROUND_THRESHOLD", "1.5"], r"MODEL\.DIFFSEG\.BACKGROUND_THRESHOLD = 1\.5 is out of range"),
    (["MODEL.DIFFSEG.CLASS_CHUNK_SIZE", "0"], r"MODEL\.DIFFSEG\.CLASS_CHUNK_SIZE = 0 is out of range"),
    (["MODEL.DIFFSEG.CROSS_ATTN_WEIGHTS", "[0.3, -0.5, 0.2]"], r"CROSS_ATTN_WEIGHTS = \[0\.3, -0\.5, 0\.2\] is out of range"),
    (["MODEL.DIFFSEG.ODISE.TEST.OVERLAP_THRESHOLD", "2.0"], r"OVERLAP_THRESHOLD = 2\.0 is out of range"),
    (["MODEL.DEVICE", "tpu"], r"MODEL\.DEVICE = 'tpu' is not a device name"),
])
def test_out_of_range_settings_are_named_when_the_model_is_built(opts, pattern):
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match=pattern):
        build_model(_cfg(TINY_DIFFSEG, *opts))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    from detectron2.engine import DefaultPredictor

    with pytest.raises(ValueError, match=r"MODEL\.DEVICE = 'cuda', but this machine has no usable CUDA GPU.*MODEL\.DEVICE cpu"):
        DefaultPredictor(_cfg(TINY_DIFFSEG, "MODEL.DEVICE", "cuda"))
