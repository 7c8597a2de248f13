"""Recording the joint attention of diffusion transformers (SD3 / SD3.5's MMDiT, FLUX.1) exactly and streamed.

``record_joint_attention(transformer, store, blocks)`` wraps the joint attention processors of the
chosen blocks: while a call records, each wrapped layer computes its queries and keys as the
layer's own processor does (projections, the query / key norms, the text stream's projections,
FLUX's rotary embedding after the concatenation), hands them to the exact read-outs of
``readouts`` (never a (heads, N, N) matrix) and then lets the original processor compute the
layer's output: the model's outputs are the same bit for bit with and without recording.

Layouts: SD3 puts the image tokens first and the text tokens after them; FLUX the text first. FLUX's
single-stream blocks see one concatenated sequence (no ``encoder_hidden_states``): the number of
text tokens comes from the recording (``JointRecording.text_length``). Concurrent calls of one
transformer each record into their own store (``instrumentation``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence

import torch

from .instrumentation import SharedInstrumentation, shared_instrumentation, wrap_attention_processors
from .readouts import image_self_apply, image_to_text, joint_layout, text_to_image

__all__ = ["JointAttentionStore", "checked_blocks", "joint_attention_layers", "record_joint_attention", "sd3_query_key"]

DIRECTIONS = ("image_to_text", "text_to_image")


@dataclass
class JointAttentionStore:
    """Streaming sums of one call's joint-attention read-outs.

    Args:
        token_index, token_weight: (K, T) positions of each class word among the text tokens and
            their weights (1/n on a word's n tokens): see ``readouts.image_to_text``.
        direction: "image_to_text" (image queries on the class tokens' keys) or "text_to_image".
        refine_blocks: blocks whose queries and keys are kept (for ``refine``); empty: none.
        map_blocks: blocks whose class maps are read (None: every recorded block).
        per_element: the batch holds one prompt per class (class k read and refined from element k);
            False: every class from element 0 (one prompt naming them all, or the prompted half of a
            classifier-free-guidance batch).
    """

    token_index: torch.Tensor
    token_weight: torch.Tensor
    direction: str = "image_to_text"
    refine_blocks: FrozenSet[str] = frozenset()
    map_blocks: Optional[FrozenSet[str]] = None
    per_element: bool = False
    #: block name -> (K, N_img) read-out summed over the calls that recorded it
    layers: Dict[str, torch.Tensor] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)
    _kept: List = field(default_factory=list)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}.")

    def record(self, name: str, query: torch.Tensor, key: torch.Tensor, image: slice, text: slice) -> None:
        """Read one layer call: query / key (B, H, S, D) with the image and text ranges of the sequence."""
        if self.map_blocks is None or name in self.map_blocks:
            scale = query.shape[-1] ** -0.5
            read = image_to_text if self.direction == "image_to_text" else text_to_image
            maps = read(query, key, image, text, self.token_index, self.token_weight, scale,
                        per_element=self.per_element)
            self.layers[name] = self.layers.get(name, 0) + maps
            self.counts[name] = self.counts.get(name, 0) + 1
        if name in self.refine_blocks:
            # A batch of one pass per class refines each class by its own pass: keep every element.
            n = query.shape[0] if self.per_element else 1
            self._kept.append((query[:n].detach(), key[:n].detach(), image))

    def maps(self) -> torch.Tensor:
        """(K, N_img): the mean over the recorded layer calls."""
        if not self.layers:
            raise RuntimeError("No joint-attention layer was recorded (are the chosen blocks in the model?).")
        return sum(self.layers.values()) / sum(self.counts.values())

    def refine(self, maps: torch.Tensor) -> torch.Tensor:
        """``S c`` with S the image-to-image attention of the kept blocks (mean over them and heads,
        rows normalised over all keys), applied through the fused attention kernel: (K, N_img) -> (K, N_img). With
        ``per_element`` each class is refined by its own pass's S, else by element 0's."""
        if not self._kept:
            raise RuntimeError("No block's queries and keys were kept: give refine_blocks.")
        return sum(image_self_apply(q, k, image, maps, q.shape[-1] ** -0.5, per_element=self.per_element)
                   for q, k, image in self._kept) / len(self._kept)


@dataclass(frozen=True)
class JointRecording:
    store: JointAttentionStore
    blocks: FrozenSet[str]
    text_length: int  # text tokens of the sequence (single-stream blocks cannot tell it themselves)


def _layout_of(processor) -> Optional[bool]:
    """Whether a processor's joint sequence puts the image first (SD3: True, FLUX: False), or None for a
    processor that is not a joint-attention one."""
    name = type(processor).__name__
    if name.startswith("Flux") and "IPAdapter" not in name:
        return False
    if name.startswith("JointAttnProcessor"):
        return True
    return None


def joint_attention_layers(transformer) -> Dict[str, bool]:
    """Block name (the processor name without ``.attn.processor``) -> whether its sequence puts the image
    first, for every joint-attention layer of ``transformer``."""
    out = {}
    for name, processor in transformer.attn_processors.items():
        image_first = _layout_of(processor)
        if image_first is not None and name.endswith(".attn.processor"):
            out[name[: -len(".attn.processor")]] = image_first
    return out


def checked_blocks(transformer, blocks: Sequence[str], config_key: str, title: str,
                   layers: Optional[Sequence[str]] = None, kind: str = "joint-attention") -> List[str]:
    """``blocks`` of a config key, each a block of ``transformer`` that has the attention read (all of them
    when none is named), or a ValueError naming the key and the blocks the model has.

    Args:
        layers: the model's blocks of that attention (None: its joint-attention blocks); ``kind`` names it.
    """
    layers = list(joint_attention_layers(transformer) if layers is None else layers)
    missing = [b for b in blocks if b not in layers]
    if missing:
        raise ValueError(f"{config_key} names {missing}, which the {title} transformer does not have; its "
                         f"{kind} blocks are {layers}.")
    return list(blocks) or layers


def _heads_first(x: torch.Tensor, attn) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def sd3_query_key(attn, hidden_states, encoder_hidden_states):
    """SD3's JointAttnProcessor2_0 queries and keys: image then text, (B, H, S, D)."""
    query, key = _heads_first(attn.to_q(hidden_states), attn), _heads_first(attn.to_k(hidden_states), attn)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    eq = _heads_first(attn.add_q_proj(encoder_hidden_states), attn)
    ek = _heads_first(attn.add_k_proj(encoder_hidden_states), attn)
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return torch.cat([query, eq], dim=2), torch.cat([key, ek], dim=2)


def _flux_query_key(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """FLUX's FluxAttnProcessor queries and keys: text then image, rotary embedding applied after the
    concatenation, (B, H, S, D)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        raise ValueError("Recording FLUX attention with fused QKV projections is not supported; unfuse them first.")
    query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
    key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query.transpose(1, 2), key.transpose(1, 2)


class _JointRecordingProcessor:
    """Installed on every joint-attention layer while any call records: reads the layer for the call
    running in this thread when that call chose it, then runs the layer's own processor unchanged."""

    def __init__(self, original, name: str, image_first: bool, instrumentation: SharedInstrumentation):
        self.original = original
        self.name = name
        self.image_first = image_first
        self.instrumentation = instrumentation

    def _read(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) -> None:
        recording = self.instrumentation.current()
        if recording is None or self.name not in recording.blocks:
            return
        if attention_mask is not None:
            raise ValueError(f"{self.name}: reading joint attention under an attention mask is not supported.")
        with torch.no_grad():
            if self.image_first:
                if encoder_hidden_states is None:
                    return  # not a joint layer call
                query, key = sd3_query_key(attn, hidden_states, encoder_hidden_states)
                text_len = encoder_hidden_states.shape[1]
            else:
                query, key = _flux_query_key(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
                text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else recording.text_length
            image, text = joint_layout(self.image_first, query.shape[2] - text_len, text_len)
            recording.store.record(self.name, query, key, image, text)


class _SD3RecordingProcessor(_JointRecordingProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        self._read(attn, hidden_states, encoder_hidden_states, attention_mask, None)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class _FluxRecordingProcessor(_JointRecordingProcessor):
    # FluxAttention.forward passes only the keyword arguments a processor declares: declare FluxAttnProcessor's.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self._read(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def _install(transformer, instrumentation: SharedInstrumentation):
    """Wrap the joint-attention layers' processors of ``transformer``; return the undo."""
    layers = joint_attention_layers(transformer)

    def wrap(name: str, proc):
        block = name[: -len(".attn.processor")] if name.endswith(".attn.processor") else None
        if block not in layers:
            return proc
        cls = _SD3RecordingProcessor if layers[block] else _FluxRecordingProcessor
        return cls(proc, block, layers[block], instrumentation)

    return wrap_attention_processors(transformer, wrap)


@contextlib.contextmanager
def record_joint_attention(transformer, store: JointAttentionStore, blocks: Sequence[str],
                           text_length: int) -> Iterator[JointAttentionStore]:
    """Record the joint attention of ``blocks`` (names from ``joint_attention_layers``) into ``store``
    during this thread's calls of ``transformer`` inside the block. ``text_length``: the number of text
    tokens in the sequence."""
    layers = joint_attention_layers(transformer)
    missing = sorted(set(blocks) - set(layers))
    if missing:
        raise ValueError(f"The transformer has no joint-attention blocks {missing}; it has {sorted(layers)}.")
    instrumentation = shared_instrumentation(transformer, "joint-attention-recording", _install)
    with instrumentation.active(JointRecording(store, frozenset(blocks), int(text_length))):
        yield store
