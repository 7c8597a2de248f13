"""The frozen Stable Diffusion parts as a detectron2 backbone (ODISE's feature extractor).

Per square window of the (padded) input: the VAE posterior mean, a fixed noise
at ``NOISE_STEP`` (seeded), one UNet pass conditioned on the implicit captioner
(or the empty prompt), and the VAE decoder run on the latent as far as needed.
The INPUTS of chosen layers are tapped (``diffseg_d2.diffusion.features``; by
default the reference's: UNet layers 2, 5, 8, 11, VAE encoder 5, 7, VAE decoder
2, 5). A tap goes to the output level of its stride clamped to 4..32; each tap is
resized (nearest) to its level and projected by its own ResNet bottleneck block
with GroupNorm; a level sums its taps. A level no tap reaches (only in small
models, never in SD 1.5) takes the taps of the nearest stride.

Windows, as the reference's sliding window: the input is cut into squares of
side ``min(WINDOW, short side)`` every ``WINDOW_STRIDE`` pixels (0 = the side;
the last square aligned with the border), each resized (bicubic) to ``WINDOW``;
where squares overlap their features are averaged.

Registered in ``BACKBONE_REGISTRY`` twice:

* ``DiffusionUNetBackbone``: ``res2..res5`` (strides 4, 8, 16, 32), for heads that
  read a feature pyramid themselves (ODISE's pixel decoder);
* ``build_diffusion_unet_fpn_backbone``: the same under detectron2's ``FPN``
  (``p2..p6``), so that stock architectures such as Panoptic FPN take it as is.

The input is what detectron2's meta-architectures pass to a backbone, ``(images
- PIXEL_MEAN) / PIXEL_STD``, and must be RGB in [-1, 1]: set ``INPUT.FORMAT RGB``,
``MODEL.PIXEL_MEAN [127.5, 127.5, 127.5]`` and ``MODEL.PIXEL_STD [127.5, 127.5, 127.5]``.

Only the projections and the captioner train. The SD parts and CLIP stay in eval
mode, get no gradient, and are left out of checkpoints.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BottleneckBlock
from torch import nn

from ...checkpoint_safety import refuse_partial_loads
from ...config import check_config
from ...diffusion import (
    FrozenStableDiffusion,
    decoder_inputs,
    feature_taps,
    load_diffusion,
    record_inputs,
    tap_modules,
)
from ...diffusion.features import PARTS
from ...diffusion.substrate import substrate_kind
from ...pretrained.clip import OpenCLIP
from ...pretrained.frozen import exclude_from_checkpoints
from ...tiling import window_starts
from ..odise.captioner import ImplicitCaptioner

logger = logging.getLogger(__name__)

#: Output levels and their strides in input pixels.
LEVEL_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
#: Input sides must be multiples of this (the reference pads to 64 too).
SIZE_DIVISIBILITY = 64
_KEY = "MODEL.DIFFSEG.ODISE.BACKBONE"
# ODISE's features are a UNet's: its up-blocks' outputs at strides 8..64 (no diffusion transformer has them).
_NOT_A_UNET = ("ODISE's backbone taps a UNet's decoder blocks, and MODEL.DIFFSEG.SD.WEIGHTS = {title} is a diffusion "
               "transformer (one token grid, no multi-scale decoder). Use Stable Diffusion 1.x, 2.x or XL weights.")


def _clamped_stride(stride: int) -> int:
    """A tap's stride clamped to the output levels' range (4..32), as the reference does."""
    return min(max(stride, min(LEVEL_STRIDES.values())), max(LEVEL_STRIDES.values()))


def _assign_taps(tap_strides: Sequence[int], levels: Sequence[str]) -> Dict[str, List[int]]:
    """Which taps feed which output level: {level: [tap indices]} (see the module docstring)."""
    clamped = [_clamped_stride(s) for s in tap_strides]
    out = {name: [i for i, s in enumerate(clamped) if s == LEVEL_STRIDES[name]] for name in levels}
    for name in levels:
        if not out[name]:
            target = math.log2(LEVEL_STRIDES[name])
            best = min(abs(target - math.log2(s)) for s in clamped)
            out[name] = [i for i, s in enumerate(clamped) if abs(target - math.log2(s)) == best]
    return out


def _projection_name(level: str, tap) -> str:
    """Key of a tap's projection onto a level in ``projections`` (and so in checkpoints)."""
    return f"{level}_{tap.name.replace('.', '_')}"


def level_shapes(out_features: Sequence[str], out_channels: int) -> Dict[str, ShapeSpec]:
    """The backbone's ``output_shape()`` for these ``out_features`` and ``out_channels``, known before it is
    built (what a LazyConfig gives the heads that read it)."""
    return {f: ShapeSpec(channels=int(out_channels), stride=LEVEL_STRIDES[f]) for f in sorted(out_features, key=LEVEL_STRIDES.get)}


def _group_norm(channels: int) -> nn.GroupNorm:
    # detectron2's "GN" (32 groups) where the width allows it, as in the reference for SD's widths.
    return nn.GroupNorm(math.gcd(32, channels), channels)


@BACKBONE_REGISTRY.register()
class DiffusionUNetBackbone(Backbone):
    """ODISE's diffusion backbone (see the module docstring).

    Args:
        diffusion: the frozen SD parts.
        captioner: the implicit captioner, or None to condition on the empty prompt.
        captioner_clip: instead of ``captioner``, the CLIP model of an implicit captioner built here for
            ``diffusion`` (``ImplicitCaptioner.for_diffusion``, with the time embedding): how a LazyConfig
            gives the captioner without building the diffusion model twice.
        taps: ``{"unet" | "vae_encoder" | "vae_decoder": [layer indices]}`` (the reference's numbering).
        out_features: subset of ``res2..res5`` to return.
        out_channels: channels of every output level.
        window: side of the square the UNet reads (pixels).
        window_stride: step between windows (pixels); 0 = the window's side.
        window_batch: most windows per UNet call.
        noise_step: scheduler timestep of the added noise (0 = the least noise).
        seed: seed of the fixed noise.
    """

    @configurable
    def __init__(
        self,
        *,
        diffusion: FrozenStableDiffusion,
        captioner: Optional[ImplicitCaptioner] = None,
        captioner_clip: Optional[OpenCLIP] = None,
        taps: Dict[str, Sequence[int]],
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 512,
        window: int = 512,
        window_stride: int = 0,
        window_batch: int = 4,
        noise_step: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        if not isinstance(diffusion, FrozenStableDiffusion):
            raise ValueError(_NOT_A_UNET.format(title=diffusion.family.title))
        unknown = [f for f in out_features if f not in LEVEL_STRIDES]
        if unknown or not out_features:
            raise ValueError(f"{_KEY}.OUT_FEATURES {list(out_features)}: choose among {list(LEVEL_STRIDES)}.")
        if captioner_clip is not None:
            if captioner is not None:
                raise ValueError("Give the implicit captioner or the CLIP model it reads (captioner_clip), not both.")
            captioner = ImplicitCaptioner.for_diffusion(captioner_clip, diffusion)
        self.diffusion = diffusion
        self.captioner = captioner
        self.taps = feature_taps(diffusion, taps)
        if not self.taps:
            raise ValueError(f"No layer is tapped: set {_KEY}.UNET_BLOCKS (or the VAE blocks).")
        unet_multiple = diffusion.latent_factor * 2 ** (len(diffusion.unet.down_blocks) - 1)
        multiple = max(unet_multiple, SIZE_DIVISIBILITY)
        if window <= 0 or window % multiple:
            raise ValueError(f"{_KEY}.WINDOW = {window} must be a positive multiple of {multiple} for this UNet.")
        if window_stride < 0 or window_stride > window or window_stride % SIZE_DIVISIBILITY:
            raise ValueError(
                f"{_KEY}.WINDOW_STRIDE = {window_stride} must be 0 (the window's side) or a multiple of "
                f"{SIZE_DIVISIBILITY} in (0, WINDOW]."
            )
        if window_batch < 1:
            raise ValueError(f"{_KEY}.WINDOW_BATCH must be >= 1, got {window_batch}.")
        self.window, self.window_stride, self.window_batch = int(window), int(window_stride), int(window_batch)
        diffusion.check_timestep(noise_step, f"{_KEY}.NOISE_STEP")
        self.noise_step, self.seed = int(noise_step), int(seed)
        self._out_features = list(sorted(out_features, key=LEVEL_STRIDES.get))
        self._out_feature_strides = {f: LEVEL_STRIDES[f] for f in self._out_features}
        self._out_feature_channels = {f: int(out_channels) for f in self._out_features}
        self.level_taps = _assign_taps([t.stride for t in self.taps], self._out_features)
        self.projections = nn.ModuleDict()
        for level, indices in self.level_taps.items():
            for i in indices:
                self.projections[_projection_name(level, self.taps[i])] = BottleneckBlock(
                    self.taps[i].channels, int(out_channels), bottleneck_channels=max(1, int(out_channels) // 4),
                    norm=_group_norm,
                )
        # Per part: which taps it has, the modules whose inputs they read, and their names (for errors).
        self._tapped = {part: [k for k, t in enumerate(self.taps) if t.part == part] for part in PARTS}
        self._tap_modules = {part: tap_modules(diffusion, [self.taps[k] for k in self._tapped[part]]) for part in PARTS}
        self._tap_names = {part: [self.taps[k].name for k in self._tapped[part]] for part in PARTS}
        frozen = ["diffusion"] + (["captioner.clip"] if captioner is not None else [])
        exclude_from_checkpoints(self, frozen)
        refuse_partial_loads(self)
        logger.info(
            "DiffusionUNetBackbone: taps %s -> %s",
            ", ".join(f"{t.name}@{t.stride}" for t in self.taps),
            {k: [self.taps[i].name for i in v] for k, v in self.level_taps.items()},
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(f"DiffusionUNetBackbone reads RGB images (3 channels), not {input_shape.channels}.")
        # The backbone also runs under detectron2's own architectures (and their stock
        # checkpointer), so it checks MODEL.WEIGHTS itself, before anything loads it.
        check_config(cfg)
        c = cfg.MODEL.DIFFSEG
        o = c.ODISE.BACKBONE
        if substrate_kind(c.SD.WEIGHTS, c.SD.REVISION) != "unet":  # refused before its weights load
            raise ValueError(_NOT_A_UNET.format(title=f"'{c.SD.WEIGHTS}'"))
        diffusion = load_diffusion(c.SD.WEIGHTS, c.SD.REVISION, dtype=c.SD.DTYPE)
        captioner = None
        if c.ODISE.CAPTIONER.ENABLED:
            clip = OpenCLIP.from_weights(c.CLIP.WEIGHTS, c.CLIP.TEMPLATES)
            captioner = ImplicitCaptioner.for_diffusion(clip, diffusion, c.ODISE.CAPTIONER.TIME_EMBEDDING)
        return dict(
            diffusion=diffusion,
            captioner=captioner,
            taps={"unet": list(o.UNET_BLOCKS), "vae_encoder": list(o.VAE_ENCODER_BLOCKS),
                  "vae_decoder": list(o.VAE_DECODER_BLOCKS)},
            out_features=list(o.OUT_FEATURES),
            out_channels=o.OUT_CHANNELS,
            window=o.WINDOW,
            window_stride=o.WINDOW_STRIDE,
            window_batch=o.WINDOW_BATCH,
            noise_step=o.NOISE_STEP,
            seed=o.SEED,
        )

    # ------------------------------------------------------------------ detectron2 Backbone
    @property
    def size_divisibility(self) -> int:
        return SIZE_DIVISIBILITY

    @property
    def clip(self) -> Optional[OpenCLIP]:
        """The captioner's frozen CLIP (shared with the ODISE head), or None."""
        return None if self.captioner is None else self.captioner.clip

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return level_shapes(self._out_features, next(iter(self._out_feature_channels.values())))

    def released_projection_order(self) -> List[str]:
        """Our projection of each tap in the reference's order (VAE encoder, UNet, VAE decoder
        taps), the order of a released checkpoint's ``backbone.feature_projections``."""
        names = []
        for i, tap in enumerate(self.taps):
            levels = [level for level, indices in self.level_taps.items() if i in indices]
            if not levels:
                raise ValueError(f"Tap {tap.name} feeds no output level in OUT_FEATURES {self._out_features}.")
            own = [lv for lv in levels if LEVEL_STRIDES[lv] == _clamped_stride(tap.stride)]
            names.append(_projection_name((own or levels)[0], tap))
        return names

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, 3, H, W) RGB in [-1, 1]. Sides that are not multiples of ``size_divisibility`` (a stock
                architecture pads to its own multiple: FPN's is 32) are zero-padded at the bottom and right
                (detectron2's padding value) and the features cropped back.

        Returns:
            {level: (B, OUT_CHANNELS, ceil(H / stride), ceil(W / stride))} for each of ``out_features``.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DiffusionUNetBackbone expects (B, 3, H, W) RGB input, got {tuple(x.shape)}.")
        B, _, H, W = x.shape
        pad_h, pad_w = -H % self.size_divisibility, -W % self.size_divisibility
        if pad_h or pad_w:
            features = self(F.pad(x, (0, pad_w, 0, pad_h)))
            return {f: v[..., : -(-H // self._out_feature_strides[f]), : -(-W // self._out_feature_strides[f])]
                    for f, v in features.items()}
        side = min(self.window, H, W)
        stride = self.window_stride or side
        boxes = [
            (b, y, x0)
            for b in range(B)
            for y in window_starts(H, side, min(stride, side))
            for x0 in window_starts(W, side, min(stride, side))
        ]
        if len(boxes) == B:  # one window per image: no stitching
            return self._window_features(x)
        out = {f: None for f in self._out_features}
        count = {f: x.new_zeros(1, 1, H // s, W // s) for f, s in self._out_feature_strides.items()}
        for start in range(0, len(boxes), self.window_batch):
            chunk = boxes[start:start + self.window_batch]
            crops = torch.stack([x[b, :, y:y + side, x0:x0 + side] for b, y, x0 in chunk])
            feats = self._window_features(crops)
            for f, s in self._out_feature_strides.items():
                if out[f] is None:
                    out[f] = feats[f].new_zeros(B, feats[f].shape[1], H // s, W // s)
                n = side // s
                for k, (b, y, x0) in enumerate(chunk):
                    out[f][b, :, y // s:y // s + n, x0 // s:x0 // s + n] += feats[f][k]
                    if b == 0:
                        count[f][0, :, y // s:y // s + n, x0 // s:x0 // s + n] += 1
        return {f: out[f] / count[f] for f in self._out_features}

    def _window_features(self, windows: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Features of square windows: (n, 3, s, s) in [-1, 1] -> {level: (n, C, s / stride, s / stride)}."""
        d = self.diffusion
        n, side = windows.shape[0], windows.shape[-1]
        if side != self.window:
            windows = F.interpolate(windows, size=(self.window, self.window), mode="bicubic", align_corners=False)
        tapped: List[Optional[torch.Tensor]] = [None] * len(self.taps)

        def keep(part: str, features: Sequence[torch.Tensor]) -> None:
            for k, feature in zip(self._tapped[part], features):
                tapped[k] = feature

        with record_inputs(self._tap_modules["vae_encoder"]) as encoder_recording:
            latents = d.encode_images(windows)
        keep("vae_encoder", encoder_recording.collected(self._tap_names["vae_encoder"]))
        # The same noise for every window, however windows are batched: features are a function
        # of the window's pixels alone.
        generator = torch.Generator().manual_seed(self.seed)
        noisy = d.add_noise(latents, self.noise_step, generator, same_for_batch=True)
        empty = d.empty_prompt_context()
        context, time_offset = empty.expand(n), None
        if self.captioner is not None:
            tokens, time_offset = self.captioner((windows.float() + 1.0) * 127.5, empty.tokens)
            context = empty.expand(n).with_tokens(tokens)
        with record_inputs(self._tap_modules["unet"]) as unet_recording:
            d.unet_forward(noisy, self.noise_step, context, grad=self.captioner is not None, time_offset=time_offset)
        keep("unet", unet_recording.collected(self._tap_names["unet"]))
        if self._tapped["vae_decoder"]:
            with torch.no_grad():
                keep("vae_decoder", decoder_inputs(
                    d.vae, latents / d.vae.config.scaling_factor, [self.taps[k].index for k in self._tapped["vae_decoder"]]
                ))
        out = {}
        for level, indices in self.level_taps.items():
            size = (side // LEVEL_STRIDES[level],) * 2
            total = None
            for i in indices:
                proj = self.projections[_projection_name(level, self.taps[i])]
                y = tapped[i].to(proj.conv1.weight.dtype)
                if y.shape[-2:] != size:
                    y = F.interpolate(y, size=size, mode="nearest")
                y = proj(y)
                total = y if total is None else total + y
            out[level] = total
        return out


@BACKBONE_REGISTRY.register()
def build_diffusion_unet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``DiffusionUNetBackbone`` under detectron2's FPN (``MODEL.FPN.*``), outputs ``p2..p6``."""
    bottom_up = DiffusionUNetBackbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

