"""Mask head (diffseg_d2.modeling.heads): deformable attention, pixel decoder, masked decoder, matcher, losses.

Tiny dimensions, CPU only.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from diffseg_d2.modeling.heads import (
    DeformablePixelDecoder,
    HungarianMatcher,
    MaskedAttentionDecoder,
    MultiScaleDeformableAttention,
    SetCriterion,
    caption_grounding_loss,
)

INPUT_SHAPE = {f"res{i}": ShapeSpec(channels=16, stride=2**i) for i in range(2, 6)}
WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def tiny_pixel_decoder():
    return DeformablePixelDecoder(
        input_shape=INPUT_SHAPE, conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_points=2
    )


def tiny_decoder(num_layers=2, num_queries=4):
    return MaskedAttentionDecoder(
        in_channels=32,
        hidden_dim=32,
        num_queries=num_queries,
        num_heads=4,
        ffn_dim=64,
        num_layers=num_layers,
        mask_dim=32,
        embed_dim=16,
    )


def backbone_features(batch, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, spec.channels, height // spec.stride, width // spec.stride, generator=gen)
        for name, spec in INPUT_SHAPE.items()
    }


def identity_projections(attn):
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(attn.embed_dim))
            proj.bias.zero_()


# ---------------------------------------------------------------- deformable attention


def test_deform_attn_initial_offsets_are_rays_per_head():
    attn = MultiScaleDeformableAttention(embed_dim=16, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 looks right, head 1 down, head 2 left, head 3 up; point k at distance k + 1, same on each level.
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for point in range(3):
        assert torch.allclose(bias[:, 1, point], expected * (point + 1), atol=1e-6)
    assert torch.equal(bias[:, 0], bias[:, 1])
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_deform_attn_at_pixel_centres_gathers_the_value():
    """One level, zero offsets, points on pixel centres: the output is the value at those pixels."""
    torch.manual_seed(0)
    height, width, dim = 3, 4, 8
    attn = MultiScaleDeformableAttention(embed_dim=dim, num_heads=2, num_levels=1, num_points=3)
    identity_projections(attn)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        attn.attention_weights.weight.normal_()  # any mix of identical samples is that sample
    value = torch.randn(1, height * width, dim)
    pixels = [(0, 0), (1, 2), (2, 3), (0, 3)]  # (row, col)
    ref = torch.tensor([[(c + 0.5) / width, (r + 0.5) / height] for r, c in pixels])[None, :, None, :]
    query = torch.randn(1, len(pixels), dim)
    shapes = torch.tensor([[height, width]])
    start = torch.tensor([0])
    out = attn(query, ref, value, shapes, start)
    expected = value[0, [r * width + c for r, c in pixels]]
    assert torch.allclose(out[0], expected, atol=1e-6)

    # Half a pixel to the right: the mean of the pixel and its right neighbour; zero padding past the border.
    with torch.no_grad():
        attn.sampling_offsets.bias.view(2, 1, 3, 2)[..., 0] = 0.5
    out = attn(query, ref, value, shapes, start)
    grid = value[0].view(height, width, dim)
    for q, (r, c) in enumerate(pixels):
        right = grid[r, c + 1] if c + 1 < width else torch.zeros(dim)
        assert torch.allclose(out[0, q], 0.5 * (grid[r, c] + right), atol=1e-6)


def naive_bilinear(level_map, x, y):
    """level_map (D, H, W); (x, y) in [0, 1]; zeros outside; align_corners=False."""
    _, height, width = level_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = torch.zeros(level_map.shape[0])
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < height and 0 <= xx < width:
                total = total + wy * wx * level_map[:, yy, xx]
    return total


def test_deform_attn_equals_per_point_loop():
    torch.manual_seed(1)
    batch, num_queries, heads, points, dim = 2, 4, 2, 2, 8
    sizes = [(3, 4), (2, 3)]
    attn = MultiScaleDeformableAttention(embed_dim=dim, num_heads=heads, num_levels=2, num_points=points)
    with torch.no_grad():  # query-dependent offsets (some fall outside the maps) and weights
        attn.sampling_offsets.weight.normal_(std=0.7)
        attn.attention_weights.weight.normal_()
    shapes = torch.tensor(sizes)
    start = torch.tensor([0, 12])
    value = torch.randn(batch, 18, dim)
    query = torch.randn(batch, num_queries, dim)
    ref = torch.rand(batch, num_queries, 2, 2)
    out = attn(query, ref, value, shapes, start)

    with torch.no_grad():
        v = attn.value_proj(value).view(batch, 18, heads, dim // heads)
        offsets = attn.sampling_offsets(query).view(batch, num_queries, heads, 2, points, 2)
        weights = attn.attention_weights(query).view(batch, num_queries, heads, 2 * points).softmax(-1)
        weights = weights.view(batch, num_queries, heads, 2, points)
        expected = torch.zeros(batch, num_queries, dim)
        for b, q, h, level, p in itertools.product(
            range(batch), range(num_queries), range(heads), range(2), range(points)
        ):
            height, width = sizes[level]
            first = 0 if level == 0 else 12
            level_map = v[b, first : first + height * width, h].T.reshape(-1, height, width)
            x = ref[b, q, level, 0] + offsets[b, q, h, level, p, 0] / width
            y = ref[b, q, level, 1] + offsets[b, q, h, level, p, 1] / height
            sample = naive_bilinear(level_map, float(x), float(y))
            hd = dim // heads
            expected[b, q, h * hd : (h + 1) * hd] += weights[b, q, h, level, p] * sample
        expected = attn.output_proj(expected)
    assert torch.allclose(out, expected, atol=1e-5)


def test_deform_attn_padding_mask_hides_values_and_shapes_are_checked():
    torch.manual_seed(2)
    attn = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=1, num_points=4)
    value, query, ref = torch.randn(1, 12, 8), torch.randn(1, 3, 8), torch.rand(1, 3, 1, 2)
    shapes, start = torch.tensor([[3, 4]]), torch.tensor([0])
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 6:] = True
    changed = value.clone()
    changed[0, 6:] += 100.0
    a = attn(query, ref, value, shapes, start, padding_mask=mask)
    b = attn(query, ref, changed, shapes, start, padding_mask=mask)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(query, ref, value, torch.tensor([[3, 3]]), start)


# ---------------------------------------------------------------- pixel decoder and decoder


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_pixel_decoder_and_decoder_shapes(height, width):
    torch.manual_seed(0)
    pixel_decoder, decoder = tiny_pixel_decoder(), tiny_decoder(num_layers=2, num_queries=4)
    mask_features, multi_scale = pixel_decoder(backbone_features(2, height, width))
    assert mask_features.shape == (2, 32, height // 4, width // 4)
    assert [tuple(m.shape) for m in multi_scale] == [
        (2, 32, height // s, width // s) for s in (32, 16, 8)
    ]  # coarsest first
    out = decoder(multi_scale, mask_features)
    assert out["pred_embeds"].shape == (2, 4, 16)
    assert out["pred_masks"].shape == (2, 4, height // 4, width // 4)
    assert len(out["aux_outputs"]) == 2  # initial queries + every layer but the last
    for aux in out["aux_outputs"]:
        assert aux["pred_embeds"].shape == (2, 4, 16)
        assert aux["pred_masks"].shape == (2, 4, height // 4, width // 4)
    assert all(torch.isfinite(t).all() for t in (mask_features, out["pred_masks"], out["pred_embeds"]))
    # Images are decoded independently: image 1 alone gives the same result as in the batch.
    feats = backbone_features(2, height, width)
    single = decoder(*pixel_decoder({k: v[1:] for k, v in feats.items()})[::-1])
    assert torch.allclose(single["pred_masks"][0], out["pred_masks"][1], atol=1e-4)


def test_pixel_decoder_rejects_missing_levels():
    with pytest.raises(ValueError, match="transformer_in_features"):
        DeformablePixelDecoder(input_shape=INPUT_SHAPE, transformer_in_features=("res3", "res6"), conv_dim=32)


def test_attention_mask_is_per_head_and_thresholded():
    torch.manual_seed(0)
    decoder = tiny_decoder().eval()
    queries = torch.randn(2, 4, 32)
    mask_features = torch.randn(2, 32, 8, 8)
    embeds, masks, attn_mask, binary = decoder.predict(queries, mask_features, (4, 4))
    assert binary is None  # labelled training: no class-agnostic head
    assert embeds.shape == (2, 4, 16) and masks.shape == (2, 4, 8, 8)
    assert attn_mask.shape == (2 * 4, 4, 16) and attn_mask.dtype == torch.bool
    resized = F.interpolate(masks, size=(4, 4), mode="bilinear", align_corners=False).flatten(2)
    for b in range(2):
        for h in range(4):  # (B * heads) is batch-major, as nn.MultiheadAttention expects
            assert torch.equal(attn_mask[b * 4 + h], resized[b].sigmoid() < 0.5)


def _first_cross_output(decoder, multi_scale, mask_features):
    captured = {}
    hook = decoder.cross_attention_layers[0].register_forward_hook(lambda m, i, o: captured.update(out=o.detach()))
    with torch.no_grad():
        decoder(multi_scale, mask_features)
    hook.remove()
    return captured["out"]


def test_masked_attention_ignores_memory_outside_the_previous_mask():
    """Query 0's initial mask covers the left half: its first cross-attention cannot see the right half."""
    torch.manual_seed(0)
    decoder = tiny_decoder(num_layers=1).eval()
    with torch.no_grad():
        direction = decoder.mask_embed(decoder.decoder_norm(decoder.query_feat.weight))[0]
    direction = direction / direction.norm()
    # Mask logits of query 0 are +10|e| on the left half and -10|e| on the right half.
    left_right = torch.cat([torch.ones(8), -torch.ones(8)])[None, :].expand(16, 16)
    mask_features = 10.0 * direction[None, :, None, None] * left_right[None, None]
    multi_scale = [torch.randn(1, 32, s, s) for s in (4, 8, 16)]
    perturbed = [m.clone() for m in multi_scale]
    # Columns 2, 3 of the 4x4 level sample mask columns 9..14 only, all on the right.
    perturbed[0][..., 2:] += 5.0 * torch.randn(1, 32, 4, 2)

    before = _first_cross_output(decoder, multi_scale, mask_features)
    after = _first_cross_output(decoder, perturbed, mask_features)
    assert torch.equal(before[0, 0], after[0, 0])

    # Control: with a mask covering everything the same query does see the change.
    everywhere = 10.0 * direction[None, :, None, None].expand(1, 32, 16, 16)
    assert not torch.allclose(
        _first_cross_output(decoder, multi_scale, everywhere)[0, 0],
        _first_cross_output(decoder, perturbed, everywhere)[0, 0],
        atol=1e-4,
    )
    # An empty mask is un-masked (attends everywhere) rather than producing NaN.
    nowhere = -everywhere
    empty_before = _first_cross_output(decoder, multi_scale, nowhere)
    empty_after = _first_cross_output(decoder, perturbed, nowhere)
    assert torch.isfinite(empty_before).all()
    assert not torch.allclose(empty_before[0, 0], empty_after[0, 0], atol=1e-4)


# ---------------------------------------------------------------- matcher


def rect_masks(boxes, size=64):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


BOXES = [(0, 32, 0, 32), (0, 32, 32, 64), (32, 64, 0, 64)]


def test_matcher_recovers_the_permutation():
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1])
    masks = rect_masks(BOXES)
    query_of_target = [3, 0, 4]
    pred_logits = torch.zeros(1, 5, 4)
    pred_logits[0, :, 3] = 5.0  # no-object for unused queries
    pred_masks = torch.randn(1, 5, 16, 16)
    for t, q in enumerate(query_of_target):
        pred_logits[0, q] = 0.0
        pred_logits[0, q, labels[t]] = 8.0
        pred_masks[0, q] = 20.0 * (F.avg_pool2d(masks[t][None].float(), 4)[0] * 2 - 1)
    (query_idx, target_idx), = HungarianMatcher(num_points=500)(
        {"pred_logits": pred_logits, "pred_masks": pred_masks}, [{"labels": labels, "masks": masks}]
    )
    assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
    assert query_idx.tolist() == [0, 3, 4]
    assert target_idx.tolist() == [1, 0, 2]


def test_matcher_equals_brute_force():
    torch.manual_seed(3)
    num_queries, num_points = 5, 64
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    pred_logits = torch.randn(2, num_queries, 4)
    pred_masks = torch.randn(2, num_queries, 8, 8) * 3
    targets = [
        {"labels": torch.tensor([1, 0, 2]), "masks": torch.rand(3, 32, 32) > 0.5},
        {"labels": torch.tensor([2, 2]), "masks": torch.rand(2, 32, 32) > 0.5},
    ]
    indices = matcher(
        {"pred_logits": pred_logits, "pred_masks": pred_masks}, targets, generator=torch.Generator().manual_seed(7)
    )
    gen = torch.Generator().manual_seed(7)
    for image, target in enumerate(targets):
        coords = torch.rand(num_points, 2, generator=gen)  # the matcher's draw for this image
        grid = (coords * 2 - 1)[None, :, None, :]
        pred_pts = F.grid_sample(pred_masks[image][:, None], grid.expand(num_queries, -1, -1, -1), align_corners=False)
        n = len(target["labels"])
        tgt_pts = F.grid_sample(target["masks"][:, None].float(), grid.expand(n, -1, -1, -1), align_corners=False)
        pred_pts, tgt_pts = pred_pts.flatten(1), tgt_pts.flatten(1)
        probs = pred_logits[image].softmax(-1)
        cost = torch.zeros(num_queries, n)
        for q in range(num_queries):
            for t in range(n):
                bce = F.binary_cross_entropy_with_logits(pred_pts[q], tgt_pts[t])
                s = pred_pts[q].sigmoid()
                dice = 1 - (2 * (s * tgt_pts[t]).sum() + 1) / (s.sum() + tgt_pts[t].sum() + 1)
                cost[q, t] = -2.0 * probs[q, target["labels"][t]] + 5.0 * bce + 5.0 * dice
        assignments = itertools.permutations(range(num_queries), n)  # query of each target
        best = min(assignments, key=lambda qs: sum(cost[q, t] for t, q in enumerate(qs)))
        query_idx, target_idx = indices[image]
        got = dict(zip(target_idx.tolist(), query_idx.tolist()))
        assert [got[t] for t in range(n)] == list(best)
        assert torch.allclose(
            matcher.cost_matrix(pred_logits[image], pred_masks[image], target["labels"], target["masks"], coords),
            cost,
            atol=1e-5,
        )


def test_matcher_empty_targets_and_non_finite_costs():
    matcher = HungarianMatcher(num_points=32)
    outputs = {"pred_logits": torch.randn(2, 3, 3), "pred_masks": torch.randn(2, 3, 8, 8)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32, dtype=torch.bool)},
    ]
    indices = matcher(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0 and indices[0][0].dtype == torch.int64
    assert indices[1][1].tolist() == [0] and len(indices[1][0]) == 1
    outputs["pred_masks"][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite matching cost for image 1"):
        matcher(outputs, targets)


# ---------------------------------------------------------------- criterion


def criterion_targets():
    return [
        {"labels": torch.tensor([0, 2]), "masks": rect_masks(BOXES[:2])},
        {"labels": torch.tensor([1]), "masks": rect_masks(BOXES[2:])},
    ]


def perfect_outputs(targets, num_queries=4, num_classes=3):
    logits = torch.full((len(targets), num_queries, num_classes + 1), -10.0)
    logits[..., -1] = 10.0
    masks = torch.full((len(targets), num_queries, 16, 16), -20.0)
    for b, target in enumerate(targets):
        for t, label in enumerate(target["labels"]):
            logits[b, t] = -10.0
            logits[b, t, label] = 10.0
            masks[b, t] = 20.0 * (F.avg_pool2d(target["masks"][t][None].float(), 4)[0] * 2 - 1)
    return logits, masks


def make_criterion(**kwargs):
    kwargs.setdefault("num_points", 256)
    return SetCriterion(matcher=HungarianMatcher(num_points=256), weight_dict=WEIGHTS, **kwargs)


def test_criterion_perfect_beats_shuffled_and_gradients_flow():
    torch.manual_seed(0)
    targets = criterion_targets()
    criterion = make_criterion()
    logits, masks = perfect_outputs(targets)
    perfect = criterion({"pred_logits": logits, "pred_masks": masks}, targets)
    assert perfect["loss_ce"] < 1e-3 and perfect["loss_dice"] < 0.05 and perfect["loss_mask"] < 0.5
    # Image 0's two masks swapped between its two queries: class and mask now disagree.
    shuffled_masks = masks.clone()
    shuffled_masks[0, [0, 1]] = masks[0, [1, 0]]
    shuffled = criterion({"pred_logits": logits, "pred_masks": shuffled_masks}, targets)
    assert criterion.weighted_total(perfect) < 0.1 * criterion.weighted_total(shuffled)

    logits = torch.randn(2, 4, 4, requires_grad=True)
    masks = torch.randn(2, 4, 16, 16, requires_grad=True)
    criterion.weighted_total(criterion({"pred_logits": logits, "pred_masks": masks}, targets)).backward()
    for grad in (logits.grad, masks.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


class FixedMatcher(torch.nn.Module):
    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return self.indices


def test_class_loss_weights_no_object_and_follows_the_vocabulary_size():
    torch.manual_seed(0)
    targets = criterion_targets()
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    criterion = SetCriterion(matcher=FixedMatcher(indices), weight_dict=WEIGHTS, eos_coef=0.1, num_points=64)
    for num_classes in (3, 6):  # open vocabulary: K read from the logits at every call
        logits = torch.randn(2, 4, num_classes + 1)
        losses = criterion({"pred_logits": logits, "pred_masks": torch.randn(2, 4, 16, 16)}, targets)
        classes = torch.full((2, 4), num_classes)
        classes[0, 1], classes[0, 3], classes[1, 2] = 2, 0, 1
        weight = torch.ones(num_classes + 1)
        weight[-1] = 0.1
        manual = F.cross_entropy(logits.transpose(1, 2), classes, weight=weight)
        assert torch.allclose(losses["loss_ce"], manual, atol=1e-6)
        assert not torch.allclose(losses["loss_ce"], F.cross_entropy(logits.transpose(1, 2), classes), atol=1e-4)
    with pytest.raises(ValueError, match="outside the 2 classes"):
        criterion({"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 16, 16)}, targets)


def test_criterion_with_no_targets_is_finite_and_keeps_the_graph():
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}] * 2
    logits = torch.randn(2, 4, 4, requires_grad=True)
    masks = torch.randn(2, 4, 16, 16, requires_grad=True)
    criterion = make_criterion()
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    criterion.weighted_total(losses).backward()
    assert masks.grad is not None and masks.grad.abs().sum() == 0
    assert logits.grad[..., -1].sum() < 0  # every query is pushed towards no-object


def test_deep_supervision_keys_and_weighted_total():
    torch.manual_seed(0)
    targets = criterion_targets()
    outputs = {"pred_logits": torch.randn(2, 4, 4), "pred_masks": torch.randn(2, 4, 16, 16)}
    outputs["aux_outputs"] = [{"pred_logits": torch.randn(2, 4, 4), "pred_masks": torch.randn(2, 4, 16, 16)}] * 2
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    assert set(losses) == {f"{n}{s}" for n in WEIGHTS for s in ("", "_0", "_1")}
    manual = sum(WEIGHTS[name.rsplit("_", 1)[0] if name[-1].isdigit() else name] * v for name, v in losses.items())
    assert torch.allclose(criterion.weighted_total(losses), manual)
    with pytest.raises(KeyError, match="loss_other"):
        criterion.weighted_total({**losses, "loss_other": torch.tensor(1.0)})
    assert set(make_criterion(deep_supervision=False)(outputs, targets)) == set(WEIGHTS)


# ---------------------------------------------------------------- caption grounding


def grounding_batch(seed=0, batch=4, queries=5, dim=16):
    gen = torch.Generator().manual_seed(seed)
    nouns = [F.normalize(torch.randn(n, dim, generator=gen), dim=-1) for n in (2, 3, 1, 2)[:batch]]
    embeds = F.normalize(torch.randn(batch, queries, dim, generator=gen), dim=-1)
    for i, noun in enumerate(nouns):  # image i has queries that ground its own nouns
        embeds[i, : len(noun)] = noun
    return embeds, nouns


def manual_grounding(embeds, nouns, scale):
    """ODISE's score, written out: for each noun, the queries' scaled similarities weighted by their
    softmax over the queries, summed; averaged over the caption's nouns."""
    size = len(nouns)
    logits = torch.zeros(size, size)
    for i in range(size):
        for j in range(size):
            per_noun = []
            for n in nouns[j]:
                s = scale * (embeds[i] @ n)  # (Q,)
                per_noun.append((s.softmax(0) * s).sum())
            logits[i, j] = torch.stack(per_noun).mean()
    own = torch.arange(size)
    return 0.5 * (F.cross_entropy(logits, own) + F.cross_entropy(logits.T, own))


def test_grounding_loss_prefers_own_captions_and_is_symmetric():
    embeds, nouns = grounding_batch()
    scale = torch.tensor(10.0)
    matched = caption_grounding_loss(embeds, nouns, scale)
    shuffled = caption_grounding_loss(embeds, nouns[1:] + nouns[:1], scale)
    assert matched < shuffled
    assert torch.allclose(matched, manual_grounding(embeds, nouns, scale), atol=1e-5)
    # A soft maximum over the queries, not the hard one: the two differ at a small scale.
    low = torch.tensor(2.0)
    hard = torch.stack([torch.stack([torch.stack([(low * embeds[i] @ n).max() for n in nouns[j]]).mean()
                                     for j in range(4)]) for i in range(4)])
    own = torch.arange(4)
    hard_loss = 0.5 * (F.cross_entropy(hard, own) + F.cross_entropy(hard.T, own))
    assert abs(float(caption_grounding_loss(embeds, nouns, low) - hard_loss)) > 1e-2
    # Both directions count equally: reordering the batch changes nothing.
    order = [2, 0, 3, 1]
    assert torch.allclose(caption_grounding_loss(embeds[order], [nouns[i] for i in order], scale), matched, atol=1e-5)


def test_grounding_loss_skips_images_without_nouns():
    embeds, nouns = grounding_batch()
    scale = torch.tensor(5.0)
    nouns_with_gap = list(nouns)
    nouns_with_gap[1] = torch.zeros(0, 16)
    kept = [0, 2, 3]
    expected = caption_grounding_loss(embeds[kept], [nouns[i] for i in kept], scale)
    assert torch.allclose(caption_grounding_loss(embeds, nouns_with_gap, scale), expected, atol=1e-6)

    embeds = embeds.clone().requires_grad_(True)
    scale = torch.tensor(5.0, requires_grad=True)
    lonely = [nouns[0]] + [torch.zeros(0, 16)] * 3
    zero = caption_grounding_loss(embeds, lonely, scale)
    assert zero.item() == 0.0
    zero.backward()
    assert embeds.grad is not None and scale.grad is not None


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    pixel_decoder, decoder = tiny_pixel_decoder(), tiny_decoder(num_layers=2, num_queries=4)
    text = F.normalize(torch.randn(3, 16), dim=-1)  # stand-in for CLIP text embeddings of 3 classes
    no_object = torch.nn.Parameter(torch.zeros(1))
    criterion = make_criterion()
    features = backbone_features(2, 64, 64)
    targets = criterion_targets()
    params = list(pixel_decoder.parameters()) + list(decoder.parameters()) + [no_object]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def total_loss(seed=None):
        if seed is not None:
            torch.manual_seed(seed)  # same points for the before/after comparison
        out = decoder(*reversed(pixel_decoder(features)))

        def with_logits(pred):
            sims = 10.0 * F.normalize(pred["pred_embeds"], dim=-1) @ text.T
            logits = torch.cat([sims, no_object.expand(*sims.shape[:2], 1)], dim=-1)
            return {"pred_logits": logits, "pred_masks": pred["pred_masks"]}

        outputs = with_logits(out)
        outputs["aux_outputs"] = [with_logits(aux) for aux in out["aux_outputs"]]
        return criterion.weighted_total(criterion(outputs, targets))

    with torch.no_grad():
        before = total_loss(seed=123)
    for _ in range(15):
        optimizer.zero_grad()
        total_loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = total_loss(seed=123)
    assert torch.isfinite(after) and after < 0.8 * before


# ------------------------------------------------------------------ the mask losses, by hand
def _bilinear_by_hand(values: torch.Tensor, x: float, y: float) -> float:
    """A (H, W) map at the normalised point (x, y): pixel centres at (i + 0.5) / W, zero outside."""
    H, W = values.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                total += wy * wx * float(values[yy, xx])
    return total


def test_uncertain_points_are_the_most_uncertain_candidates_then_fresh_ones():
    """PointRend's sampler, re-done by hand: 3 x 8 uniform candidates from the generator, the
    0.75 x 8 = 6 whose bilinear logit is nearest 0 kept, then 2 fresh uniform points."""
    from diffseg_d2.modeling.heads.matcher import uncertain_point_coords

    logits = torch.randn(2, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    got = uncertain_point_coords(logits, lambda v: -v.abs(), 8, 3.0, 0.75, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    candidates = torch.rand(2, 24, 2, generator=g)
    fresh = torch.rand(2, 2, 2, generator=g)
    for n in range(2):
        scored = [(-abs(_bilinear_by_hand(logits[n, 0], float(x), float(y))), i)
                  for i, (x, y) in enumerate(candidates[n])]
        best = [i for _, i in sorted(scored, key=lambda s: -s[0])[:6]]
        assert sorted(best) == sorted(int(i) for i in torch.nonzero(
            (got[n, :6, None, :] == candidates[n][None]).all(-1))[:, 1])
        torch.testing.assert_close(got[n, 6:], fresh[n])


def test_mask_bce_and_dice_by_hand_are_divided_by_the_number_of_target_masks(monkeypatch):
    """loss_mask = sum over matched masks of the mean point BCE, / num_masks; loss_dice = sum of
    1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1), / num_masks (the global target count, here 3,
    not the 2 matched)."""
    from diffseg_d2.modeling.heads import criterion as criterion_module

    pred = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]], [[-0.2, 1.5], [4.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])  # the 4 pixel centres
    monkeypatch.setattr(criterion_module, "uncertain_point_coords",
                        lambda logits, *a, **k: centres.expand(logits.shape[0], -1, -1).clone())
    criterion = SetCriterion(matcher=None, weight_dict={})
    indices = [(torch.tensor([1, 0]), torch.tensor([1, 0]))]  # query 1 <-> target 1, query 0 <-> target 0
    losses = criterion.mask_losses(pred, [{"masks": target}], indices, torch.tensor(3.0))
    bce = dice = 0.0
    for q, t in ((1, 1), (0, 0)):
        x, y = pred[0, q].flatten().tolist(), target[t].flatten().tolist()
        p = [1 / (1 + math.exp(-v)) for v in x]
        bce += sum(-(yi * math.log(pi) + (1 - yi) * math.log(1 - pi)) for pi, yi in zip(p, y)) / 4
        dice += 1 - (2 * sum(pi * yi for pi, yi in zip(p, y)) + 1) / (sum(p) + sum(y) + 1)
    assert losses["loss_mask"].item() == pytest.approx(bce / 3, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice / 3, rel=1e-5)


def test_grounding_loss_by_hand():
    """score(i, j) = mean over caption j's nouns n of sum_q softmax_q(s_iqn) s_iqn, s = scale * cosine;
    loss = (CE over captions for each image + CE over images for each caption) / 2."""
    from diffseg_d2.modeling.heads import caption_grounding_loss

    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(3, 4, 5, generator=g), dim=-1)
    nouns = [F.normalize(torch.randn(k, 5, generator=g), dim=-1) for k in (2, 1, 3)]
    scale = torch.tensor(7.0)
    score = [[0.0] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(3):
            per_noun = []
            for n in range(nouns[j].shape[0]):
                s = [float(scale * queries[i, q] @ nouns[j][n]) for q in range(4)]
                z = sum(math.exp(v) for v in s)
                per_noun.append(sum(math.exp(v) / z * v for v in s))
            score[i][j] = sum(per_noun) / len(per_noun)

    def ce(row, own):
        return -row[own] + math.log(sum(math.exp(v) for v in row))

    rows = sum(ce(score[i], i) for i in range(3)) / 3
    columns = sum(ce([score[i][j] for i in range(3)], j) for j in range(3)) / 3
    assert caption_grounding_loss(queries, nouns, scale).item() == pytest.approx((rows + columns) / 2, rel=1e-5)
