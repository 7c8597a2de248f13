"""ConceptAttention-style read-out of FLUX's double-stream blocks (Helbling et al., ICML 2025): maps in the
attention-output space, the generation unchanged.

Concept tokens (one per class: the first T5 state of the class name encoded on its own, put through the
transformer's ``context_embedder``) travel through the double-stream blocks in a stream of their own that
uses the text stream's weights: in each block they are modulated by ``norm1_context`` with a time embedding
made from the concepts' own pooled CLIP vector, project to queries, keys and values with the text
projections, and attend to [concepts; image] (rotary positions: zero for the concepts, the image tokens'
own); their residual update is the text stream's (``to_add_out``, ``norm2_context``, ``ff_context``). Nothing
attends to them, so the image and text streams, and the model's output, are those of the plain call.

A block's map is the dot product of each concept's attention output and each image token's attention
output (both before the output projections; the image's is its output in the plain joint attention over
[text; image]), a softmax over the concepts per image token; the maps of the chosen blocks are averaged
over blocks and calls. Computed with forward hooks on the blocks: each block's joint attention is computed
once more for the image outputs (the processor does not hand them out), and the concepts' attention is
(C + N_img) keys wide. Concurrent calls each record into their own store (``instrumentation``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, Optional

import torch
import torch.nn.functional as F

from .instrumentation import SharedInstrumentation, shared_instrumentation

__all__ = ["ConceptAttentionStore", "double_stream_blocks", "record_concept_attention"]


@dataclass
class ConceptAttentionStore:
    """One call's concept stream and its maps.

    Args:
        concepts: (C, D_text) the concepts' text states (before the transformer's ``context_embedder``).
        pooled: (P,) or (1, P) the concepts' pooled CLIP vector (their time embedding's text part).
        blocks: the double-stream blocks whose maps are read (names as ``double_stream_blocks``).
    """

    concepts: torch.Tensor
    pooled: torch.Tensor
    blocks: FrozenSet[str]
    #: (C, N_img) softmax-over-concepts maps, summed over the read blocks and calls
    total: Optional[torch.Tensor] = None
    count: int = 0
    # per call: the concept stream (1, C, dim), its time embedding and rotary embedding
    _stream: Optional[torch.Tensor] = field(default=None, repr=False)
    _temb: Optional[torch.Tensor] = field(default=None, repr=False)
    _rope: Optional[tuple] = field(default=None, repr=False)

    def maps(self) -> torch.Tensor:
        """(C, N_img): the mean over the read blocks and calls."""
        if self.total is None:
            raise RuntimeError("No concept-attention block was read (are the chosen blocks double-stream ones?).")
        return self.total / self.count


def double_stream_blocks(transformer) -> Dict[str, torch.nn.Module]:
    """Block name (``transformer_blocks.N``, as ``joint_attention_layers`` names it) -> FLUX double-stream block."""
    if not hasattr(transformer, "single_transformer_blocks"):
        raise ValueError("The ConceptAttention read-out is defined for FLUX's double-stream blocks; this "
                         f"transformer is a {type(transformer).__name__}.")
    return {f"transformer_blocks.{i}": block for i, block in enumerate(transformer.transformer_blocks)}


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """(B, S, H*D) -> (B, S, H, D)."""
    return x.unflatten(-1, (-1, attn.head_dim))


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rope, sequence_dim=1)


def _on_call(transformer, args, kwargs, instrumentation) -> None:
    """Before a transformer call: the concepts' stream, time embedding and rotary embedding for this call."""
    store: Optional[ConceptAttentionStore] = instrumentation.current()
    if store is None:
        return
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    dtype = hidden.dtype
    timestep = kwargs["timestep"].to(dtype) * 1000
    pooled = store.pooled.reshape(1, -1).to(hidden.device, dtype)
    guidance = kwargs.get("guidance")
    if guidance is None:
        temb = transformer.time_text_embed(timestep[:1], pooled)
    else:
        temb = transformer.time_text_embed(timestep[:1], guidance.to(dtype)[:1] * 1000, pooled)
    store._temb = temb
    store._stream = transformer.context_embedder(store.concepts.to(hidden.device, dtype)[None])
    img_ids = kwargs["img_ids"]
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    concept_ids = torch.zeros(store.concepts.shape[0], img_ids.shape[-1], device=img_ids.device, dtype=img_ids.dtype)
    store._rope = transformer.pos_embed(torch.cat([concept_ids, img_ids]))


def _on_block(name: str, block, kwargs, instrumentation) -> None:
    """After a double-stream block: its map (when read) and the concepts' residual update."""
    store: Optional[ConceptAttentionStore] = instrumentation.current()
    if store is None or store._stream is None:
        return
    attn = block.attn
    x, e, temb, rope = (kwargs["hidden_states"][:1], kwargs["encoder_hidden_states"][:1], kwargs["temb"][:1],
                        kwargs["image_rotary_emb"])
    text_len, C = e.shape[1], store._stream.shape[1]
    # The image's attention output in the plain joint attention (before to_out), recomputed.
    norm_x = block.norm1(x, emb=temb)[0]
    norm_e = block.norm1_context(e, emb=temb)[0]
    iq, ik, iv = (_heads(f(norm_x), attn) for f in (attn.to_q, attn.to_k, attn.to_v))
    iq, ik = attn.norm_q(iq), attn.norm_k(ik)
    tq = attn.norm_added_q(_heads(attn.add_q_proj(norm_e), attn))
    tk = attn.norm_added_k(_heads(attn.add_k_proj(norm_e), attn))
    tv = _heads(attn.add_v_proj(norm_e), attn)
    q, k = _rotate(torch.cat([tq, iq], 1), rope), _rotate(torch.cat([tk, ik], 1), rope)
    v = torch.cat([tv, iv], 1)
    image_out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    image_out = image_out.transpose(1, 2)[:, text_len:].flatten(2)  # (1, N_img, H*D)
    # The concepts: text-stream weights, attending to [concepts; image], their positions zero.
    norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(store._stream, emb=store._temb)
    cq = attn.norm_added_q(_heads(attn.add_q_proj(norm_c), attn))
    ck = attn.norm_added_k(_heads(attn.add_k_proj(norm_c), attn))
    cv = _heads(attn.add_v_proj(norm_c), attn)
    q = _rotate(torch.cat([cq, iq], 1), store._rope)[:, :C]
    k = _rotate(torch.cat([ck, ik], 1), store._rope)
    v = torch.cat([cv, iv], 1)
    concept_out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    concept_out = concept_out.transpose(1, 2).flatten(2)  # (1, C, H*D)
    if name in store.blocks:
        scores = torch.einsum("bcd,bnd->bcn", concept_out.float(), image_out.float())[0]
        maps = scores.softmax(dim=0)  # over the concepts, per image token
        store.total = maps if store.total is None else store.total + maps
        store.count += 1
    stream = store._stream + gate_msa.unsqueeze(1) * attn.to_add_out(concept_out)
    normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    store._stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)


def _install(transformer, instrumentation: SharedInstrumentation):
    handles = [transformer.register_forward_pre_hook(
        lambda module, args, kwargs: _on_call(module, args, kwargs, instrumentation), with_kwargs=True)]
    for name, block in double_stream_blocks(transformer).items():
        handles.append(block.register_forward_hook(
            lambda module, args, kwargs, output, name=name: _on_block(name, module, kwargs, instrumentation),
            with_kwargs=True))

    def uninstall() -> None:
        for handle in handles:
            handle.remove()

    return uninstall


@contextlib.contextmanager
def record_concept_attention(transformer, store: ConceptAttentionStore) -> Iterator[ConceptAttentionStore]:
    """Run the concepts of ``store`` alongside this thread's calls of the FLUX ``transformer`` inside the block
    and read the maps of ``store.blocks``. The calls' outputs are unchanged."""
    blocks = double_stream_blocks(transformer)
    missing = sorted(set(store.blocks) - set(blocks))
    if missing:
        raise ValueError(f"ConceptAttention reads FLUX's double-stream blocks; {missing} is not one of {sorted(blocks)}.")
    instrumentation = shared_instrumentation(transformer, "concept-attention", _install)
    with torch.no_grad(), instrumentation.active(store):
        yield store
