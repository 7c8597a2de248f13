"""The frozen substrate of the UNet families (Stable Diffusion 1.x, 2.x, XL), shared by every method.

``FrozenStableDiffusion`` wraps the components that
``diffseg_d2.pretrained.stable_diffusion.load_stable_diffusion`` loads and implements the
substrate operations (``diffseg_d2.diffusion.substrate``): prompt encoding and the UNet call; VAE
encoding, noising at a timestep, tokenisation, class prompts and generation are the cross-attention
families' (``CrossAttentionDiffusion``). Where the families differ (one or
two text encoders, which hidden state, pooled text and size conditions, a zero unconditional
prompt) it reads the family's data (``parts.family``); the methods never see the difference.
Its parameters never train and it stays in eval mode.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from ..numerics import require_finite
from ..pretrained.stable_diffusion import SD_WEIGHTS_KEY, StableDiffusionParts
from .cross_attention_substrate import CrossAttentionDiffusion
from .instrumentation import shared_instrumentation
from .substrate import PromptEmbeds

class FrozenStableDiffusion(CrossAttentionDiffusion):
    """Frozen SD components with the few operations the methods need.

    Args:
        parts: the loaded components.
        dtype: compute dtype of UNet, VAE and text encoder. float16 is only used on
            CUDA (on CPU the parts stay float32); bfloat16 is used on both.
    """

    def __init__(self, parts: StableDiffusionParts, dtype: str = "float32"):
        super().__init__(dtype)
        self.unet = parts.unet
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2
        self.tokenizer = parts.tokenizer
        self.tokenizer_2 = parts.tokenizer_2
        self.scheduler = parts.scheduler
        self.family = parts.family
        if self.tokenizer_2 is not None and self.tokenizer_2.get_vocab() != self.tokenizer.get_vocab():
            # Prompts are tokenised once (word positions are read from those ids) and the second
            # encoder's ids derived from them: the two vocabularies must be one.
            raise ValueError(f"{self.family.title}: the two tokenizers of {SD_WEIGHTS_KEY} have different "
                             "vocabularies; this package reads class words from one tokenisation.")
        self.freeze()
        self.to(self.device)  # the dtype policy below, before any move

    @property
    def denoiser(self):
        return self.unet

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def denoise(self, latents: torch.Tensor, step: int, context, *, grad: bool = False) -> torch.Tensor:
        """The substrate's one denoiser pass (``unet_forward``), under the name every family shares."""
        return self.unet_forward(latents, step, context, grad=grad)

    def _second_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The second tokenizer's ids of prompts tokenised by the first: the same tokens (one
        vocabulary), its own padding after the first end-of-text."""
        ended = (input_ids == self.tokenizer.eos_token_id).int().cumsum(-1)
        after = (ended > 1) | ((ended == 1) & (input_ids != self.tokenizer.eos_token_id))
        return torch.where(after, torch.full_like(input_ids, self.tokenizer_2.pad_token_id), input_ids)

    def _hidden_states(self, encoder, input_ids: torch.Tensor):
        """(B, L, D) states the family reads from ``encoder``, and the encoder's own outputs."""
        if self.family.hidden_layer == -1:
            out = encoder(input_ids.to(self.device))
            return out[0], out
        out = encoder(input_ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[self.family.hidden_layer], out

    @torch.no_grad()
    def encode_text(
        self, input_ids: torch.Tensor, emphasis: Optional[torch.Tensor] = None, weight: float = 1.0
    ) -> PromptEmbeds:
        """Encoded prompts: (B, L) ids (of ``tokenize``) -> ``PromptEmbeds`` with (B, L, D) tokens.

        SD 1.x / 2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
        states side by side (D = 768 + 1280) and the second encoder's projected end-of-text
        embedding as ``pooled``, as diffusers' SDXL pipeline encodes a prompt.

        Args:
            emphasis: optional (B, L) bool, tokens whose embedding is pushed away from the empty
                prompt's at the same position: ``empty + weight * (z - empty)``. This is what
                Compel computes for ``word++`` (weight 1.1 ** 2 = 1.21), the reference's prompt markup.
            weight: that factor (1 = no change).
        """
        out, _ = self._hidden_states(self.text_encoder, input_ids)
        pooled = None
        if self.text_encoder_2 is not None:
            second, outputs = self._hidden_states(self.text_encoder_2, self._second_ids(input_ids))
            out = torch.cat([out, second.to(out.dtype)], dim=-1)
            pooled = outputs.text_embeds
        out = self.emphasize(require_finite(out, f"the text encoder ({SD_WEIGHTS_KEY})"), emphasis, weight)
        return PromptEmbeds(out.to(self.dtype), None if pooled is None else pooled.to(self.dtype))

    def added_conditions(self, context: PromptEmbeds, latents: torch.Tensor) -> Optional[dict]:
        """The UNet's ``added_cond_kwargs`` (SDXL: pooled text and the size / crop ids of an image of
        the latents' size, uncropped), or None for families without them."""
        if not self.family.size_conditioning:
            return None
        if context.pooled is None:
            raise ValueError(f"{self.family.title} needs pooled text embeddings: encode prompts with encode_text.")
        h, w = (int(s) * self.latent_factor for s in latents.shape[-2:])
        # (original height, width, crop top, left, target height, width), as diffusers' SDXL pipeline.
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=latents.device)
        return {"text_embeds": context.pooled.to(device=latents.device, dtype=self.dtype),
                "time_ids": ids.expand(latents.shape[0], -1)}

    def unet_forward(
        self, latents: torch.Tensor, step: int, context, *, grad: bool = False,
        time_offset: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One UNet call: latents (B, C, h, w), context (``PromptEmbeds`` of B prompts, or a (B, L, D)
        tensor for families without added conditions) -> noise prediction (B, C, h, w).

        Args:
            grad: keep the autograd graph from the output (and any features tapped
                during the call) back to ``context`` (and ``time_offset``), for a trainable
                conditioning such as ODISE's implicit captioner. The UNet's own weights stay frozen.
            time_offset: (B, T) added to the UNet's time embedding (the output of its
                ``time_embedding`` MLP), as ODISE's captioner does; None = nothing added.
        """
        t = torch.full((latents.shape[0],), int(step), device=latents.device, dtype=torch.long)
        if not isinstance(context, PromptEmbeds):
            context = PromptEmbeds(context)
        added = self.added_conditions(context, latents)
        extra = {} if added is None else {"added_cond_kwargs": added}
        with contextlib.ExitStack() as stack, torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if time_offset is not None:
                stack.enter_context(_time_offsets(self.unet).active(time_offset.to(self.dtype)))
            out = self.unet(latents.to(self.dtype), t, encoder_hidden_states=context.tokens.to(self.dtype), **extra).sample
        return require_finite(out, f"the UNet ({SD_WEIGHTS_KEY})")

    def unconditional_context(self) -> PromptEmbeds:
        """The unconditional half of classifier-free guidance: the encoded empty prompt, or zeros for
        a family that guides against zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
        empty = self.empty_prompt_context()
        if not self.family.zero_unconditional:
            return empty
        return PromptEmbeds(torch.zeros_like(empty.tokens), None if empty.pooled is None else torch.zeros_like(empty.pooled))


def _install_time_offset_hook(time_embedding, instrumentation) -> Callable[[], None]:
    def hook(module, args, output):
        offset = instrumentation.current()
        return output if offset is None else output + offset

    return time_embedding.register_forward_hook(hook).remove


def _time_offsets(unet):
    """The shared hook that adds this thread's offset to ``unet.time_embedding``'s output."""
    return shared_instrumentation(unet.time_embedding, "time-offset", _install_time_offset_hook)
