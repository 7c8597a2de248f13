"""Exact attention read-outs of joint (text + image) attention, streamed: never a (heads, N, N) matrix.

In a diffusion transformer (SD3's MMDiT, FLUX) text and image tokens attend in one sequence, so an
image query's probability on a text key is normalised over ALL keys, text and image. Both read-outs
that concern the image queries are products of that softmax with a thin matrix, which PyTorch's fused
scaled-dot-product attention computes in tiles (online softmax; on CPU its flash kernel, on CUDA
flash / memory-efficient attention) without ever forming the (rows, keys) probabilities:

* :func:`image_to_text`: per class, the image queries' probability on the class word's text keys
  (mean over the word's tokens, then over heads) = softmax(Q K^T) E with E the one-hot columns of
  those keys: ``(K, N_img)``;
* :func:`image_self_apply`: ``S c`` for maps ``c`` over the image, ``S`` the image-to-image part of the
  joint attention (rows normalised over all keys), mean over heads = softmax(Q K^T) [c; 0]: the
  self-attention refinement;
* :func:`text_to_image`: the class word's text queries' probability on each image key (same
  reductions): only those few query rows' logits are formed.

Queries and keys come in as ``(B, H, S, D)`` with the image and text tokens at the index ranges
``image`` and ``text`` of the sequence. Everything is computed in float32 whatever the compute dtype;
the thin matrix is fed to the kernel in slices as wide as the head dimension (the shape every fused
kernel takes).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["image_to_text", "image_self_apply", "text_to_image"]


def _attend(query: torch.Tensor, key: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(query key^T * scale) @ values`` of one batch element, per head: query (H, n, D), key (H, S, D),
    values (S, m) shared by the heads -> (H, n, m) float32, through the fused attention kernel."""
    H, _, D = query.shape
    q, k = query.float()[None], key.float()[None]
    out = []
    for start in range(0, values.shape[1], D):
        v = values[:, start:start + D].float()
        width = v.shape[1]
        v = F.pad(v, (0, D - width))[None, None].expand(1, H, -1, -1)
        out.append(F.scaled_dot_product_attention(q, k, v, scale=scale)[0, ..., :width])
    return torch.cat(out, dim=-1)


def _class_columns(text: slice, token_index: torch.Tensor) -> torch.Tensor:
    """Sequence positions of the class words' text tokens: (K, T)."""
    return token_index + text.start


def _class_batches(per_element: bool, B: int, K: int):
    """``(batch element, classes)`` pairs: class k from element k when ``per_element`` (a batch of K
    prompts, one per class), else every class from element 0 (one prompt naming them all; with
    classifier-free guidance, element 0 is the prompted half)."""
    if not per_element:
        return [(0, slice(0, K))]
    if B != K:
        raise ValueError(f"One prompt per class was asked for, but the batch has {B} elements for {K} classes.")
    return [(k, slice(k, k + 1)) for k in range(K)]


def image_to_text(query: torch.Tensor, key: torch.Tensor, image: slice, text: slice, token_index: torch.Tensor,
                  token_weight: torch.Tensor, scale: float, per_element: bool = False) -> torch.Tensor:
    """Each class's map over the image: the image queries' softmax probability (over ALL keys) on the
    class word's text keys, mean over the word's tokens and over heads.

    Args:
        query, key: (B, H, S, D) of one attention layer (after its norms and rotary embedding).
        image, text: the index ranges of the image and text tokens in the sequence.
        token_index, token_weight: (K, T) positions within the text tokens of each class word, and
            weights (1/n on a word's n tokens, 0 on padding).
        scale: the logits' scale (1/sqrt(D) for scaled-dot-product attention).
        per_element: class k is read from batch element k (a batch of K prompts, one per class);
            False: every class from element 0.

    Returns:
        (K, N_img) float32.
    """
    B, H, S, _ = key.shape
    K = token_index.shape[0]
    columns = _class_columns(text, token_index.to(query.device))  # (K, T)
    weight = token_weight.to(query.device, torch.float32)
    out = torch.zeros(K, image.stop - image.start, dtype=torch.float32, device=query.device)
    for b, cls in _class_batches(per_element, B, K):
        cols, w = columns[cls], weight[cls]  # (k, T)
        k, T = cols.shape
        one_hot = torch.zeros(S, k * T, dtype=torch.float32, device=query.device)
        one_hot[cols.reshape(-1), torch.arange(k * T, device=query.device)] = 1.0
        probs = _attend(query[b, :, image], key[b], one_hot, scale)  # (H, N_img, k*T)
        out[cls] = (probs.view(H, -1, k, T) * w).sum(-1).mean(0).transpose(0, 1)
    return out


def text_to_image(query: torch.Tensor, key: torch.Tensor, image: slice, text: slice, token_index: torch.Tensor,
                  token_weight: torch.Tensor, scale: float, per_element: bool = False) -> torch.Tensor:
    """Each class's map over the image from the other direction: the class word's text queries'
    softmax probability (over ALL keys) on each image key, mean over the word's tokens and heads.
    Arguments and result as :func:`image_to_text`: (K, N_img) float32."""
    B, H = query.shape[:2]
    K = token_index.shape[0]
    columns = _class_columns(text, token_index.to(query.device))
    weight = token_weight.to(query.device, torch.float32)
    out = torch.zeros(K, image.stop - image.start, dtype=torch.float32, device=query.device)
    for b, cls in _class_batches(per_element, B, K):
        cols, w = columns[cls], weight[cls]  # (k, T)
        q = query[b][:, cols.reshape(-1)]  # (H, k*T, D): a few rows
        logits = torch.matmul(q, key[b].transpose(-1, -2)).float().mul_(scale)  # (H, k*T, S)
        probs = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()[..., image]
        probs = probs.view(H, cols.shape[0], cols.shape[1], -1)  # (H, k, T, N_img)
        out[cls] = (probs * w[None, :, :, None]).sum(2).mean(0)
    return out


def image_self_apply(query: torch.Tensor, key: torch.Tensor, image: slice, maps: torch.Tensor, scale: float,
                     per_element: bool = False) -> torch.Tensor:
    """``S c``: the image-to-image part of the joint attention (rows normalised over ALL keys, mean over
    heads) applied to ``maps`` (K, N_img): the softmax times ``c`` over the image keys and 0 over the text.

    Args:
        query, key: (B, H, S, D).
        per_element: class k is refined by batch element k's attention (one pass per class); False:
            every class by element 0's.

    Returns:
        (K, N_img) float32.
    """
    S, K = key.shape[2], maps.shape[0]
    values = torch.zeros(S, K, dtype=torch.float32, device=query.device)
    values[image] = maps.to(query.device, torch.float32).transpose(0, 1)
    out = torch.zeros(K, image.stop - image.start, dtype=torch.float32, device=query.device)
    for b, cls in _class_batches(per_element, query.shape[0], K):
        out[cls] = _attend(query[b, :, image], key[b], values[:, cls], scale).mean(0).transpose(0, 1)
    return out


def joint_layout(image_first: bool, image_len: int, text_len: int) -> Tuple[slice, slice]:
    """``(image, text)`` index ranges of a joint sequence: SD3 puts the image first, FLUX the text."""
    if image_first:
        return slice(0, image_len), slice(image_len, image_len + text_len)
    return slice(text_len, text_len + image_len), slice(0, text_len)
