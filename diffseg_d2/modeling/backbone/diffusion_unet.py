"""The frozen Stable Diffusion UNet as a detectron2 backbone (ODISE's feature extractor).

Per square window of the (padded) input batch: the VAE posterior mean, a fixed
noise at ``NOISE_STEP``, one UNet pass conditioned on the implicit captioner (or
the empty prompt), and the outputs of the UNet's up-block layers (see
``diffseg_d2.diffusion.features``). Each tapped layer has its own 1x1 projection
with GroupNorm to ``OUT_CHANNELS``; projections of the same output level are
resized to its stride and summed. A tap goes to the output level of the nearest
stride; an output level no tap is near (res2 at stride 4: SD's finest UNet
features are at stride 8) gets its own projections of the nearest taps,
bilinearly upsampled. Windows slide over inputs larger than one window; where
windows overlap their features are averaged.

Registered in ``BACKBONE_REGISTRY`` twice:

* ``DiffusionUNetBackbone``: ``res2..res5`` (strides 4, 8, 16, 32), for heads that
  read a feature pyramid themselves (ODISE's pixel decoder);
* ``build_diffusion_unet_fpn_backbone``: the same under detectron2's ``FPN``
  (``p2..p6``), so that stock architectures such as Panoptic FPN take it as is.

The input is what detectron2's meta-architectures pass to a backbone, ``(images
- PIXEL_MEAN) / PIXEL_STD``, and must be RGB in [-1, 1]: set ``INPUT.FORMAT RGB``,
``MODEL.PIXEL_MEAN [127.5, 127.5, 127.5]`` and ``MODEL.PIXEL_STD [127.5, 127.5, 127.5]``.

Only the projections and the captioner's projection train. The SD parts and CLIP
stay in eval mode, get no gradient, and are left out of checkpoints.
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
from torch import nn

from ...checkpoint_safety import refuse_partial_loads
from ...config import check_config
from ...diffusion import FrozenStableDiffusion, load_stable_diffusion, record_features, unet_feature_taps
from ..captioner import ImplicitCaptioner
from ..clip import OpenCLIP
from ..frozen import exclude_from_checkpoints

logger = logging.getLogger(__name__)

#: Output levels and their strides in input pixels.
LEVEL_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
_KEY = "MODEL.DIFFSEG.ODISE.BACKBONE"


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start offsets of windows of ``window`` pixels every ``stride`` pixels covering ``length``.

    The last window is aligned with the end, so every pixel is covered and no window
    leaves the image.
    """
    if length < window:
        raise ValueError(f"length {length} is smaller than one window of {window}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _assign_taps(tap_strides: Sequence[int], levels: Sequence[str]) -> Dict[str, List[int]]:
    """Which taps feed which output level: {level: [tap indices]} (see the module docstring)."""
    log = math.log2
    out = {name: [] for name in levels}
    for i, s in enumerate(tap_strides):
        nearest = min(levels, key=lambda name: (abs(log(LEVEL_STRIDES[name]) - log(s)), LEVEL_STRIDES[name]))
        out[nearest].append(i)
    for name in levels:
        if not out[name]:
            target = LEVEL_STRIDES[name]
            best = min(abs(log(target) - log(s)) for s in tap_strides)
            out[name] = [i for i, s in enumerate(tap_strides) if abs(log(target) - log(s)) == best]
    return out


def _projection_name(level: str, tap) -> str:
    """Key of a tap's projection onto a level in ``projections`` (and so in checkpoints)."""
    return f"{level}_{tap.name.replace('.', '_')}"


@BACKBONE_REGISTRY.register()
class DiffusionUNetBackbone(Backbone):
    """ODISE's diffusion backbone (see the module docstring).

    Args:
        diffusion: the frozen SD parts.
        captioner: the implicit captioner, or None to condition on the empty prompt.
        up_blocks: UNet up blocks to tap; empty = all.
        out_features: subset of ``res2..res5`` to return.
        out_channels: channels of every output level.
        window: side of the square windows the UNet reads (pixels).
        window_stride: step between windows over larger inputs (pixels).
        window_batch: most windows per UNet call.
        noise_step: scheduler timestep of the added noise (0 = the least noise).
        seed: seed of the fixed noise.
    """

    @configurable
    def __init__(
        self,
        *,
        diffusion: FrozenStableDiffusion,
        captioner: Optional[ImplicitCaptioner],
        up_blocks: Sequence[int] = (),
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 512,
        window: int = 512,
        window_stride: int = 512,
        window_batch: int = 4,
        noise_step: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        unknown = [f for f in out_features if f not in LEVEL_STRIDES]
        if unknown or not out_features:
            raise ValueError(f"{_KEY}.OUT_FEATURES {list(out_features)}: choose among {list(LEVEL_STRIDES)}.")
        self.diffusion = diffusion
        self.captioner = captioner
        self.taps = unet_feature_taps(diffusion.unet, diffusion.latent_factor, up_blocks)
        unet_multiple = diffusion.latent_factor * 2 ** (len(diffusion.unet.down_blocks) - 1)
        multiple = max(unet_multiple, max(LEVEL_STRIDES.values()))
        if window <= 0 or window % multiple:
            raise ValueError(f"{_KEY}.WINDOW = {window} must be a positive multiple of {multiple} for this UNet.")
        if not 0 < window_stride <= window or window_stride % 32:
            raise ValueError(f"{_KEY}.WINDOW_STRIDE = {window_stride} must be a multiple of 32 in (0, WINDOW].")
        if window_batch < 1:
            raise ValueError(f"{_KEY}.WINDOW_BATCH must be >= 1, got {window_batch}.")
        self.window, self.window_stride, self.window_batch = int(window), int(window_stride), int(window_batch)
        diffusion.check_timestep(noise_step, f"{_KEY}.NOISE_STEP")
        self.noise_step, self.seed = int(noise_step), int(seed)
        self._out_features = list(sorted(out_features, key=LEVEL_STRIDES.get))
        self._out_feature_strides = {f: LEVEL_STRIDES[f] for f in self._out_features}
        self._out_feature_channels = {f: int(out_channels) for f in self._out_features}
        self.level_taps = _assign_taps([t.stride for t in self.taps], self._out_features)
        groups = math.gcd(32, int(out_channels))
        self.projections = nn.ModuleDict()
        for level, indices in self.level_taps.items():
            for i in indices:
                tap = self.taps[i]
                self.projections[_projection_name(level, tap)] = nn.Sequential(
                    nn.Conv2d(tap.channels, out_channels, kernel_size=1, bias=False),
                    nn.GroupNorm(groups, out_channels),
                )
        frozen = ["diffusion"] + (["captioner.clip"] if captioner is not None else [])
        exclude_from_checkpoints(self, frozen)
        refuse_partial_loads(self)
        logger.info(
            "DiffusionUNetBackbone: %d taps (%s) -> %s",
            len(self.taps), ", ".join(f"{t.name}@{t.stride}" for t in self.taps),
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
        diffusion = FrozenStableDiffusion(
            load_stable_diffusion(c.SD.WEIGHTS, c.SD.REVISION or None), dtype=c.SD.DTYPE
        )
        captioner = None
        if c.ODISE.CAPTIONER.ENABLED:
            clip = OpenCLIP.from_weights(c.CLIP.WEIGHTS, c.CLIP.TEMPLATES)
            captioner = ImplicitCaptioner(
                clip, diffusion.context_length, int(diffusion.unet.config.cross_attention_dim)
            )
        return dict(
            diffusion=diffusion,
            captioner=captioner,
            up_blocks=list(o.UP_BLOCKS),
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
        return max(self._out_feature_strides.values())

    @property
    def clip(self) -> Optional[OpenCLIP]:
        """The captioner's frozen CLIP (shared with the ODISE head), or None."""
        return None if self.captioner is None else self.captioner.clip

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, 3, H, W) RGB in [-1, 1]; H and W multiples of ``size_divisibility``
                and at least ``window``.

        Returns:
            {level: (B, OUT_CHANNELS, H / stride, W / stride)} for each of ``out_features``.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DiffusionUNetBackbone expects (B, 3, H, W) RGB input, got {tuple(x.shape)}.")
        B, _, H, W = x.shape
        if H < self.window or W < self.window:
            raise ValueError(
                f"The input is {H}x{W} pixels, smaller than one backbone window of {self.window}x{self.window}. "
                f"Resize images so both sides are at least {self.window} (INPUT.MIN_SIZE_TEST / crops), pad "
                f"them, or use a smaller {_KEY}.WINDOW."
            )
        if H % self.size_divisibility or W % self.size_divisibility:
            raise ValueError(f"Input sides {H}x{W} must be multiples of {self.size_divisibility} (pad them).")
        boxes = [
            (b, y, x0)
            for b in range(B)
            for y in window_starts(H, self.window, self.window_stride)
            for x0 in window_starts(W, self.window, self.window_stride)
        ]
        if len(boxes) == B:  # one window per image: no stitching
            return self._window_features(x)
        out = {f: None for f in self._out_features}
        count = {f: x.new_zeros(1, 1, H // s, W // s) for f, s in self._out_feature_strides.items()}
        for start in range(0, len(boxes), self.window_batch):
            chunk = boxes[start:start + self.window_batch]
            crops = torch.stack([x[b, :, y:y + self.window, x0:x0 + self.window] for b, y, x0 in chunk])
            feats = self._window_features(crops)
            for f, s in self._out_feature_strides.items():
                if out[f] is None:
                    out[f] = feats[f].new_zeros(B, feats[f].shape[1], H // s, W // s)
                n = self.window // s
                for k, (b, y, x0) in enumerate(chunk):
                    out[f][b, :, y // s:y // s + n, x0 // s:x0 // s + n] += feats[f][k]
                    if b == 0:
                        count[f][0, :, y // s:y // s + n, x0 // s:x0 // s + n] += 1
        return {f: out[f] / count[f] for f in self._out_features}

    def _window_features(self, windows: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Features of square windows: (n, 3, w, w) in [-1, 1] -> {level: (n, C, w / stride, w / stride)}."""
        d = self.diffusion
        n, side = windows.shape[0], windows.shape[-1]
        latents = d.encode_images(windows)
        # The same noise for every window, however windows are batched: features are a function
        # of the window's pixels alone.
        generator = torch.Generator().manual_seed(self.seed)
        noisy = d.add_noise(latents, self.noise_step, generator, same_for_batch=True)
        context = d.empty_prompt_context().expand(n, -1, -1)
        if self.captioner is not None:
            context = self.captioner(((windows.float() + 1.0) * 127.5).clamp(0, 255), context[:1])
        with record_features(d.unet, self.taps) as recording:
            d.unet_forward(noisy, self.noise_step, context, grad=self.captioner is not None)
        tapped = recording.collected()
        out = {}
        for level, indices in self.level_taps.items():
            size = (side // LEVEL_STRIDES[level],) * 2
            total = None
            for i in indices:
                proj = self.projections[_projection_name(level, self.taps[i])]
                y = proj(tapped[i].to(proj[0].weight.dtype))
                if y.shape[-2:] != size:
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
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

