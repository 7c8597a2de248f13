"""Backbones; importing this module registers them in BACKBONE_REGISTRY."""
from .diffusion_unet import DiffusionUNetBackbone, build_diffusion_unet_fpn_backbone

__all__ = ["DiffusionUNetBackbone", "build_diffusion_unet_fpn_backbone"]
