"""Mask2Former-style mask head in pure PyTorch: pixel decoder, masked-attention decoder, matching, losses."""
from .criterion import SetCriterion, caption_grounding_loss
from .matcher import HungarianMatcher, point_sample, uncertain_point_coords
from .ms_deform_attn import MultiScaleDeformableAttention
from .pixel_decoder import DeformablePixelDecoder, SinePositionEncoding
from .transformer_decoder import MLP, MaskedAttentionDecoder

__all__ = [
    "DeformablePixelDecoder",
    "HungarianMatcher",
    "MLP",
    "MaskedAttentionDecoder",
    "MultiScaleDeformableAttention",
    "SetCriterion",
    "SinePositionEncoding",
    "caption_grounding_loss",
    "point_sample",
    "uncertain_point_coords",
]
