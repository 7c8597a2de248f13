"""ODISE on CPU with the tiny presets: backbone, frozen parts, training, outputs, checkpoints, bad input."""
import copy
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_ODISE = os.path.join(ROOT, "configs", "tiny", "odise.yaml")
PANOPTIC_FPN = os.path.join(ROOT, "projects", "diffusion_panoptic_fpn", "configs", "tiny.yaml")


def tiny_cfg(*opts):
    from diffseg_d2 import get_diffseg_cfg

    return get_diffseg_cfg(TINY_ODISE, list(opts))


@pytest.fixture(scope="module")
def backbone_pair():
    """Two tiny backbones with the same projections: captioner off and on (gate at its initial 0)."""
    from diffseg_d2.modeling.backbone import DiffusionUNetBackbone

    torch.manual_seed(0)
    plain = DiffusionUNetBackbone(tiny_cfg("MODEL.DIFFSEG.ODISE.CAPTIONER.ENABLED", "False"), None)
    torch.manual_seed(0)
    captioned = DiffusionUNetBackbone(tiny_cfg(), None)
    captioned.projections.load_state_dict(plain.projections.state_dict())
    return plain.eval(), captioned.eval()


@pytest.fixture(scope="module")
def odise():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg())


@pytest.fixture(scope="module")
def odise_on_device(model_device):
    """``odise`` (the same weights) built on $DIFFSEG_D2_TEST_DEVICE; the other tests keep the CPU one."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg("MODEL.DEVICE", model_device))


@pytest.fixture(scope="module")
def batch():
    """Two mapped training inputs of the panoptic sample (fixed once)."""
    from detectron2.data import DatasetCatalog

    from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper

    mapper = MaskFormerPanopticMapper(tiny_cfg(), True)
    record = DatasetCatalog.get("diffseg_sample_voc_panoptic")[0]
    torch.manual_seed(1)
    return [mapper(copy.deepcopy(record)) for _ in range(2)]


# ------------------------------------------------------------------ backbone
@pytest.mark.parametrize("size", [(128, 128), (128, 192), (256, 192), (64, 128)])
def test_backbone_levels_have_their_strides(backbone_pair, size):
    plain, _ = backbone_pair
    out = plain(torch.rand(2, 3, *size) * 2 - 1)
    shapes = plain.output_shape()
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, t in out.items():
        s = shapes[name].stride
        assert t.shape == (2, shapes[name].channels, size[0] // s, size[1] // s)
        assert torch.isfinite(t).all()


def test_sliding_windows_stitch_per_window_features(backbone_pair):
    """Two side-by-side windows (stride = window): each half of the output is that window's own features."""
    plain, _ = backbone_pair
    x = torch.rand(1, 3, 128, 256) * 2 - 1
    whole = plain(x)
    left, right = plain(x[..., :128]), plain(x[..., 128:])
    for name, t in whole.items():
        w = t.shape[-1] // 2
        # Batched and single-window UNet calls differ by float rounding only.
        torch.testing.assert_close(t[..., :w], left[name], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t[..., w:], right[name], atol=1e-4, rtol=1e-4)


def test_overlapping_windows_are_averaged():
    from diffseg_d2.modeling.backbone import DiffusionUNetBackbone
    from diffseg_d2.tiling import window_starts

    assert window_starts(256, 128, 64) == [0, 64, 128]
    assert window_starts(160, 128, 128) == [0, 32]  # the last window is aligned with the border
    bb = DiffusionUNetBackbone(tiny_cfg("MODEL.DIFFSEG.ODISE.CAPTIONER.ENABLED", "False",
                                        "MODEL.DIFFSEG.ODISE.BACKBONE.WINDOW_STRIDE", "64"), None).eval()
    x = torch.rand(1, 3, 128, 192) * 2 - 1
    with torch.no_grad():
        out = bb(x)["res5"]  # stride 32: windows at 0 and 64 px cover cells 0-3 and 2-5
        a, b = bb(x[..., :128])["res5"], bb(x[..., 64:])["res5"]
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[..., :2], a[..., :2], **close)
    torch.testing.assert_close(out[..., 2:4], (a[..., 2:] + b[..., :2]) / 2, **close)
    torch.testing.assert_close(out[..., 4:], b[..., 2:], **close)


def test_captioner_starts_as_the_empty_prompt(backbone_pair):
    """The zero-initialised gates: with the captioner, features equal the empty-prompt features;
    each gate alone (text conditioning, time embedding) opens the image's influence."""
    plain, captioned = backbone_pair
    cap = captioned.captioner
    assert not cap.gate.any() and not cap.time_gate.any()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        a, b = plain(x), captioned(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    for gate in (cap.gate, cap.time_gate):
        with torch.no_grad():
            gate.fill_(0.5)
            c = captioned(x)
            gate.fill_(0.0)
        assert not torch.allclose(a["res3"], c["res3"])


def test_frozen_parts_get_no_gradient_stay_in_eval_and_out_of_checkpoints(backbone_pair):
    _, bb = backbone_pair
    bb.train()
    try:
        assert not bb.diffusion.training and not bb.captioner.clip.training
        out = bb(torch.rand(1, 3, 128, 128) * 2 - 1)
        sum(t.square().mean() for t in out.values()).backward()
        frozen = list(bb.diffusion.parameters()) + list(bb.captioner.clip.parameters())
        assert all(not p.requires_grad and p.grad is None for p in frozen)
        # Trainable: every projection and the captioner's gates (its projections' gradients are 0 at gate 0).
        assert all(p.grad is not None for p in bb.projections.parameters())
        assert bb.captioner.gate.grad is not None and bb.captioner.gate.grad.abs().sum() > 0
        assert bb.captioner.time_gate.grad is not None and bb.captioner.time_gate.grad.abs().sum() > 0
    finally:
        bb.zero_grad(set_to_none=True)
        bb.eval()
    keys = list(bb.state_dict())
    assert keys and not any(k.startswith(("diffusion.", "captioner.clip.")) for k in keys)
    assert sum(v.numel() for v in bb.state_dict().values()) < 0.05 * sum(p.numel() for p in frozen)


def test_backbone_pads_sides_that_are_not_multiples_of_its_divisibility_and_crops_the_features(backbone_pair):
    """As under detectron2's FPN, which pads to 32: the features of the zero-padded input, cropped."""
    plain, _ = backbone_pair
    x = torch.rand(1, 3, 96, 160) * 2 - 1
    with torch.no_grad():
        out = plain(x)
        padded = plain(torch.nn.functional.pad(x, (0, 32, 0, 32)))  # 128 x 192
    for level, stride in plain._out_feature_strides.items():
        assert out[level].shape[-2:] == (96 // stride, 160 // stride)
        assert torch.equal(out[level], padded[level][..., : 96 // stride, : 160 // stride])


# ------------------------------------------------------------------ meta-architecture
def test_model_state_dict_holds_only_trainable_parts(odise):
    keys = list(odise.state_dict())
    assert not any(".diffusion." in k or k.startswith("clip.") or ".clip." in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"backbone", "pixel_decoder", "decoder", "classifier"}
    # Every trainable parameter is checkpointed; nothing frozen is.
    trainable = {n for n, p in odise.named_parameters() if p.requires_grad}
    assert trainable == {k for k in keys if k in dict(odise.named_parameters())}


def test_training_lowers_the_loss_on_a_fixed_batch(odise_on_device, batch):
    model = copy.deepcopy(odise_on_device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def total():
        torch.manual_seed(123)  # the same sampled points every time
        losses = model(batch)
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0"} <= set(losses)
        return sum(losses.values())

    with torch.no_grad():
        start = float(total())
    for _ in range(12):
        optimizer.zero_grad()
        total().backward()
        optimizer.step()
    with torch.no_grad():
        end = float(total())
    assert end < 0.8 * start, (start, end)


def test_grounding_loss_joins_when_configured(batch):
    from detectron2.modeling import build_model

    model = build_model(tiny_cfg("MODEL.DIFFSEG.ODISE.LOSS.GROUNDING_WEIGHT", "1.0")).train()
    assert model.nouns(batch[0]["captions"][0])  # the sample's caption names training classes
    pair = [batch[0], {**batch[1], "captions": ["a sofa and a cat"]}]
    losses = model(pair)
    # On every decoder layer, as the reference.
    layers = model.decoder.num_layers + 1
    assert {"loss_grounding"} | {f"loss_grounding_{i}" for i in range(layers - 1)} <= set(losses)
    assert torch.isfinite(losses["loss_grounding"])
    losses["loss_grounding"].backward()
    assert model.decoder.query_feat.weight.grad is not None


def test_inference_outputs_follow_detectron2_formats(odise_on_device, batch):
    model = odise_on_device.eval()
    x = {"image": batch[0]["image"], "height": 100, "width": 150}
    with torch.no_grad():
        out = model([x])[0]
    assert out["sem_seg"].device.type == model.device.type
    K = len(model.vocabulary)
    assert out["sem_seg"].shape == (K, 100, 150)
    ids, segments = out["panoptic_seg"]
    assert ids.shape == (100, 150) and ids.dtype == torch.int32
    assert {int(i) for i in ids.unique()} - {0} == {s["id"] for s in segments}
    for s in segments:
        assert 0 <= s["category_id"] < K and s["isthing"] == (model.vocabulary[s["category_id"]] != "background")
    inst = out["instances"]
    assert inst.image_size == (100, 150) and inst.pred_masks.shape[1:] == (100, 150)
    assert all(model.vocabulary[int(c)] != "background" for c in inst.pred_classes)
    assert len(inst) <= model.detections_per_image and (inst.scores >= 0).all()


def test_vocabulary_at_call_time_and_bad_vocabularies(odise, batch):
    from diffseg_d2.vocabulary import VocabularyError

    model = odise.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "vocabulary": ["cat", "sofa, couch", "background"]}])[0]
    assert out["sem_seg"].shape[0] == 3
    with pytest.raises(VocabularyError, match="empty"):
        model.set_vocabulary([])
    with pytest.raises(VocabularyError, match="more than once"):
        model.set_vocabulary(["cat", "Cat"])


def test_clip_ensemble_exponents_for_seen_and_novel_classes(odise, batch):
    """alpha = 0 keeps the head's probabilities for seen classes; beta = 1 gives CLIP's for novel ones."""
    model = copy.deepcopy(odise).eval()
    image = batch[0]["image"].float()
    embeds = torch.randn(model.decoder.query_feat.weight.shape[0], model.classifier.text_proj.out_features)
    masks = torch.randn(embeds.shape[0], 32, 32)
    names = ["person", "chair"]  # both training classes of the sample
    model.ensemble = False
    head = model._class_probabilities(embeds, masks, image, names)
    model.ensemble, model.ensemble_alpha = True, 0.0
    torch.testing.assert_close(model._class_probabilities(embeds, masks, image, names), head)
    model.ensemble_alpha, model.ensemble_beta = 0.0, 1.0
    novel = ["giraffe", "kite"]
    mixed = model._class_probabilities(embeds, masks, image, novel)
    model.ensemble = False
    head_novel = model._class_probabilities(embeds, masks, image, novel)
    # The no-object column is the head's; the class columns are CLIP's distribution scaled to the rest.
    torch.testing.assert_close(mixed[:, -1], head_novel[:, -1])
    assert not torch.allclose(mixed[:, :-1], head_novel[:, :-1])
    torch.testing.assert_close(mixed.sum(-1), torch.ones(mixed.shape[0]))


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_refusals(odise, batch, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from diffseg_d2.engine import CheckpointMismatchError, StrictCheckpointer

    model = odise.eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("m")
    path = tmp_path / "m.pth"
    assert path.stat().st_size < 5e6  # projections and head only; no SD, no CLIP
    torch.manual_seed(7)
    other = build_model(tiny_cfg()).eval()
    x = [{"image": batch[0]["image"]}]
    with torch.no_grad():
        before = other(x)[0]["sem_seg"]
        StrictCheckpointer(other).load(str(path))
        after, reference = other(x)[0]["sem_seg"], model(x)[0]["sem_seg"]
    assert not torch.allclose(before, reference)
    torch.testing.assert_close(after, reference)

    smaller = build_model(tiny_cfg("MODEL.DIFFSEG.ODISE.HEAD.NUM_QUERIES", "8"))
    with pytest.raises(CheckpointMismatchError, match=r"decoder\.query_feat\.weight \(16, 32\) vs \(8, 32\)"):
        StrictCheckpointer(smaller).load(str(path))
    torch.save({"model": {"backbone.something": torch.zeros(1)}}, tmp_path / "alien.pth")
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint .*not in this model"):
        StrictCheckpointer(smaller).load(str(tmp_path / "alien.pth"))
    (tmp_path / "old.pkl").write_bytes(b"not read")
    with pytest.raises(ValueError, match="is a pickle file"):
        StrictCheckpointer(smaller).load(str(tmp_path / "old.pkl"))


def test_checkpoint_ddp_prefix_is_checked_as_it_is_loaded(tmp_path):
    from torch import nn

    from diffseg_d2.engine import CheckpointMismatchError, StrictCheckpointer

    model = nn.Sequential(nn.Linear(2, 2))
    wrapped = {f"module.{k}": v + 1 for k, v in model.state_dict().items()}  # saved from a DDP model
    torch.save({"model": wrapped}, tmp_path / "ddp.pth")
    StrictCheckpointer(model).load(str(tmp_path / "ddp.pth"))
    assert torch.equal(model[0].bias, wrapped["module.0.bias"])
    # Only some keys prefixed: the loader would not strip them, so neither does the check.
    torch.save({"model": {"module.0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \(1\): 0\.weight"):
        StrictCheckpointer(model).load(str(tmp_path / "mixed.pth"))


def test_pq_needs_a_panoptic_dataset():
    from diffseg_d2.evaluation import check_panoptic_dataset

    check_panoptic_dataset("diffseg_sample_voc_panoptic")
    with pytest.raises(ValueError, match="no panoptic annotations"):
        check_panoptic_dataset("diffseg_sample_voc")


# ------------------------------------------------------------------ tools and the example project
def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_train_net_trains_saves_and_evaluates_pq(tmp_path):
    out = tmp_path / "run"
    _run(["tools/train_net.py", "--config-file", TINY_ODISE, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "0",
          "OUTPUT_DIR", str(out)], tmp_path)
    weights = out / "model_final.pth"
    assert weights.is_file()
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    assert state and not any(".diffusion." in k for k in state)
    proc = _run(["tools/train_net.py", "--config-file", TINY_ODISE, "--eval-only", "MODEL.WEIGHTS", str(weights),
                 "OUTPUT_DIR", str(tmp_path / "eval")], tmp_path)
    # format_results_table prints one table per task: PQ from COCOPanopticEvaluator, mIoU, mask AP.
    assert "diffseg_sample_voc_panoptic [panoptic_seg]" in proc.stdout
    assert "| PQ " in proc.stdout and "| mIoU " in proc.stdout and "| AP " in proc.stdout


@pytest.mark.slow
def test_example_project_builds_panoptic_fpn_on_the_diffusion_backbone(batch):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.modeling.meta_arch import PanopticFPN
    from detectron2.utils.events import EventStorage

    import diffseg_d2
    from diffseg_d2.modeling.backbone import DiffusionUNetBackbone

    cfg = get_cfg()
    diffseg_d2.add_diffseg_config(cfg)
    diffseg_d2.merge_config_file(cfg, PANOPTIC_FPN)
    model = build_model(cfg)
    assert isinstance(model, PanopticFPN) and isinstance(model.backbone.bottom_up, DiffusionUNetBackbone)
    assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert not any(".diffusion." in k for k in model.state_dict())
    record = DatasetCatalog.get("diffseg_sample_voc_panoptic_separated")[0]
    inputs = [DatasetMapper(cfg, is_train=True)(copy.deepcopy(record))]
    model.train()
    with EventStorage():  # detectron2's R-CNN heads log training statistics
        losses = model(inputs)
    assert {"loss_sem_seg", "loss_rpn_cls", "loss_cls", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_clip_text_cache_is_bounded_and_reused(odise):
    """The grounding loss encodes a new noun set every batch: the cache must not grow without end."""
    from diffseg_d2.pretrained import clip as clip_module

    clip = odise.clip
    first = clip.encode_class_names(["cat", "dog"])
    for i in range(clip_module._TEXT_CACHE_SIZE + 6):
        clip.encode_class_names([f"thing{i}"])
    assert len(clip._text_cache) == clip_module._TEXT_CACHE_SIZE
    recomputed = clip.encode_class_names(["cat", "dog"])
    torch.testing.assert_close(recomputed, first)
    assert clip.encode_class_names(["cat", "dog"]) is recomputed  # a hit returns the cached tensor


def test_panoptic_overlap_ratio_is_the_whole_owned_area_over_the_mask(odise):
    """Mask2Former keeps a query when |pixels it wins in the argmax| / |its mask >= 0.5| reaches the
    overlap threshold; the pixels it wins below 0.5 count too (only the painted ones are masked)."""
    h, w = 4, 10
    # Query 0: its mask is >= 0.5 on columns 0-4 (20 px); query 1 wins 2 of those px, and query 0 wins
    # column 5 (4 px) where its mask is below 0.5: it owns 22 px, 18 of them inside its mask.
    masks = torch.full((2, h, w), -4.0)
    masks[0, :, :5] = 4.0           # query 0 >= 0.5 on 20 px
    masks[0, :, 5] = -0.5           # sigmoid 0.38: below 0.5, but query 0 still wins there
    masks[1, :, 6:] = 4.0           # query 1 elsewhere
    masks[1, :2, 0] = 6.0           # query 1 takes 2 px of query 0's mask
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])  # 2 classes + no-object
    old = odise.object_mask_threshold, odise.overlap_threshold
    odise.object_mask_threshold, odise.overlap_threshold = 0.5, 0.95
    try:
        ids, segments = odise._panoptic(probs, masks, [True, True])
    finally:
        odise.object_mask_threshold, odise.overlap_threshold = old
    # |own| / |mask| = 22 / 20 >= 0.95: kept (the intersection alone, 18 / 20 = 0.9, would drop it).
    assert [s["category_id"] for s in segments] == [0, 1]
    assert int((ids == 1).sum()) == 18  # only its pixels >= 0.5 are painted


# ------------------------------------------------------------------ reference inference, by hand
def _probability_inputs(model, batch):
    image = batch[0]["image"].float()
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(model.decoder.query_feat.weight.shape[0], model.classifier.text_proj.out_features, generator=g)
    masks = torch.randn(embeds.shape[0], 32, 32, generator=g)
    return embeds, masks, image


def test_ensemble_is_the_geometric_formula_with_clips_own_probabilities(odise, batch):
    """p = p_head^(1 - a) p_clip^a renormalised over the classes, times the head's object
    probability; a = 0.3 for seen classes, 0.7 for novel ones (the defaults), computed here with
    powers (not the model's log space) from the head's logits and MaskCLIP's region embeddings."""
    import torch.nn.functional as F

    model = copy.deepcopy(odise).eval()
    assert (model.ensemble_alpha, model.ensemble_beta) == (0.3, 0.7)
    embeds, masks, image = _probability_inputs(model, batch)
    names = ["person", "giraffe"]  # seen, novel
    K = len(names)
    got = model._class_probabilities(embeds, masks, image, names)

    text, owner = model._text(names, model.head_template)
    logits = model.classifier(embeds[None], text, owner, K)[0]
    full = logits.softmax(-1)
    p_head = full[:, :K] / full[:, :K].sum(-1, keepdim=True)
    void = full[:, K]
    clip_text, clip_owner = model._text(names, model.ensemble_template)
    regions = model.clip.encode_masked(image[None], masks[None])[0]
    cos = F.normalize(regions, dim=-1) @ F.normalize(clip_text, dim=-1).T  # (Q, synonyms)
    per_class = torch.stack([cos[:, clip_owner == k].max(-1).values for k in range(K)], dim=-1)
    p_clip = (model.clip.model.logit_scale.exp().clamp(max=100) * per_class).softmax(-1)
    a = torch.tensor([0.3, 0.7])
    geometric = p_head ** (1 - a) * p_clip ** a
    expected = torch.cat([geometric / geometric.sum(-1, keepdim=True) * (1 - void)[:, None], void[:, None]], -1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant, ensemble, through_log", [
    ("label", True, True), ("label", False, False), ("caption", True, True), ("caption", False, True)])
def test_reference_inference_reads_the_probabilities_through_log_and_softmax(odise, batch, monkeypatch, variant,
                                                                            ensemble, through_log):
    """The reference hands Mask2Former's inference log(p + 1e-8) of the ensembled (or the
    caption-trained model's) probabilities, and that inference takes their softmax: the model's
    probabilities are exactly that round trip of the plain formula, bit for bit (exact ties among
    queries then resolve as in the reference). The label-trained model without the ensemble hands
    over logits, whose softmax is the plain one."""
    from diffseg_d2.modeling.meta_arch import odise as odise_module

    model = copy.deepcopy(odise).eval()
    model.ensemble = ensemble
    embeds, masks, image = _probability_inputs(model, batch)
    binary = torch.randn(embeds.shape[0], 2, generator=torch.Generator().manual_seed(4)) if variant == "caption" else None
    names = ["person", "giraffe", "chair"]
    final = model._class_probabilities(embeds, masks, image, names, binary)
    monkeypatch.setattr(odise_module, "_through_log", lambda p: p)
    plain = model._class_probabilities(embeds, masks, image, names, binary)
    if through_log:
        assert torch.equal(final, torch.log(plain + 1e-8).softmax(-1))
        assert not torch.equal(final, plain)
    else:
        assert torch.equal(final, plain)


def test_seen_classes_are_exact_synonym_strings(odise):
    """The reference tests a class against the training synonyms as exact strings."""
    assert odise.seen_classes(["person", "Person", "chair, seat", "giraffe"]).tolist() == [True, False, True, False]


def _clip_inputs(model, monkeypatch, images, **vocab):
    seen = []
    original = model.clip.encode_masked

    def spy(image, mask_logits):
        seen.append((tuple(image.shape), tuple(mask_logits.shape)))
        return original(image, mask_logits)

    monkeypatch.setattr(model.clip, "encode_masked", spy)
    with torch.no_grad():
        model([{"image": im, "vocabulary": ["person", "chair"]} for im in images])
    return seen


def test_clip_reads_the_masks_over_the_padded_batch_as_the_reference(odise, monkeypatch):
    """At a size that is not a multiple of 64 (72 x 90: padded to 128 x 128, masks at 32 x 32) the
    reference gives MaskCLIP the head's masks over the whole padded batch and the image padded only
    to the batch's largest image; ``CLIP_MASK_EXTENT image`` (ours) crops the masks to the image."""
    model = copy.deepcopy(odise).eval()
    Q = model.decoder.query_feat.weight.shape[0]
    small, large = torch.rand(3, 72, 90) * 255, torch.rand(3, 80, 100) * 255
    assert _clip_inputs(model, monkeypatch, [small]) == [((1, 3, 72, 90), (1, Q, 32, 32))]
    assert _clip_inputs(model, monkeypatch, [small, large]) == [((1, 3, 80, 100), (1, Q, 32, 32))] * 2
    model.clip_mask_extent = "image"
    assert _clip_inputs(model, monkeypatch, [small, large]) == [((1, 3, 72, 90), (1, Q, 72, 90)),
                                                                ((1, 3, 80, 100), (1, Q, 80, 100))]
