"""Intermediate features of the frozen SD parts: what ODISE's backbone reads.

ODISE taps the INPUTS of chosen layers of three networks, numbered as the
reference numbers them:

* ``"unet"``: the resnets of the UNet's up blocks, in order (SD 1.5: 12, three
  per block); a layer's input is the previous output concatenated with the skip;
* ``"vae_encoder"``: the resnets of the VAE encoder's levels, in order (SD: 8);
* ``"vae_decoder"``: the resnets of the VAE decoder's levels, in order (SD: 12),
  run on the image's own latent.

``feature_taps`` lists them with channels and strides (image pixels per cell).
``record_inputs`` collects the inputs of modules during the calls of one thread
inside a ``with`` block (concurrent calls each get their own recording);
``decoder_inputs`` runs the VAE decoder only as far as its last tapped layer.

The hooks only read: the networks compute exactly what they compute without them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from .instrumentation import shared_instrumentation

#: The tapped networks, in the reference's order of taps.
PARTS = ("vae_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class FeatureTap:
    """One tapped layer input.

    Attributes:
        name: ``"{part}.{index}"``.
        part: ``"unet"``, ``"vae_encoder"`` or ``"vae_decoder"``.
        index: the layer's number within its part (see the module docstring).
        channels: channels of the layer's input.
        stride: image pixels per feature cell along each side.
    """

    name: str
    part: str
    index: int
    channels: int
    stride: int


def _unet_layers(unet, latent_factor: int) -> List[Tuple[nn.Module, int]]:
    up = list(unet.up_blocks)
    # The last up block works at the latent resolution; each earlier one that ends in an
    # upsampler works at half the resolution of the next.
    strides, stride = [0] * len(up), int(latent_factor)
    for i in reversed(range(len(up))):
        if i < len(up) - 1 and up[i].upsamplers is not None:
            stride *= 2
        strides[i] = stride
    return [(resnet, strides[i]) for i, block in enumerate(up) for resnet in block.resnets]


def _encoder_layers(vae) -> List[Tuple[nn.Module, int]]:
    out, stride = [], 1
    for block in vae.encoder.down_blocks:
        out += [(resnet, stride) for resnet in block.resnets]
        if block.downsamplers is not None:
            stride *= 2
    return out


def _decoder_layers(vae, latent_factor: int) -> List[Tuple[nn.Module, int]]:
    out, stride = [], int(latent_factor)
    for block in vae.decoder.up_blocks:
        out += [(resnet, stride) for resnet in block.resnets]
        if block.upsamplers is not None:
            stride //= 2
    return out


def tappable_layers(diffusion) -> Dict[str, List[Tuple[nn.Module, int]]]:
    """Every tappable layer of each part, in the reference's order: ``{part: [(module, stride)]}``."""
    f = diffusion.latent_factor
    return {
        "unet": _unet_layers(diffusion.unet, f),
        "vae_encoder": _encoder_layers(diffusion.vae),
        "vae_decoder": _decoder_layers(diffusion.vae, f),
    }


def feature_taps(diffusion, chosen: Dict[str, Sequence[int]]) -> List[FeatureTap]:
    """The taps ``{part: [indices]}`` of ``diffusion`` (a ``FrozenStableDiffusion``), in the
    reference's order: VAE encoder, UNet, VAE decoder.

    Raises:
        ValueError: an unknown part, or an index the network does not have (the message says how
            many layers it has).
    """
    unknown = set(chosen) - set(PARTS)
    if unknown:
        raise ValueError(f"Unknown tapped parts {sorted(unknown)}: choose among {list(PARTS)}.")
    layers = tappable_layers(diffusion)
    taps = []
    for part in PARTS:
        available = layers[part]
        for index in chosen.get(part, ()):
            if not 0 <= int(index) < len(available):
                raise ValueError(
                    f"The {part.replace('_', ' ')} has {len(available)} tappable layers (0..{len(available) - 1}); "
                    f"layer {index} does not exist."
                )
            module, stride = available[int(index)]
            taps.append(FeatureTap(f"{part}.{index}", part, int(index), int(module.in_channels), int(stride)))
    return taps


def tap_modules(diffusion, taps: Sequence[FeatureTap]) -> List[nn.Module]:
    """The module of each tap (whose input it reads)."""
    layers = tappable_layers(diffusion)
    return [layers[t.part][t.index][0] for t in taps]


class InputRecording:
    """The inputs of recorded modules in this thread's latest calls, by position in ``modules``."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.index = {id(m): i for i, m in enumerate(modules)}
        self.inputs: List = [None] * len(modules)

    def collected(self, names: Sequence[str]) -> List[torch.Tensor]:
        missing = [n for n, x in zip(names, self.inputs) if x is None]
        if missing:
            raise RuntimeError(f"The forward pass did not reach the tapped layers {missing}.")
        return list(self.inputs)


def _install_input_hook(module: nn.Module, instrumentation) -> Callable[[], None]:
    """A forward pre-hook on ``module`` that hands its first input to this thread's recording."""

    def hook(mod, args):
        recording = instrumentation.current()
        index = None if recording is None else recording.index.get(id(mod))
        if index is not None:
            recording.inputs[index] = args[0]

    return module.register_forward_pre_hook(hook).remove


@contextlib.contextmanager
def record_inputs(modules: Sequence[nn.Module]) -> Iterator[InputRecording]:
    """Collect the first positional input of each of ``modules`` during this thread's calls inside
    the ``with`` block. Calls from other threads are not seen; the hooks are removed once no call
    records any more, also after an exception."""
    recording = InputRecording(modules)
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(shared_instrumentation(m, "input-recording", _install_input_hook).active(recording))
        yield recording


def decoder_inputs(vae, latents: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
    """Inputs of the VAE decoder's resnets ``indices`` (the reference's numbering) when it decodes
    ``latents`` (unscaled: the posterior's own scale). The decoder stops after the last of them."""
    wanted = {int(i): k for k, i in enumerate(indices)}
    out: List = [None] * len(indices)
    if not wanted:
        return out
    last = max(wanted)
    d = vae.decoder
    z = latents.to(next(d.parameters()).dtype)
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    h = d.conv_in(z)
    h = d.mid_block(h, None)
    position = 0
    for block in d.up_blocks:
        for resnet in block.resnets:
            if position in wanted:
                out[wanted[position]] = h
            if position == last:
                return out
            h = resnet(h, temb=None)
            position += 1
        for upsampler in block.upsamplers or ():
            h = upsampler(h)
    raise ValueError(f"The VAE decoder has {position} tappable layers; layer {last} does not exist.")
