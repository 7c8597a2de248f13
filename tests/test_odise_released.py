"""Released ODISE checkpoints: the reference's parameter names (NVlabs/ODISE, Mask2Former) renamed into
ours, frozen parts dropped, unknown keys refused, and tools/convert_odise_checkpoint.py end to end."""
import os
import re
import subprocess
import sys

import pytest
import torch

from diffseg_d2.modeling.odise.released import ReleasedCheckpointError, convert_released_state_dict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_ODISE = os.path.join(ROOT, "configs", "tiny", "odise.yaml")

# Released name -> ours: one example of every kind of parameter (the reference's module names).
EXAMPLES = {
    "backbone.feature_extractor.clip_project.linear.weight": "backbone.captioner.project.weight",
    "backbone.feature_extractor.alpha_cond": "backbone.captioner.gate",
    "backbone.feature_extractor.time_embed_project.positional_embedding": "backbone.captioner.time_positional_embedding",
    "backbone.feature_extractor.alpha_cond_time_embed": "backbone.captioner.time_gate",
    "sem_seg_head.pixel_decoder.transformer.level_embed": "pixel_decoder.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.2.self_attn.sampling_offsets.bias":
        "pixel_decoder.encoder.2.attn.sampling_offsets.bias",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear2.weight": "pixel_decoder.encoder.0.ffn.3.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.bias": "pixel_decoder.encoder.0.norm_ffn.bias",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight": "pixel_decoder.lateral_convs.0.norm.weight",
    "sem_seg_head.pixel_decoder.layer_1.weight": "pixel_decoder.output_convs.0.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight":
        "decoder.cross_attention_layers.8.attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_ffn_layers.3.linear1.bias": "decoder.ffn_layers.3.ffn.0.bias",
    "sem_seg_head.predictor.query_feat.weight": "decoder.query_feat.weight",
    "sem_seg_head.predictor.post_mask_embed.mask_embed.1.layers.2.weight": "decoder.embed_head.1.layers.2.weight",
    "sem_seg_head.predictor.post_mask_embed.logit_scale": "classifier.logit_scale",
    "category_head.null_embed": "classifier.null_embed",
    "category_head.text_proj.weight": "classifier.text_proj.weight",
    # The caption-trained model: its word head's projection and the binary class head.
    "word_head.text_proj.bias": "classifier.text_proj.bias",
    "sem_seg_head.predictor.class_embed.weight": "decoder.class_head.weight",
    "backbone.feature_projections.1.0.conv2.norm.weight": "backbone.projections.res3_vae_encoder_7.conv2.norm.weight",
}
SD15_ORDER = ["res2_vae_encoder_5", "res3_vae_encoder_7", "res5_unet_2", "res5_unet_5", "res4_unet_8", "res3_unet_11",
              "res3_vae_decoder_2", "res2_vae_decoder_5"]


def test_every_kind_of_released_name_maps_to_ours_and_frozen_parts_are_dropped():
    released = {k: torch.zeros(2) for k in EXAMPLES}
    released["backbone.feature_extractor.ldm_extractor.ldm.unet.out.0.weight"] = torch.zeros(2)  # frozen SD
    released["category_head.clip.clip.logit_scale"] = torch.zeros(())  # frozen CLIP
    released["category_head.text_embed"] = torch.zeros(3, 2)  # cached text embeddings
    released["word_head.clip.clip.positional_embedding"] = torch.zeros(2)  # the caption model's frozen CLIP
    out = convert_released_state_dict(released, SD15_ORDER, lambda key: None)
    assert set(out) == set(EXAMPLES.values())


def test_unknown_keys_and_extra_projections_are_refused_by_name():
    with pytest.raises(ReleasedCheckpointError, match="sem_seg_head.predictor.other_head.weight"):
        convert_released_state_dict({"sem_seg_head.predictor.other_head.weight": torch.zeros(1)}, SD15_ORDER, lambda k: None)
    with pytest.raises(ReleasedCheckpointError, match="more tap projections"):
        convert_released_state_dict({"backbone.feature_projections.8.0.conv1.weight": torch.zeros(1)}, SD15_ORDER,
                                    lambda k: None)


def _as_released(key: str) -> str:
    """Our name -> the reference's (the inverse of the converter, written from the reference's module names)."""
    rules = [
        (r"^backbone\.captioner\.project\.", "backbone.feature_extractor.clip_project.linear."),
        (r"^backbone\.captioner\.positional_embedding$", "backbone.feature_extractor.clip_project.positional_embedding"),
        (r"^backbone\.captioner\.gate$", "backbone.feature_extractor.alpha_cond"),
        (r"^backbone\.captioner\.time_project\.", "backbone.feature_extractor.time_embed_project.linear."),
        (r"^backbone\.captioner\.time_positional_embedding$",
         "backbone.feature_extractor.time_embed_project.positional_embedding"),
        (r"^backbone\.captioner\.time_gate$", "backbone.feature_extractor.alpha_cond_time_embed"),
        (r"^pixel_decoder\.level_embed$", "sem_seg_head.pixel_decoder.transformer.level_embed"),
        (r"^pixel_decoder\.encoder\.(\d+)\.attn\.", r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.self_attn."),
        (r"^pixel_decoder\.encoder\.(\d+)\.norm_attn\.", r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm1."),
        (r"^pixel_decoder\.encoder\.(\d+)\.ffn\.0\.", r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear1."),
        (r"^pixel_decoder\.encoder\.(\d+)\.ffn\.3\.", r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear2."),
        (r"^pixel_decoder\.encoder\.(\d+)\.norm_ffn\.", r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm2."),
        (r"^pixel_decoder\.lateral_convs\.(\d+)\.", lambda m: f"sem_seg_head.pixel_decoder.adapter_{int(m.group(1)) + 1}."),
        (r"^pixel_decoder\.output_convs\.(\d+)\.", lambda m: f"sem_seg_head.pixel_decoder.layer_{int(m.group(1)) + 1}."),
        (r"^pixel_decoder\.", "sem_seg_head.pixel_decoder."),
        (r"^decoder\.self_attention_layers\.(\d+)\.attn\.", r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn."),
        (r"^decoder\.self_attention_layers\.", "sem_seg_head.predictor.transformer_self_attention_layers."),
        (r"^decoder\.cross_attention_layers\.(\d+)\.attn\.",
         r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.multihead_attn."),
        (r"^decoder\.cross_attention_layers\.", "sem_seg_head.predictor.transformer_cross_attention_layers."),
        (r"^decoder\.ffn_layers\.(\d+)\.ffn\.0\.", r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear1."),
        (r"^decoder\.ffn_layers\.(\d+)\.ffn\.3\.", r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear2."),
        (r"^decoder\.ffn_layers\.", "sem_seg_head.predictor.transformer_ffn_layers."),
        (r"^decoder\.pool_proj\.", "sem_seg_head.predictor.post_mask_embed.pool_proj."),
        (r"^decoder\.embed_head\.", "sem_seg_head.predictor.post_mask_embed.mask_embed."),
        (r"^decoder\.", "sem_seg_head.predictor."),
        (r"^classifier\.logit_scale$", "sem_seg_head.predictor.post_mask_embed.logit_scale"),
        (r"^classifier\.text_proj\.", "category_head.text_proj."),
        (r"^classifier\.null_embed$", "category_head.null_embed"),
    ]
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    raise AssertionError(f"no released name for {key}")


@pytest.mark.slow
def test_the_tool_converts_a_released_file_into_a_checkpoint_that_loads_and_predicts_the_same(tmp_path):
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.engine.checkpoint import StrictCheckpointer

    torch.manual_seed(0)
    source = build_model(get_diffseg_cfg(TINY_ODISE)).eval()
    order = source.backbone.released_projection_order()
    released = {}
    for key, value in source.state_dict().items():
        m = re.match(r"^backbone\.projections\.([^.]+)\.(.+)$", key)
        name = f"backbone.feature_projections.{order.index(m.group(1))}.0.{m.group(2)}" if m else _as_released(key)
        # The reference keeps these with an extra leading dimension.
        released[name] = value[None] if key in ("backbone.captioner.time_positional_embedding", "classifier.null_embed") else value
    released["category_head.text_embed"] = torch.zeros(4, 3)  # a frozen buffer of the released file
    torch.save({"model": released, "iteration": 7}, tmp_path / "released.pth")
    out = tmp_path / "converted.pth"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_odise_checkpoint.py"), "--config-file",
                           TINY_ODISE, str(tmp_path / "released.pth"), str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(1)  # a differently initialised model, then the converted weights
    target = build_model(get_diffseg_cfg(TINY_ODISE)).eval()
    StrictCheckpointer(target).load(str(out))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, msg=key)
    image = {"image": (torch.rand(3, 128, 128) * 255).byte()}
    with torch.no_grad():
        torch.testing.assert_close(target([image])[0]["sem_seg"], source([image])[0]["sem_seg"])


# ----------------------------------------------------------------------------- shapes and collisions
OUR_SHAPES = {
    "backbone.captioner.time_positional_embedding": (1, 6),
    "classifier.null_embed": (5,),
    "classifier.text_proj.weight": (3, 4),
    "pixel_decoder.output_convs.0.weight": (4, 2, 3, 3),
    "decoder.query_feat.weight": (7, 4),
}


def shape_of(key):
    return OUR_SHAPES.get(key)


def test_the_reference_extra_leading_dimension_is_dropped_on_the_keys_that_have_it():
    """The reference keeps the captioner's time positional embedding as (1, 1, T) (a positional linear layer over
    one time step) and the "no object" embedding as (1, D) (CLIP's embedding of one empty text)."""
    time = torch.randn(1, 1, 6)
    null = torch.randn(1, 5)
    out = convert_released_state_dict({
        "backbone.feature_extractor.time_embed_project.positional_embedding": time,
        "category_head.null_embed": null,
    }, SD15_ORDER, shape_of)
    assert out["backbone.captioner.time_positional_embedding"].shape == (1, 6)
    torch.testing.assert_close(out["backbone.captioner.time_positional_embedding"], time[0])
    assert out["classifier.null_embed"].shape == (5,)
    torch.testing.assert_close(out["classifier.null_embed"], null[0])


@pytest.mark.parametrize("key,value", [
    # a transposed linear weight: (in, out) for our (out, in), the same 12 elements
    ("category_head.text_proj.weight", torch.randn(4, 3)),
    # a conv weight with its kernel and channel axes swapped, the same 72 elements
    ("sem_seg_head.pixel_decoder.layer_1.weight", torch.randn(4, 3, 3, 2)),
    # a flattened table
    ("sem_seg_head.predictor.query_feat.weight", torch.randn(28)),
    # even a known key, with another change than the reference's leading dimension
    ("backbone.feature_extractor.time_embed_project.positional_embedding", torch.randn(6, 1)),
    ("category_head.null_embed", torch.randn(5, 1)),
], ids=["transposed linear", "permuted conv", "flattened", "time embedding transposed", "null embed transposed"])
def test_a_shape_mismatch_with_the_same_element_count_is_refused_naming_the_key_and_both_shapes(key, value):
    ours = {
        "category_head.text_proj.weight": "classifier.text_proj.weight",
        "sem_seg_head.pixel_decoder.layer_1.weight": "pixel_decoder.output_convs.0.weight",
        "sem_seg_head.predictor.query_feat.weight": "decoder.query_feat.weight",
        "backbone.feature_extractor.time_embed_project.positional_embedding":
            "backbone.captioner.time_positional_embedding",
        "category_head.null_embed": "classifier.null_embed",
    }[key]
    expected = shape_of(ours)
    assert value.numel() == torch.Size(expected).numel()  # a reshape would have passed it silently
    with pytest.raises(ReleasedCheckpointError, match=re.escape(key) + r".*" + re.escape(str(tuple(value.shape)))
                       + r".*" + re.escape(ours) + r".*" + re.escape(str(expected))):
        convert_released_state_dict({key: value}, SD15_ORDER, shape_of)


def test_two_released_keys_for_one_parameter_are_refused_naming_both():
    """The label-trained model's category head and the caption-trained one's word head both give our classifier's
    text projection: a file holding both would otherwise keep whichever came last."""
    released = {"category_head.text_proj.weight": torch.zeros(3, 4), "word_head.text_proj.weight": torch.ones(3, 4)}
    with pytest.raises(ReleasedCheckpointError, match=r"(?s)category_head\.text_proj\.weight.*"
                                                      r"word_head\.text_proj\.weight.*classifier\.text_proj\.weight"):
        convert_released_state_dict(released, SD15_ORDER, shape_of)
