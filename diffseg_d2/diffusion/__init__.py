"""The diffusion substrate shared by every method: the substrate interface and its families
(``substrate``; ``frozen_sd``, ``frozen_pixart``, ``frozen_transformer``), prompts, attention and feature recording.

Nothing here imports diffusers or transformers at import time.
"""
from .attention import (
    AttentionRecorder,
    AttentionStore,
    attention_blocks,
    attention_layers,
    available_factors,
    minmax_per_map,
    record_attention,
    daam_heat_maps,
    summed_cross_maps,
)
from .features import FeatureTap, decoder_inputs, feature_taps, record_inputs, tap_modules, tappable_layers
from ..pretrained.stable_diffusion import StableDiffusionParts, load_stable_diffusion
from .cross_attention_substrate import CrossAttentionDiffusion
from .frozen_pixart import FrozenPixArt
from .frozen_sd import FrozenStableDiffusion
from .frozen_transformer import FrozenDiffusionTransformer
from .joint_attention import JointAttentionStore, joint_attention_layers, record_joint_attention
from .substrate import PromptEmbeds, load_diffusion
from .prompts import TOKEN_SELECTIONS, ClassPrompts, build_class_prompts, build_joint_prompt

__all__ = [
    "AttentionRecorder",
    "AttentionStore",
    "ClassPrompts",
    "CrossAttentionDiffusion",
    "FeatureTap",
    "FrozenDiffusionTransformer",
    "FrozenPixArt",
    "FrozenStableDiffusion",
    "JointAttentionStore",
    "joint_attention_layers",
    "record_joint_attention",
    "PromptEmbeds",
    "StableDiffusionParts",
    "attention_blocks",
    "attention_layers",
    "available_factors",
    "TOKEN_SELECTIONS",
    "build_class_prompts",
    "build_joint_prompt",
    "load_diffusion",
    "load_stable_diffusion",
    "minmax_per_map",
    "record_attention",
    "record_inputs",
    "decoder_inputs",
    "feature_taps",
    "tap_modules",
    "tappable_layers",
    "summed_cross_maps",
    "daam_heat_maps",
]
