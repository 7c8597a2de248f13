"""The released ODISE checkpoints (NVlabs/ODISE) in this package's parameter names.

The released model names its parts after the reference code: ``backbone.feature_extractor``
(captioner) and ``backbone.feature_projections.{i}`` (one bottleneck block per tap, taps in the
order VAE encoder, UNet, VAE decoder), ``sem_seg_head.pixel_decoder`` (Mask2Former's
``MSDeformAttnPixelDecoder``), ``sem_seg_head.predictor`` (its masked-attention decoder with
ODISE's pooled mask embedding) and ``category_head`` (text projection and "no object").
``convert_released_state_dict`` renames what trains into ``ODISE``'s names; the frozen parts a
released file may also hold (Stable Diffusion, CLIP, cached text embeddings) are left out: they
come from ``MODEL.DIFFSEG.SD.WEIGHTS`` / ``CLIP.WEIGHTS``. ``tools/convert_odise_checkpoint.py``
applies it to a file.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Sequence, Tuple

import torch

# (pattern of a released name, replacement in ours); the first that matches wins.
_RULES: List[Tuple[str, str]] = [
    # implicit captioner
    (r"^backbone\.feature_extractor\.clip_project\.linear\.(weight|bias)$", r"backbone.captioner.project.\1"),
    (r"^backbone\.feature_extractor\.clip_project\.positional_embedding$", "backbone.captioner.positional_embedding"),
    (r"^backbone\.feature_extractor\.alpha_cond$", "backbone.captioner.gate"),
    (r"^backbone\.feature_extractor\.time_embed_project\.linear\.(weight|bias)$", r"backbone.captioner.time_project.\1"),
    (r"^backbone\.feature_extractor\.time_embed_project\.positional_embedding$",
     "backbone.captioner.time_positional_embedding"),
    (r"^backbone\.feature_extractor\.alpha_cond_time_embed$", "backbone.captioner.time_gate"),
    # pixel decoder
    (r"^sem_seg_head\.pixel_decoder\.input_proj\.(\d+)\.([01])\.(weight|bias)$", r"pixel_decoder.input_proj.\1.\2.\3"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", "pixel_decoder.level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)$",
     r"pixel_decoder.encoder.\1.attn.\2.\3"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)$",
     r"pixel_decoder.encoder.\1.norm_attn.\2"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear1\.(weight|bias)$",
     r"pixel_decoder.encoder.\1.ffn.0.\2"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear2\.(weight|bias)$",
     r"pixel_decoder.encoder.\1.ffn.3.\2"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)$",
     r"pixel_decoder.encoder.\1.norm_ffn.\2"),
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.(weight|bias)$", r"pixel_decoder.mask_features.\1"),
    # transformer decoder
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)$",
     r"decoder.self_attention_layers.\1.attn.\2"),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     r"decoder.self_attention_layers.\1.norm.\2"),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)$",
     r"decoder.cross_attention_layers.\1.attn.\2"),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)$",
     r"decoder.cross_attention_layers.\1.norm.\2"),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.linear1\.(weight|bias)$", r"decoder.ffn_layers.\1.ffn.0.\2"),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.linear2\.(weight|bias)$", r"decoder.ffn_layers.\1.ffn.3.\2"),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.norm\.(weight|bias)$", r"decoder.ffn_layers.\1.norm.\2"),
    (r"^sem_seg_head\.predictor\.(decoder_norm\.(?:weight|bias)|query_feat\.weight|query_embed\.weight"
     r"|level_embed\.weight|mask_embed\.layers\.\d+\.(?:weight|bias))$", r"decoder.\1"),
    (r"^sem_seg_head\.predictor\.input_proj\.(\d+)\.(weight|bias)$", r"decoder.input_proj.\1.\2"),
    (r"^sem_seg_head\.predictor\.post_mask_embed\.pool_proj\.(.+)$", r"decoder.pool_proj.\1"),
    (r"^sem_seg_head\.predictor\.post_mask_embed\.mask_embed\.(.+)$", r"decoder.embed_head.\1"),
    (r"^sem_seg_head\.predictor\.post_mask_embed\.logit_scale$", "classifier.logit_scale"),
    # classifier (category_head: the label-trained model; word_head: the caption-trained one)
    (r"^(?:category_head|word_head)\.text_proj\.(weight|bias)$", r"classifier.text_proj.\1"),
    (r"^sem_seg_head\.predictor\.class_embed\.(weight|bias)$", r"decoder.class_head.\1"),
    (r"^category_head\.null_embed$", "classifier.null_embed"),
]
# Frozen parts and caches a released file may hold: not ours to load.
_FROZEN = re.compile(
    r"^(backbone\.feature_extractor\.(ldm_extractor|clip)\.|clip_head\.|(category_head|word_head)\.(clip\.|text_embed$)"
    r"|backbone\.feature_extractor\.ldm_extractor|.*test_labels$)"
)
# The parameters the reference keeps with one more leading dimension of size 1 than ours, and only these: its
# captioner's time positional embedding is a positional linear layer's over one time step, (1, 1, T) for our
# (1, T), and its "no object" embedding is CLIP's embedding of a list of one empty text, (1, D) for our (D,).
# Any other difference of shape is an error: equal element counts do not make a transposed linear weight or a
# permuted conv kernel the right weights.
_LEADING_DIMENSION = ("backbone.captioner.time_positional_embedding", "classifier.null_embed")
_PROJECTION = re.compile(r"^backbone\.feature_projections\.(\d+)\.0\.(.+)$")
_FPN = re.compile(r"^sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.(.+)$")


class ReleasedCheckpointError(ValueError):
    """A released ODISE file that does not fit the model (names what is wrong)."""


def convert_released_state_dict(
    released: Dict[str, torch.Tensor], projection_names: Sequence[str], reshape: Callable[[str], Tuple[int, ...]]
) -> Dict[str, torch.Tensor]:
    """Rename a released ODISE state dict into ``ODISE``'s names.

    Args:
        released: the released model's state dict.
        projection_names: our name of the projection of each tap, in the reference's tap order
            (``ODISE.backbone.released_projection_order()``).
        reshape: our shape of a converted key, or None for a key we do not have (left to the caller's check of
            the whole state dict). Only the keys of ``_LEADING_DIMENSION`` may differ, by the reference's
            leading dimension of size 1, which is dropped.

    Raises:
        ReleasedCheckpointError: keys that are neither converted nor known frozen parts, a value whose shape
            differs from ours (other than by that leading dimension), or two released keys converted to one.
    """
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}  # our key -> the released key it came from
    unknown = []
    for key, value in released.items():
        if not isinstance(value, torch.Tensor) or _FROZEN.match(key):
            continue
        new = None
        m = _PROJECTION.match(key)
        if m:
            index = int(m.group(1))
            if index >= len(projection_names):
                raise ReleasedCheckpointError(
                    f"{key}: the file has more tap projections than this backbone's {len(projection_names)} taps "
                    "(check MODEL.DIFFSEG.ODISE.BACKBONE.*_BLOCKS)."
                )
            new = f"backbone.projections.{projection_names[index]}.{m.group(2)}"
        m = None if new else _FPN.match(key)
        if m:
            # Mask2Former's FPN levels adapter_1/layer_1, ... are ours lateral/output convs 0, ...
            kind = "lateral_convs" if m.group(1) == "adapter" else "output_convs"
            new = f"pixel_decoder.{kind}.{int(m.group(2)) - 1}.{m.group(3)}"
        if new is None:
            for pattern, replacement in _RULES:
                if re.match(pattern, key):
                    new = re.sub(pattern, replacement, key)
                    break
        if new is None:
            unknown.append(key)
            continue
        if new in source:
            raise ReleasedCheckpointError(
                f"The released keys {source[new]} and {key} both convert to {new}: a file holds one model's "
                "parameters, so it mixes two models (the label-trained one's category_head and the caption-trained "
                "one's word_head, say). Convert a file of one released model."
            )
        shape = reshape(new)
        if shape is not None and tuple(value.shape) != tuple(shape):
            if new in _LEADING_DIMENSION and tuple(value.shape) == (1, *shape):
                value = value[0]
            else:
                known = (f"; the reference's shape for it is {(1, *shape)}" if new in _LEADING_DIMENSION else "")
                raise ReleasedCheckpointError(
                    f"{key} has shape {tuple(value.shape)}, but this model's {new} has shape {tuple(shape)}{known}. "
                    "The file was made for another configuration (check the config's MODEL.DIFFSEG.ODISE settings "
                    "against the released model's) or its tensors were rearranged; it is not converted."
                )
        source[new] = key
        out[new] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ReleasedCheckpointError(f"{len(unknown)} keys of the released file are not ODISE parameters known here: {shown}")
    return out
