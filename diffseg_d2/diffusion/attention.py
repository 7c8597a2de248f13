"""Recording attention maps from a diffusers UNet, streamed into small accumulators.

``record_attention(unet, store)`` records the chosen layers only: on every other
layer the original (fast) processor runs, and the original processors are put back
when no call records any more. Concurrent calls of one UNet each record into their
own store (see ``instrumentation``). A recorder computes its layer's output exactly as diffusers'
default processor does and, on the way, reduces the attention probabilities it
needs straight into the ``AttentionStore``:

* cross-attention: for every class, the probability mass on the class word's
  tokens (mean over its sub-word tokens), averaged over heads -> summed into a
  ``(K, h*w)`` accumulator per latent factor;
* self-attention: averaged over heads and batch -> summed into one
  ``(h*w, h*w)`` accumulator per latent factor.

Nothing is kept per layer or per head. Cross-attention can be read in two ways:
against the layer's own keys (each batch element is one class prompt), or, with
``store.readout_context`` set, against the keys of all class prompts at once
while the UNet itself runs on one carrier prompt (``shared`` conditioning). A
cross-attention under a key mask (PixArt-Σ's T5 padding) is read with the mask's
bias added to the logits, as the layer computes them: the probabilities are the
softmax over the unmasked keys.

The same recording serves a cross-attention diffusion transformer (PixArt-Σ): its
``transformer_blocks.N`` each hold a self-attention ``attn1`` and a cross-attention
``attn2`` on one token grid, chosen by block (``cross_blocks`` / ``self_blocks``)
rather than by latent factor.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .instrumentation import SharedInstrumentation, shared_instrumentation, wrap_attention_processors
from .substrate import mask_of, tokens_of

# Largest transient tensor (bytes) a recorder materialises at once. It bounds the extra memory
# and, kept under the C allocator's mmap threshold (32 MB by default), lets every chunk reuse
# heap memory instead of a fresh zero-filled mapping: that alone made recording 3x cheaper on CPU.
_CHUNK_BYTES = 16 * 2**20


def attention_layers(model) -> Dict[str, Tuple[str, int]]:
    """Map each attention processor name of a UNet or of a cross-attention diffusion transformer
    (PixArt-Σ) to ``(kind, factor)``.

    ``kind`` is ``"self"`` (``attn1``) or ``"cross"`` (``attn2``); ``factor`` is the
    layer's downsampling relative to the latent (1, 2, 4, ...): down block ``i``
    works at ``2**i``, the mid block at the coarsest level, up block ``j`` at
    ``2**(n-1-j)``; a transformer's blocks (``transformer_blocks.N``) all work at
    its patch size.
    """
    n_down, n_up = len(getattr(model, "down_blocks", ())), len(getattr(model, "up_blocks", ()))
    layers = {}
    for name in model.attn_processors:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            factor = 2 ** int(parts[1])
        elif parts[0] == "mid_block":
            factor = 2 ** (n_down - 1)
        elif parts[0] == "up_blocks":
            factor = 2 ** (n_up - 1 - int(parts[1]))
        elif parts[0] == "transformer_blocks":
            factor = int(model.config.patch_size)
        else:
            continue
        if ".attn1." in name:
            kind = "self"
        elif ".attn2." in name:
            kind = "cross"
        else:
            continue
        layers[name] = (kind, factor)
    return layers


def _block_of(name: str) -> str:
    """The block of an attention processor name: ``transformer_blocks.3.attn2.processor`` -> ``transformer_blocks.3``."""
    return name.rsplit(".", 2)[0]


def attention_blocks(model, kind: str) -> list:
    """The blocks (processor names without ``.attn1.processor`` / ``.attn2.processor``) that hold an
    attention layer of ``kind`` ("self" or "cross"), in the model's order."""
    return [_block_of(name) for name, (k, _) in attention_layers(model).items() if k == kind]


def available_factors(unet, kind: str) -> list:
    """Sorted latent factors at which ``unet`` has attention layers of ``kind``."""
    return sorted({f for k, f in attention_layers(unet).values() if k == kind})


def _scaled_size(size: int, factor: int) -> int:
    # Each UNet downsampling (stride-2 conv, padding 1) rounds up.
    while factor > 1:
        size = math.ceil(size / 2)
        factor //= 2
    return size


class AttentionStore:
    """Streaming per-factor sums of attention maps for one image.

    Args:
        latent_size: ``(h, w)`` of the latent the UNet runs on.
        token_index: ``(K, T)`` positions, in each class prompt, of the class word's tokens.
        token_weight: ``(K, T)`` weights over those positions (1/n for the n real
            sub-word tokens, 0 for padding), so a weighted sum is the mean.
        readout_context: optional ``(K, L, D)`` encoded class prompts, or ``(1, L, D)``: one
            prompt holding every class's words. When set, cross-attention is read against
            these keys instead of the layer's own.
        own_self_attention: keep, for every batch element (class), the scaled queries and keys
            of the recorded self-attention layers instead of one running mean over the batch, so
            that ``refine_own`` can refine each class with the self-attention of its own pass.
            Costs ``2 * layers * H * N * d`` values per class, not ``N * N``.
        per_layer_heads: also keep, per cross-attention layer, every head's probability on every
            class token, summed over calls (``(H, T, N)`` per layer): DAAM's heat maps
            (``daam_heat_maps``) upsample and clamp each (layer, head, token) map before averaging.
    """

    def __init__(
        self,
        latent_size: Tuple[int, int],
        token_index: torch.Tensor,
        token_weight: torch.Tensor,
        readout_context: Optional[torch.Tensor] = None,
        own_self_attention: bool = False,
        per_layer_heads: bool = False,
    ):
        self.latent_size = tuple(latent_size)
        self.token_index = token_index
        self.token_weight = token_weight
        # The per-token states whose keys are read (a PromptEmbeds' tokens, or the tensor itself).
        self.readout_context = tokens_of(readout_context) if readout_context is not None else None
        # Their key mask (B, L) bool, None when every key is read (a PromptEmbeds' mask).
        self.readout_mask = mask_of(readout_context)
        self.own_self_attention = bool(own_self_attention)
        self.per_layer_heads = bool(per_layer_heads)
        self.num_classes = token_index.shape[0]
        # Rows of the class accumulators that the current UNet batch holds
        # ("per_class" conditioning: one class prompt per batch element).
        self.batch_classes = slice(0, self.num_classes)
        self.reset()

    def reset(self) -> None:
        self._cross: Dict[int, torch.Tensor] = {}
        self._cross_count: Dict[int, torch.Tensor] = {}
        self._self: Dict[int, torch.Tensor] = {}
        self._self_count: Dict[int, int] = {}
        # factor -> [(rows, scaled queries (n, H, N, d), keys (n, H, N, d))], one entry per layer call
        self._self_qk: Dict[int, list] = {}
        # cross-attention layer name -> (factor, (H, T, N) per-head token probabilities summed over calls)
        self._layer_heads: Dict[str, Tuple[int, torch.Tensor]] = {}

    def resolution(self, factor: int) -> Tuple[int, int]:
        h, w = self.latent_size
        return _scaled_size(h, factor), _scaled_size(w, factor)

    def add_cross(self, factor: int, rows: slice, maps: torch.Tensor) -> None:
        """Add ``(len(rows), N)`` head-averaged class maps of one layer."""
        if factor not in self._cross:
            n = maps.shape[-1]
            self._cross[factor] = torch.zeros(self.num_classes, n, device=maps.device)
            self._cross_count[factor] = torch.zeros(self.num_classes, device=maps.device)
        self._cross[factor][rows] += maps.float()
        self._cross_count[factor][rows] += 1

    def add_layer_heads(self, name: str, factor: int, probs: torch.Tensor) -> None:
        """Add one call's ``(H, K*T, N)`` per-head probabilities on the class tokens (``token_index``
        flattened) of layer ``name``."""
        if name in self._layer_heads:
            self._layer_heads[name][1].add_(probs.float())
        else:
            self._layer_heads[name] = (factor, probs.float().clone())

    def self_accumulator(self, factor: int, n: int, device: torch.device) -> torch.Tensor:
        """The ``(n, n)`` float32 running sum of self-attention maps at ``factor``, to add into in place."""
        if factor not in self._self:
            self._self[factor] = torch.zeros(n, n, device=device)
            self._self_count[factor] = 0
        return self._self[factor]

    def add_self(self, factor: int, summed: Optional[torch.Tensor], count: int) -> None:
        """Count ``count`` more self-attention maps at ``factor``, adding ``summed`` (N, N) if given
        (None when they were already added into ``self_accumulator``)."""
        if summed is not None:
            self.self_accumulator(factor, summed.shape[0], summed.device).add_(summed.float())
        self._self_count[factor] += count

    def add_self_qk(self, factor: int, rows: slice, query: torch.Tensor, key: torch.Tensor) -> None:
        """Keep one self-attention layer's scaled queries and keys ``(n, H, N, d)`` of classes ``rows``."""
        self._self_qk.setdefault(factor, []).append((rows, query, key))

    def refine_own(self, factor: int, maps: torch.Tensor) -> torch.Tensor:
        """``M_k = S_k c_k`` for every class k: ``maps`` ``(K, N)`` times the self-attention of that
        class's own pass (mean over the kept layers and heads, rows = queries), ``(K, N)`` float32.
        The ``(N, N)`` probabilities are formed in blocks of rows, never whole."""
        if factor not in self._self_qk:
            raise KeyError(f"no self-attention queries and keys were kept at latent factor {factor}")
        out = torch.zeros(maps.shape, dtype=torch.float32, device=maps.device)
        count = torch.zeros(maps.shape[0], dtype=torch.float32, device=maps.device)
        for rows, query, key in self._self_qk[factor]:
            n, heads, length, _ = query.shape
            block = max(1, _CHUNK_BYTES // (length * 4))
            for b in range(n):
                row = rows.start + b
                c = maps[row].float()
                for h in range(heads):
                    key_t = key[b, h].transpose(0, 1)
                    for r in range(0, length, block):
                        probs = torch.matmul(query[b, h, r:r + block], key_t).float().softmax(dim=-1)
                        out[row, r:r + block] += probs @ c
                count[row] += heads
        return out / count.clamp(min=1)[:, None]

    def cross_factors(self) -> list:
        return sorted(self._cross)

    def cross_sum(self, factor: int) -> torch.Tensor:
        """Summed class maps at ``factor`` over every recorded layer and call: ``(K, h, w)``."""
        if factor not in self._cross:
            raise KeyError(f"no cross-attention was recorded at latent factor {factor}")
        return self._cross[factor].view(self.num_classes, *self.resolution(factor))

    def cross_maps(self, factor: int) -> torch.Tensor:
        """Mean class maps at ``factor``: ``(K, h, w)``."""
        if factor not in self._cross:
            raise KeyError(f"no cross-attention was recorded at latent factor {factor}")
        mean = self._cross[factor] / self._cross_count[factor].clamp(min=1)[:, None]
        return mean.view(self.num_classes, *self.resolution(factor))

    def self_map(self, factor: int) -> torch.Tensor:
        """Mean self-attention at ``factor``: ``(N, N)``, rows are queries (each sums to 1)."""
        if factor not in self._self:
            raise KeyError(f"no self-attention was recorded at latent factor {factor}")
        return self._self[factor] / self._self_count[factor]


def minmax_per_map(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-map min-max normalisation of (K, ...) maps to [0, 1] (a new tensor)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return (flat - lo).div_((hi - lo).clamp(min=eps)).view_as(maps)


def summed_cross_maps(store: AttentionStore, factors: Sequence[int], size: Tuple[int, int]) -> torch.Tensor:
    """A DAAM-style aggregation (FreeDA's bank builder): the head-averaged class maps summed over every
    recorded layer and UNet call at ``factors``, each factor's sum upsampled bicubically to ``size``
    with its negative overshoot clamped, then added: ``(K, *size)``. DAAM's own order (each head
    and layer upsampled and clamped, then averaged) is :func:`daam_heat_maps`."""
    total = 0.0
    for factor in factors:
        maps = store.cross_sum(factor)
        if tuple(maps.shape[-2:]) != tuple(size):
            maps = F.interpolate(maps[None], size=tuple(size), mode="bicubic", align_corners=False)[0].clamp(min=0)
        total = total + maps
    return total


def daam_heat_maps(store: AttentionStore, size: Tuple[int, int]) -> torch.Tensor:
    """DAAM's heat maps (castorini/daam: ``compute_global_heat_map`` then a word's mean over its tokens)
    from a store recorded with ``per_layer_heads``: ``(K, *size)``.

    Every (layer, head, token) map, summed over the UNet calls, is upsampled bicubically to ``size``
    (the finest cross-attention resolution) and its negative overshoot clamped; the maps are averaged
    over all (layer, head) pairs, so a layer weighs by its number of heads; a class takes the mean
    over its word's tokens. As DAAM's locator, the mid block's layers are left out, and so are maps
    8 times coarser than ``size`` (DAAM skips its "factor 8" maps).
    """
    layers = {n: v for n, v in store._layer_heads.items() if not n.startswith("mid_block")}
    per_head = []
    for name, (factor, probs) in sorted(layers.items()):
        h, w = store.resolution(factor)
        if h * 8 <= size[0] and w * 8 <= size[1]:
            continue
        H, T, _ = probs.shape
        maps = probs.view(H * T, 1, h, w)
        if (h, w) != tuple(size):
            maps = F.interpolate(maps, size=tuple(size), mode="bicubic", align_corners=False).clamp_(min=0)
        per_head.append(maps.view(H, T, *size))  # T: the (class, token) positions of token_index, flattened
    if not per_head:
        raise RuntimeError("No cross-attention layer was recorded with per_layer_heads (DAAM's heat maps).")
    tokens = torch.cat(per_head).mean(0)  # (K*T, *size): the mean over every (layer, head)
    K, T = store.token_index.shape
    weight = store.token_weight.to(tokens.device, torch.float32)  # (K, T): 1/n on a word's n tokens
    return (tokens.view(K, T, *size) * weight[..., None, None]).sum(1)


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(Q K^T * scale + bias)`` over the keys, in float32 (the maps are small, and half-precision
    runs on CUDA keep their accuracy): query (..., N, d), key (..., L, d), bias broadcastable to
    (..., N, L) (a key mask's additive bias, as the layer adds it) or None -> (..., N, L)."""
    logits = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if bias is not None:
        logits += bias.float()
    return logits.softmax(dim=-1)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias of a (B, L) key mask (True = attend), (B, 1, L): 0 on kept keys, -10000 on masked
    ones, in ``dtype``: what diffusers' transformers (PixArt's ``encoder_attention_mask``) make of a mask."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, :]


def class_token_maps(
    query: torch.Tensor,
    key: torch.Tensor,
    token_index: torch.Tensor,
    token_weight: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Head-averaged attention on each class's word tokens.

    Args:
        query: ``(Bq, H, N, d)`` with ``Bq`` = 1 (shared) or K.
        key: ``(K, H, L, d)``: one prompt's keys per class; or ``(1, H, L, d)`` with a
            1-query: one prompt that holds every class's words, whose softmax is computed once.
        token_index, token_weight: ``(K, T)``.
        scale: softmax temperature of the layer (``1/sqrt(d)``).
        bias: None, or the key mask's additive bias ``(K or 1, H or 1, 1 or N, L)`` (one row per
            prompt of ``key``), added to the logits before the softmax as the layer adds it.

    Returns:
        ``(K, N)``: for every query position, the softmax(QK^T * scale + bias) mass on
        the class word (mean over its sub-word tokens), averaged over heads.
    """
    K = token_index.shape[0]
    _, H, L, _ = key.shape
    N = query.shape[2]

    def rows(b, start, stop):
        return None if b is None else (b if b.shape[0] == 1 else b[start:stop])

    joint = attention_probabilities(query, key, scale, bias) if key.shape[0] == 1 and query.shape[0] == 1 else None
    per_class = H * N * L * 4  # float32 probabilities
    step = max(1, _CHUNK_BYTES // max(per_class, 1))
    out = []
    for start in range(0, K, step):
        stop = min(K, start + step)
        if joint is not None:
            probs = joint.expand(stop - start, -1, -1, -1)
        else:
            q = query if query.shape[0] == 1 else query[start:stop]
            probs = attention_probabilities(q, key[start:stop], scale, rows(bias, start, stop))  # (k, H, N, L)
        idx = token_index[start:stop].to(probs.device)
        picked = probs.gather(-1, idx[:, None, None, :].expand(-1, H, N, -1))  # (k, H, N, T)
        w = token_weight[start:stop].to(device=probs.device)
        out.append((picked * w[:, None, None, :]).sum(-1).mean(1))
    return torch.cat(out, dim=0)


class AttentionRecorder:
    """A diffusers attention processor that also feeds an ``AttentionStore``.

    The layer output matches diffusers' ``AttnProcessor2_0``. Cross-attention
    output still comes from ``scaled_dot_product_attention``; self-attention is
    computed explicitly, in blocks of query rows, because its probabilities are
    the thing being recorded.
    """

    def __init__(self, store: AttentionStore, kind: str, factor: int, name: Optional[str] = None):
        if kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross', not {kind!r}")
        self.store = store
        self.kind = kind
        self.factor = factor
        self.name = name  # the layer (its processor name), for per-layer read-outs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.kind == "self" and attention_mask is None and self.store.own_self_attention:
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
            self.store.add_self_qk(self.factor, self.store.batch_classes, query * attn.scale, key)
        elif self.kind == "self" and attention_mask is None:
            out = self._self_attention(query, key, value, attn.scale)
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
                mask = mask.view(batch, heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
            if self.kind == "cross":
                self._read_cross(attn, query, key, mask)
            else:
                raise NotImplementedError("recording masked self-attention is not supported")

        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _read_cross(self, attn, query: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Read the class maps of one cross-attention call: query (B, H, N, d), the layer's keys (B, H, L, d)
        and the bias of its key mask (B, H, N or 1, L), or None."""
        store = self.store
        if store.readout_context is not None:
            context = store.readout_context.to(device=query.device, dtype=query.dtype)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            k = attn.to_k(context)
            k = k.view(k.shape[0], -1, attn.heads, k.shape[-1] // attn.heads).transpose(1, 2)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            # The read prompts' own mask, made into a bias as the model makes the layer's.
            bias = None if store.readout_mask is None else mask_bias(store.readout_mask.to(query.device), query.dtype)[:, None]
            rows = slice(0, store.num_classes)
            query = query[:1]  # the carrier batch holds one image
        else:
            k = key
            rows = store.batch_classes
        if not store.per_layer_heads:
            maps = class_token_maps(query, k, store.token_index[rows], store.token_weight[rows], attn.scale, bias)
            store.add_cross(self.factor, rows, maps)
            return
        # DAAM's per-head maps, from the same single softmax that gives the head-averaged class maps.
        if store.readout_context is not None or query.shape[0] != 1:
            raise ValueError("per-layer head maps are read from one pass on one prompt naming every class.")
        probs = attention_probabilities(query[0], k[0], attn.scale, None if bias is None else bias[0])  # (H, N, L)
        K, T = store.token_index.shape
        picked = probs[:, :, store.token_index.reshape(-1).to(probs.device)]  # (H, N, K*T)
        w = store.token_weight.to(device=probs.device, dtype=torch.float32)
        store.add_cross(self.factor, rows, (picked.view(*picked.shape[:2], K, T) * w).sum(-1).mean(0).transpose(0, 1))
        store.add_layer_heads(self.name or f"factor-{self.factor}", self.factor, picked.transpose(1, 2).contiguous())

    def _self_attention(self, query, key, value, scale: float) -> torch.Tensor:
        """Attention output (B, H, N, d), computed in blocks of query rows whose probabilities
        are added into the store's (N, N) accumulator as they are produced."""
        batch, heads, n, _ = query.shape
        acc = self.store.self_accumulator(self.factor, n, query.device)
        rows = max(1, _CHUNK_BYTES // (key.shape[2] * 4))
        out = torch.empty_like(query)
        query = query * scale
        for b in range(batch):
            for h in range(heads):
                key_t = key[b, h].transpose(0, 1)
                for r in range(0, n, rows):
                    # float32 softmax and sum, whatever the compute dtype
                    probs = torch.matmul(query[b, h, r : r + rows], key_t).float().softmax(dim=-1)
                    out[b, h, r : r + rows] = torch.matmul(probs.to(value.dtype), value[b, h])
                    acc[r : r + rows] += probs
        self.store.add_self(self.factor, None, batch * heads)
        return out


class _RecordingProcessor:
    """Installed on every attention layer while any call records: it records into the store of the
    call running in this thread when that call chose this layer, and otherwise runs the layer's
    original processor unchanged."""

    def __init__(self, original, kind: Optional[str], factor: Optional[int], instrumentation: SharedInstrumentation,
                 name: Optional[str] = None):
        self.original = original
        self.kind = kind
        self.factor = factor
        self.instrumentation = instrumentation
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        recording = self.instrumentation.current()
        if recording is not None and self.name in recording.layers:
            recorder = AttentionRecorder(recording.store, self.kind, self.factor, self.name)
            return recorder(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@dataclass(frozen=True)
class _Recording:
    store: AttentionStore
    layers: FrozenSet[str]  # processor names of the layers to record


def _install_recording_processors(unet, instrumentation: SharedInstrumentation) -> Callable[[], None]:
    """Wrap every attention processor of ``unet`` in a ``_RecordingProcessor``; return the undo."""
    layers = attention_layers(unet)
    return wrap_attention_processors(
        unet, lambda name, proc: _RecordingProcessor(proc, *layers.get(name, (None, None)), instrumentation, name))


@contextlib.contextmanager
def record_attention(
    unet,
    store: AttentionStore,
    cross_factors: Sequence[int] = (),
    self_factors: Sequence[int] = (),
    *,
    cross_blocks: Sequence[str] = (),
    self_blocks: Sequence[str] = (),
) -> Iterator[AttentionStore]:
    """Record the chosen layers of ``unet`` (a UNet, or a cross-attention diffusion transformer) into
    ``store`` during this thread's calls of it inside the ``with`` block.

    Only layers at ``cross_factors`` (cross-attention) and ``self_factors`` (self-attention), and
    those of the blocks ``cross_blocks`` / ``self_blocks`` (names from ``attention_blocks``), are
    recorded; the rest compute as their own processors do. Calls of the same model from other
    threads, recording or not, are not seen by ``store``, so one model may serve concurrent
    calls. The original processors are back once no call records any more, also after an
    exception.
    """
    for kind, wanted in (("cross", cross_factors), ("self", self_factors)):
        missing = sorted(set(wanted) - set(available_factors(unet, kind)))
        if missing:
            raise ValueError(
                f"The UNet has no {kind}-attention at latent factors {missing}; "
                f"it has them at {available_factors(unet, kind)}."
            )
    for kind, wanted in (("cross", cross_blocks), ("self", self_blocks)):
        missing = [b for b in wanted if b not in attention_blocks(unet, kind)]
        if missing:
            raise ValueError(f"The model has no {kind}-attention in the blocks {missing}; "
                             f"it has it in {attention_blocks(unet, kind)}.")
    factors = {"cross": {int(f) for f in cross_factors}, "self": {int(f) for f in self_factors}}
    blocks = {"cross": set(cross_blocks), "self": set(self_blocks)}
    layers = frozenset(name for name, (kind, factor) in attention_layers(unet).items()
                       if factor in factors[kind] or _block_of(name) in blocks[kind])
    instrumentation = shared_instrumentation(unet, "attention-recording", _install_recording_processors)
    with instrumentation.active(_Recording(store, layers)):
        yield store
