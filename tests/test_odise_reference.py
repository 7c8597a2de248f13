"""ODISE as released, checked from the facts of the reference (not from its code): the backbone's
taps on the SD 1.5 architecture, the captioner's gates, MaskCLIP's attention, the classifier, the
instance selection and the inference thresholds."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from test_odise import backbone_pair, odise, tiny_cfg  # noqa: F401  (fixtures)


def sd15_shapes():
    """The SD 1.5 UNet and VAE on the meta device (shapes only, no memory, no weights)."""
    import diffusers

    from diffseg_d2.pretrained.stable_diffusion import SD_ARCHITECTURES

    sizes = SD_ARCHITECTURES["sd15"]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["unet"])
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, **sizes["vae"],
        )
    return types.SimpleNamespace(unet=unet, vae=vae, latent_factor=8)


def test_reference_taps_on_sd15_have_the_papers_channels_and_strides():
    from diffseg_d2.config import get_diffseg_cfg
    from diffseg_d2.diffusion import feature_taps
    from diffseg_d2.modeling.backbone.diffusion_unet import _assign_taps

    o = get_diffseg_cfg().MODEL.DIFFSEG.ODISE.BACKBONE
    chosen = {"unet": o.UNET_BLOCKS, "vae_encoder": o.VAE_ENCODER_BLOCKS, "vae_decoder": o.VAE_DECODER_BLOCKS}
    taps = feature_taps(sd15_shapes(), chosen)
    got = [(t.name, t.channels, t.stride) for t in taps]
    # UNet output-block inputs after the skip concatenation; VAE resnet inputs.
    assert got == [
        ("vae_encoder.5", 512, 4), ("vae_encoder.7", 512, 8),
        ("unet.2", 2560, 64), ("unet.5", 1920, 32), ("unet.8", 960, 16), ("unet.11", 640, 8),
        ("vae_decoder.2", 512, 8), ("vae_decoder.5", 512, 4),
    ]
    # Strides are clamped to 4..32: the stride-64 tap joins the stride-32 level.
    levels = _assign_taps([t.stride for t in taps], ["res2", "res3", "res4", "res5"])
    names = {level: sorted(taps[i].name for i in idx) for level, idx in levels.items()}
    assert names == {
        "res2": ["vae_decoder.5", "vae_encoder.5"],
        "res3": ["unet.11", "vae_decoder.2", "vae_encoder.7"],
        "res4": ["unet.8"],
        "res5": ["unet.2", "unet.5"],
    }
    with pytest.raises(ValueError, match="has 12 tappable layers"):
        feature_taps(sd15_shapes(), {"unet": [12]})


def test_taps_read_layer_inputs_and_the_decoder_stops_at_the_last_tap(backbone_pair):  # noqa: F811
    """A tap is what its layer receives; the partial decoder gives what the full decoder's layers see."""
    from diffseg_d2.diffusion import decoder_inputs, record_inputs, tappable_layers

    plain, _ = backbone_pair
    d = plain.diffusion
    decoder_layers = [m for m, _ in tappable_layers(d)["vae_decoder"]]
    latents = torch.randn(1, 4, 16, 16)
    with torch.no_grad(), record_inputs(decoder_layers) as rec:
        d.vae.decode(latents)
    full = rec.collected([str(i) for i in range(len(decoder_layers))])
    with torch.no_grad():
        partial = decoder_inputs(d.vae, latents, [3, 1])
    torch.testing.assert_close(partial[0], full[3])
    torch.testing.assert_close(partial[1], full[1])
    # The UNet's last-layer input is its previous output concatenated with the skip: wider than its output.
    unet_layers = tappable_layers(d)["unet"]
    assert unet_layers[-1][0].in_channels > unet_layers[-1][0].out_channels


def test_each_tap_has_its_own_bottleneck_projection(backbone_pair):  # noqa: F811
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    plain, _ = backbone_pair
    out = plain.output_shape()["res2"].channels
    assert len(plain.projections) >= len(plain.taps)
    for name, proj in plain.projections.items():
        assert isinstance(proj, BottleneckBlock), name
        assert proj.conv1.out_channels == out // 4 and proj.conv3.out_channels == out
        assert isinstance(proj.conv1.norm, torch.nn.GroupNorm)


class _ClipStub(torch.nn.Module):
    embed_dim = 768

    def encode_image(self, images, clamp=True, normalize=True):
        return torch.ones(images.shape[0], self.embed_dim) * 3.0  # unnormalised on purpose


def test_captioner_gates_and_time_path_have_the_reference_shapes():
    from diffseg_d2.modeling.odise.captioner import ImplicitCaptioner

    cap = ImplicitCaptioner(_ClipStub(), context_length=77, text_dim=768, time_embed_dim=1280)
    assert cap.gate.shape == (1, 77, 768) and cap.positional_embedding.shape == (1, 77, 768)
    assert cap.time_gate.shape == (1280,) and cap.time_project.out_features == 1280
    assert 0.01 < float(cap.positional_embedding.detach().std()) < 0.03  # truncated normal, std 0.02
    empty = torch.randn(1, 77, 768)
    context, time = cap(torch.zeros(2, 3, 32, 32), empty)
    torch.testing.assert_close(context, empty.expand(2, -1, -1))  # closed gates: the empty prompt
    assert time.shape == (2, 1280) and not time.any()
    with torch.no_grad():
        cap.gate[0, 3, 5] = 1.0  # one element of the gate opens one element of the conditioning
    context, _ = cap(torch.zeros(1, 3, 32, 32), empty)
    changed = (context != empty).nonzero().tolist()
    assert changed == [[0, 3, 5]]


def test_time_offset_is_added_to_the_unets_time_embedding(backbone_pair):  # noqa: F811
    plain, _ = backbone_pair
    d = plain.diffusion
    x = torch.randn(1, 4, 16, 16)
    ctx = d.empty_prompt_context()
    width = d.unet.time_embedding.linear_2.out_features
    base = d.unet_forward(x, 0, ctx)
    torch.testing.assert_close(d.unet_forward(x, 0, ctx, time_offset=torch.zeros(1, width)), base)
    shifted = d.unet_forward(x, 0, ctx, time_offset=torch.ones(1, width))
    assert not torch.allclose(shifted, base)
    torch.testing.assert_close(d.unet_forward(x, 0, ctx), base)  # the hook is gone afterwards


@pytest.fixture(scope="module")
def tiny_clip():
    from diffseg_d2.pretrained.clip import OpenCLIP

    return OpenCLIP.from_weights("tiny", ["a photo of a {}."])


def test_maskclip_tokens_see_only_their_patches_and_the_class_token(tiny_clip):
    clip = tiny_clip
    side = clip.image_size[0]
    grid = side // clip.model.visual.conv1.kernel_size[0]
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 255
    full = torch.full((1, 1, grid, grid), 8.0)
    # A mask over the whole image sees what the class token sees: CLIP's own image embedding.
    torch.testing.assert_close(clip.encode_masked(image, full)[0, 0], clip.encode_image(image, normalize=False)[0],
                               atol=1e-4, rtol=1e-4)
    left = torch.full((1, 1, grid, grid), -8.0)
    left[..., : grid // 2] = 8.0
    right = left.flip(-1)
    together = clip.encode_masked(image, torch.cat([left, right], dim=1))[0]
    alone = clip.encode_masked(image, left)[0, 0]
    torch.testing.assert_close(together[0], alone, atol=1e-5, rtol=1e-5)  # no token attends to another mask
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    # A patch counts when the mask's sigmoid reaches 0.5 anywhere inside it (max-pooled).
    up = F.interpolate(left, size=(side, side), mode="nearest")
    one_pixel = up.clone()
    one_pixel[..., 0, side // 2 + 1] = 8.0  # one pixel of the next patch column
    patch = side // grid
    wider = up.clone()
    wider[..., :patch, (grid // 2) * patch:(grid // 2 + 1) * patch] = 8.0  # that whole patch
    torch.testing.assert_close(clip.encode_masked(image, one_pixel)[0, 0], clip.encode_masked(image, wider)[0, 0],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clip.encode_masked(image, one_pixel)[0, 0], clip.encode_masked(image, up)[0, 0], atol=1e-4)
    # Two masks that cover no patch see the class token alone: the same embedding wherever they are.
    empty_a, empty_b = torch.full((1, 1, grid, grid), -8.0), torch.full((1, 1, grid, grid), -3.0)
    torch.testing.assert_close(clip.encode_masked(image, empty_a), clip.encode_masked(image, empty_b))


def test_classifier_projects_bare_clip_text_and_starts_no_object_at_clip_of_empty(odise):  # noqa: F811
    model = copy.deepcopy(odise).eval()
    torch.testing.assert_close(model.classifier.null_embed.detach(), model.clip.encode_texts([""])[0])
    text, owner = model._text(["sofa, couch", "cat"])
    torch.testing.assert_close(text, model.clip.encode_texts(["sofa", "couch", "cat"]))  # no template
    assert owner.tolist() == [0, 0, 1]
    embeds = torch.randn(1, 4, model.classifier.text_proj.out_features)
    before = model.classifier(embeds, text, owner, 2)
    with torch.no_grad():
        model.classifier.text_proj.bias.add_(0.5)
    after = model.classifier(embeds, text, owner, 2)
    assert not torch.allclose(before, after)  # the text goes through the trainable projection
    # Synonyms: a class scores its best synonym.
    per_synonym = model.classifier.scale() * F.normalize(embeds, dim=-1) @ model.classifier.project_text(text).T
    torch.testing.assert_close(after[..., 0], per_synonym[..., :2].max(-1).values)


def test_mask_embedding_pools_pixel_features_under_the_binarised_mask():
    from diffseg_d2.modeling.heads.transformer_decoder import masked_average

    features = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # sigmoid > 0.5 on 4 pixels
    pooled = masked_average(features, logits)
    torch.testing.assert_close(pooled[0, 0], features[0, :, :2, :2].mean((1, 2)))
    torch.testing.assert_close(pooled[0, 1], torch.zeros(2))  # an empty mask pools nothing


def test_instances_take_the_top_pairs_over_all_classes_then_drop_stuff(odise):  # noqa: F811
    """Mask2Former: top-k over every (query, class) pair; with panoptic output on, stuff pairs are then
    dropped, so fewer than k instances can come back; without it, every pair stays."""
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])  # classes: thing, stuff; void
    masks = torch.full((3, 4, 4), 3.0)
    things = [True, False]
    old = odise.detections_per_image, odise.panoptic_on
    try:
        odise.detections_per_image, odise.panoptic_on = 3, True
        inst = odise._instances(probs, masks, things)
        assert inst.pred_classes.tolist() == [0]  # the top 3 are stuff 0.8, 0.6 and thing 0.5
        assert math.isclose(float(inst.scores[0]), 0.5 * torch.sigmoid(torch.tensor(3.0)).item(), rel_tol=1e-5)
        odise.panoptic_on = False
        assert sorted(odise._instances(probs, masks, things).pred_classes.tolist()) == [0, 1, 1]
    finally:
        odise.detections_per_image, odise.panoptic_on = old


def test_reference_inference_thresholds_and_ensemble_defaults():
    from diffseg_d2.config import get_diffseg_cfg

    t = get_diffseg_cfg().MODEL.DIFFSEG.ODISE.TEST
    assert (t.OBJECT_MASK_THRESHOLD, t.OVERLAP_THRESHOLD, t.DETECTIONS_PER_IMAGE) == (0.0, 0.8, 100)
    assert (t.ENSEMBLE_ALPHA, t.ENSEMBLE_BETA, t.ENSEMBLE_CLIP) == (0.3, 0.7, "maskclip")


def test_a_low_confidence_query_is_a_panoptic_segment_at_the_reference_threshold(odise):  # noqa: F811
    masks = torch.full((1, 4, 4), 4.0)
    probs = torch.tensor([[0.45, 0.35, 0.2]])
    ids, segments = odise._panoptic(probs, masks, [True, True])  # default threshold 0.0
    assert [s["category_id"] for s in segments] == [0] and int((ids == 1).sum()) == 16
    old = odise.object_mask_threshold
    try:
        odise.object_mask_threshold = 0.8  # Mask2Former's own default drops it
        assert odise._panoptic(probs, masks, [True, True])[1] == []
    finally:
        odise.object_mask_threshold = old


def test_lsj_mapper_crops_training_images_to_the_square():
    from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper

    cfg = tiny_cfg("INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.SIZE", "96")
    import detectron2.data.transforms as T

    augs = MaskFormerPanopticMapper.from_config(cfg, True)["augmentations"]
    assert [type(a) for a in augs] == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
    from detectron2.data import DatasetCatalog

    record = DatasetCatalog.get("diffseg_sample_voc_panoptic")[0]
    out = MaskFormerPanopticMapper(cfg, True)(copy.deepcopy(record))
    assert tuple(out["image"].shape[-2:]) == (96, 96)
    assert out["instances"].gt_masks.shape[-2:] == (96, 96)


def test_caption_variant_trains_class_agnostic_masks_with_grounding_and_takes_no_object_from_its_binary_head():
    """The caption-trained model: binary (object / no object) targets for the set losses, the
    grounding loss on every layer, no learned null text; at test time the classes come from the text
    (in the grounding prompt) and "no object" from the binary head."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper

    cfg = tiny_cfg("MODEL.DIFFSEG.ODISE.VARIANT", "caption", "MODEL.DIFFSEG.ODISE.LOSS.GROUNDING_WEIGHT", "1.0")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.classifier.null_embed is None and model.decoder.class_head.out_features == 2
    assert model.head_template == "a photo of a {}."
    mapper = MaskFormerPanopticMapper(cfg, True)
    record = DatasetCatalog.get("diffseg_sample_voc_panoptic")[0]
    batch = [mapper(copy.deepcopy(record)), {**mapper(copy.deepcopy(record)), "captions": ["a sofa and a cat"]}]
    model.train()
    losses = model(batch)
    assert {"loss_ce", "loss_grounding", "loss_grounding_0"} <= set(losses)
    sum(losses.values()).backward()
    assert model.decoder.class_head.weight.grad is not None
    model.eval()
    probs = model._class_probabilities(torch.randn(4, 32), torch.randn(4, 8, 8), torch.rand(3, 32, 32) * 255,
                                       ["cat", "dog"], binary=torch.tensor([[3.0, -3.0]] * 4))
    torch.testing.assert_close(probs[:, -1], torch.sigmoid(torch.tensor(-6.0)).expand(4))  # softmax of (3, -3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="GROUNDING_WEIGHT > 0"):
        build_model(tiny_cfg("MODEL.DIFFSEG.ODISE.VARIANT", "caption"))


def test_caption_variant_set_losses_see_only_object_or_no_object(monkeypatch):
    """The caption-trained model's set losses: every target is class 0 ("object"), every prediction
    (final and auxiliary) the binary head's two logits; its grounding loss on each layer is the
    grounding loss of that layer's normalised embeddings against its captions' nouns, weighted."""
    import torch.nn.functional as F
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from diffseg_d2.data.panoptic_mapper import MaskFormerPanopticMapper
    from diffseg_d2.modeling.heads import caption_grounding_loss

    cfg = tiny_cfg("MODEL.DIFFSEG.ODISE.VARIANT", "caption", "MODEL.DIFFSEG.ODISE.LOSS.GROUNDING_WEIGHT", "0.5")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    mapper = MaskFormerPanopticMapper(cfg, True)
    record = DatasetCatalog.get("diffseg_sample_voc_panoptic")[0]
    batch = [{**mapper(copy.deepcopy(record)), "captions": ["a person on a chair"]},
             {**mapper(copy.deepcopy(record)), "captions": ["a sofa and a cat"]}]
    assert any(int(b["instances"].gt_classes.max()) > 0 for b in batch)  # real classes, before the variant drops them
    seen, predicted = {}, {}
    original_criterion = model.criterion.forward

    def spy(outputs, targets):
        seen["targets"] = targets
        seen["outputs"] = outputs
        return original_criterion(outputs, targets)

    monkeypatch.setattr(model.criterion, "forward", spy)
    original_predict = model._predict

    def keep(images):
        predicted["out"] = original_predict(images)
        return predicted["out"]

    monkeypatch.setattr(model, "_predict", keep)
    losses = model(batch)
    assert all(t["labels"].numel() and not t["labels"].any() for t in seen["targets"])
    for out in [seen["outputs"]] + seen["outputs"]["aux_outputs"]:
        assert out["pred_logits"].shape[-1] == 2
    out = predicted["out"]
    nouns = model._caption_nouns(batch, out["pred_embeds"])
    layers = [out["pred_embeds"]] + [a["pred_embeds"] for a in out["aux_outputs"]]
    for i, embeds in enumerate(layers):
        name = "loss_grounding" if i == 0 else f"loss_grounding_{i - 1}"
        expected = 0.5 * caption_grounding_loss(F.normalize(embeds, dim=-1), nouns, model.classifier.scale())
        torch.testing.assert_close(losses[name], expected)
