"""Intermediate UNet features: what ODISE's backbone reads out of the frozen UNet.

``unet_feature_taps(unet, latent_factor)`` lists the layers of the UNet's up
blocks whose outputs are read (every resnet, or the attention that follows it),
with their channels and their stride in image pixels. ``record_features`` installs
forward hooks on those layers for the duration of a ``with`` block and collects
their outputs, in the order of the list, on every UNet call inside the block that
runs in the same thread (concurrent calls each get their own recording).

The hooks only read: the UNet computes exactly what it computes without them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .instrumentation import SharedInstrumentation, shared_instrumentation


@dataclass(frozen=True)
class FeatureTap:
    """One tapped layer: up block ``block``, layer ``layer`` inside it.

    Attributes:
        name: ``"up{block}.{layer}"``.
        channels: channels of its output.
        stride: image pixels per feature cell along each side (latent factor times
            the UNet's downsampling at that block).
    """

    name: str
    block: int
    layer: int
    channels: int
    stride: int


def _tap_module(block: nn.Module, layer: int) -> nn.Module:
    # In a cross-attention up block a resnet is followed by its transformer; the tap is
    # the layer's last module, so it sees the text conditioning.
    attentions = getattr(block, "attentions", None)
    return attentions[layer] if attentions is not None else block.resnets[layer]


def unet_feature_taps(unet, latent_factor: int, blocks: Optional[Sequence[int]] = None) -> List[FeatureTap]:
    """The tappable layers of ``unet.up_blocks`` (diffusers ``UNet2DConditionModel``).

    Args:
        unet: the UNet.
        latent_factor: image pixels per latent cell (8 for SD 1.5's VAE).
        blocks: indices of the up blocks to tap; None or empty = all.

    Returns:
        Taps ordered by block, then layer. For SD 1.5 at 512 px: 12 taps, 3 per
        block, at strides 64, 32, 16 and 8 with 1280, 1280, 640 and 320 channels.
    """
    up = list(unet.up_blocks)
    chosen = list(range(len(up))) if not blocks else sorted(set(int(b) for b in blocks))
    bad = [b for b in chosen if not 0 <= b < len(up)]
    if bad:
        raise ValueError(f"UNet up blocks {bad} do not exist: this UNet has {len(up)} (0..{len(up) - 1}).")
    # The last up block works at the latent resolution; each earlier one that ends in an
    # upsampler works at half the resolution of the next.
    strides = [0] * len(up)
    stride = int(latent_factor)
    for i in reversed(range(len(up))):
        if i < len(up) - 1 and up[i].upsamplers is not None:
            stride *= 2
        strides[i] = stride
    taps = []
    for i in chosen:
        for j, resnet in enumerate(up[i].resnets):
            taps.append(FeatureTap(f"up{i}.{j}", i, j, int(resnet.out_channels), strides[i]))
    return taps


class FeatureRecording:
    """The outputs of the tapped layers, one list entry per tap, for the latest UNet call."""

    def __init__(self, taps: Sequence[FeatureTap]):
        self.taps = list(taps)
        self.features: List[Optional[torch.Tensor]] = [None] * len(self.taps)
        self.index: Dict[Tuple[int, int], int] = {(t.block, t.layer): i for i, t in enumerate(self.taps)}

    def collected(self) -> List[torch.Tensor]:
        """Tapped outputs (B, C_i, H / stride_i, W / stride_i) of the last call, in tap order."""
        missing = [t.name for t, f in zip(self.taps, self.features) if f is None]
        if missing:
            raise RuntimeError(f"The UNet call did not reach the tapped layers {missing}.")
        return list(self.features)


def _install_tap_hooks(unet) -> Callable[[SharedInstrumentation], Callable[[], None]]:
    def install(instrumentation: SharedInstrumentation) -> Callable[[], None]:
        handles = []

        def hook_for(position: Tuple[int, int]):
            def hook(module, args, output):
                recording = instrumentation.current()
                index = None if recording is None else recording.index.get(position)
                if index is not None:
                    # Transformer2DModel returns a tuple or an output object; a resnet a tensor.
                    recording.features[index] = output if isinstance(output, torch.Tensor) else output[0]

            return hook

        for b, block in enumerate(unet.up_blocks):
            for j in range(len(block.resnets)):
                handles.append(_tap_module(block, j).register_forward_hook(hook_for((b, j))))

        def uninstall() -> None:
            for h in handles:
                h.remove()

        return uninstall

    return install


@contextmanager
def record_features(unet, taps: Sequence[FeatureTap]) -> Iterator[FeatureRecording]:
    """Collect the outputs of ``taps`` during this thread's UNet calls inside the ``with`` block.

    Calls of the same UNet from other threads are not seen (one model may serve concurrent
    calls). The hooks are removed once no call records any more, also after an exception.
    """
    recording = FeatureRecording(taps)
    instrumentation = shared_instrumentation(unet, "feature-recording", _install_tap_hooks(unet))
    with instrumentation.active(recording):
        yield recording
