"""The frozen substrate of PixArt-Σ: a cross-attention diffusion transformer with a T5 text encoder.

``FrozenPixArt`` wraps the components that ``diffseg_d2.pretrained.pixart.load_pixart`` loads and
implements the substrate operations as diffusers' ``PixArtSigmaPipeline`` computes them: T5 encoding
under the tokenizer's attention mask, which is also the transformer's ``encoder_attention_mask`` (padding
keys masked out of every cross-attention softmax); one transformer call whose learned-variance half of
the output is dropped. Noising, tokenisation, class prompts and DDIM generation are the cross-attention
families' (``CrossAttentionDiffusion``). The transformer's attention layers all work on one token grid
(one token per ``patch`` x ``patch`` latent cells), so methods choose them by block
(``layers_by_block``): ``transformer_blocks.N``, each a self-attention ``attn1`` and a cross-attention
``attn2`` that ``attention.record_attention`` reads. Its parameters never train and it stays in eval mode.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..numerics import require_finite
from ..pretrained.pixart import PixArtParts
from ..pretrained.stable_diffusion import SD_WEIGHTS_KEY
from .cross_attention_substrate import CrossAttentionDiffusion
from .substrate import PromptEmbeds

__all__ = ["FrozenPixArt"]


class FrozenPixArt(CrossAttentionDiffusion):
    """Frozen PixArt-Σ components with the substrate's operations.

    Args:
        parts: the loaded components.
        dtype: compute dtype of every part (the dtype policy of ``FrozenDiffusion``).
    """

    text_segments = ("t5",)
    layers_by_block = True

    def __init__(self, parts: PixArtParts, dtype: str = "float32"):
        super().__init__(dtype)
        self.family = parts.family
        self.transformer = parts.transformer
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.tokenizer = parts.tokenizer
        self.scheduler = parts.scheduler
        self.freeze()
        self.to(self.device)  # the dtype policy, before any move

    @property
    def denoiser(self):
        return self.transformer

    @property
    def patch(self) -> int:
        """Latent cells per image token along each side (2 for PixArt-Σ)."""
        return int(self.transformer.config.patch_size)

    @property
    def context_length(self) -> int:
        """L, the T5 tokens the transformer reads (the pipeline's ``max_sequence_length``, 300)."""
        return self.family.text_length

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, the tokens of ``ids`` (of ``tokenize``) that are not padding: the T5 tokenizer's
        ``attention_mask`` of prompts padded to ``context_length`` (padding only follows the end-of-text
        token, and no text tokenises to the padding id)."""
        return ids != self.tokenizer.pad_token_id

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, emphasis: Optional[torch.Tensor] = None,
                    weight: float = 1.0) -> PromptEmbeds:
        """Encoded prompts as the pipeline's ``encode_prompt``: (B, L) ids -> ``PromptEmbeds`` with tokens
        (B, L, D_T5), T5's last hidden state computed under the attention mask, and that mask (B, L).

        Args:
            emphasis, weight: Compel's ``word++`` (``FrozenDiffusion.emphasize``); weight 1 = no change.
        """
        mask = self.attention_mask(input_ids).to(self.device)
        out = self.text_encoder(input_ids.to(self.device), attention_mask=mask.long())[0]
        out = self.emphasize(require_finite(out, f"the T5 text encoder ({SD_WEIGHTS_KEY})"), emphasis, weight)
        return PromptEmbeds(out.to(self.dtype), mask=mask)

    def cross_attention_states(self, context: PromptEmbeds) -> PromptEmbeds:
        """The transformer's caption projection of the T5 states (what its cross-attention keys are made
        from), with their mask."""
        projected = self.transformer.caption_projection
        tokens = context.tokens.to(self.device, self.dtype)
        return context.with_tokens(tokens if projected is None else projected(tokens))

    def unconditional_context(self) -> PromptEmbeds:
        """The encoded empty prompt (the pipeline's default negative prompt "")."""
        return self.empty_prompt_context()

    def added_conditions(self, latents: torch.Tensor) -> dict:
        """The transformer's ``added_cond_kwargs``: none for PixArt-Σ (its pipeline passes None for both);
        a transformer built with size conditions gets the image's (height, width) in pixels and its aspect
        ratio, as PixArt-α's pipeline made them."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        B, (h, w) = latents.shape[0], (int(s) * self.latent_factor for s in latents.shape[-2:])
        kw = dict(device=latents.device, dtype=self.dtype)
        return {"resolution": torch.tensor([[h, w]], **kw).expand(B, -1),
                "aspect_ratio": torch.tensor([[h / w]], **kw).expand(B, -1)}

    def denoise(self, latents: torch.Tensor, step: int, context: PromptEmbeds, *, grad: bool = False) -> torch.Tensor:
        """One transformer call at timestep ``step``: latents (B, C, h, w) (h, w multiples of ``patch``),
        context (``PromptEmbeds`` of B prompts, with their mask) -> the noise prediction (B, C, h, w): the
        first C of the transformer's 2C output channels (the rest is the learned variance), as the pipeline.
        While it runs, ``record_attention(self.transformer, ..., cross_blocks=..., self_blocks=...)`` reads
        the chosen blocks.

        Args:
            grad: keep the autograd graph from the output back to ``context``; the weights stay frozen.
        """
        if not isinstance(context, PromptEmbeds) or context.mask is None:
            raise ValueError(f"{self.family.title} needs the prompts' attention mask: encode them with encode_text.")
        self.check_latent_size(latents.shape)
        x = latents.to(self.dtype)
        t = torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = self.transformer(x, encoder_hidden_states=context.tokens.to(x.device, self.dtype),
                                   encoder_attention_mask=context.mask.to(x.device).long(), timestep=t,
                                   added_cond_kwargs=self.added_conditions(x), return_dict=False)[0]
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:  # learned sigma
            out = out[:, :channels]
        return require_finite(out, f"the transformer ({SD_WEIGHTS_KEY})")
