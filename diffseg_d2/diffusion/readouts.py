"""Exact attention read-outs of joint (text + image) attention, streamed: never a (heads, N, N) matrix.

In a diffusion transformer (SD3's MMDiT, FLUX) text and image tokens attend in one sequence, so an
image query's probability on a text key is normalised over ALL keys, text and image. The
probability is ``exp(q . k * scale - lse(q))`` with ``lse(q)`` the log-sum-exp of the query's
logits over every key. These functions form a query's logits against all keys one block of query
rows at a time (``(rows, S)`` per head, a few MB), take the log-sum-exp, and keep only what the
read-out needs, reduced at once:

* :func:`image_to_text`: per class, the image queries' probability on the class word's text keys
  (mean over the word's tokens, then over heads): ``(B, K, N_img)``;
* :func:`text_to_image`: the class word's text queries' probability on each image key (same
  reductions): ``(B, K, N_img)``;
* :func:`image_self_apply`: ``S c`` for maps ``c`` over the image, ``S`` the image-to-image part of the
  joint attention (rows normalised over all keys), mean over heads: the self-attention refinement.

Queries and keys come in as ``(B, H, S, D)`` with the image and text tokens at the index ranges
``image`` and ``text`` of the sequence. Scores are computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["image_to_text", "image_self_apply", "text_to_image"]

# Largest (rows, S) float32 logits block formed at once, per head.
CHUNK_BYTES = 16 * 2**20


def _rows(seq_len: int, chunk_bytes: Optional[int]) -> int:
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes  # read at call time (tests lower it)
    return max(1, chunk_bytes // (4 * max(seq_len, 1)))


def _row_log_probs(query: torch.Tensor, key: torch.Tensor, b: int, rows: slice, scale: float, chunk_bytes: int):
    """For batch element ``b``, each head and each block of the query rows ``rows``: ``(start, stop,
    log-probabilities (stop - start, S))``, the block's logits against ALL keys less their
    log-sum-exp. One ``(rows, S)`` float32 block exists at a time."""
    block = _rows(key.shape[2], chunk_bytes)
    for h in range(query.shape[1]):
        key_t = key[b, h].transpose(0, 1)
        for start in range(rows.start, rows.stop, block):
            stop = min(rows.stop, start + block)
            logits = torch.matmul(query[b, h, start:stop], key_t).float().mul_(scale)
            yield start, stop, logits - torch.logsumexp(logits, dim=-1, keepdim=True)


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
                  token_weight: torch.Tensor, scale: float, chunk_bytes: Optional[int] = None,
                  per_element: bool = False) -> torch.Tensor:
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
    B, H = query.shape[:2]
    K = token_index.shape[0]
    columns = _class_columns(text, token_index.to(query.device))  # (K, T)
    weight = token_weight.to(query.device, torch.float32)
    out = torch.zeros(K, image.stop - image.start, dtype=torch.float32, device=query.device)
    for b, cls in _class_batches(per_element, B, K):
        cols, w = columns[cls], weight[cls]  # (k, T)
        for start, stop, log_probs in _row_log_probs(query, key, b, image, scale, chunk_bytes):
            probs = log_probs[:, cols].exp_()  # (rows, k, T)
            out[cls, start - image.start:stop - image.start] += (probs * w).sum(-1).transpose(0, 1)
    return out / H


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
                     chunk_bytes: Optional[int] = None, per_element: bool = False) -> torch.Tensor:
    """``S c``: the image-to-image part of the joint attention (rows normalised over ALL keys, mean over
    heads) applied to ``maps`` (K, N_img), one block of query rows at a time.

    Args:
        query, key: (B, H, S, D).
        per_element: class k is refined by batch element k's attention (one pass per class); False:
            every class by element 0's.

    Returns:
        (K, N_img) float32.
    """
    H = query.shape[1]
    c = maps.to(query.device, torch.float32).transpose(0, 1)  # (N_img, K)
    out = torch.zeros(image.stop - image.start, c.shape[1], dtype=torch.float32, device=query.device)
    for b, cls in _class_batches(per_element, query.shape[0], c.shape[1]):
        for start, stop, log_probs in _row_log_probs(query, key, b, image, scale, chunk_bytes):
            # (rows, N_img) @ (N_img, k)
            out[start - image.start:stop - image.start, cls] += log_probs[:, image].exp_() @ c[:, cls]
    return (out / H).transpose(0, 1)


def joint_layout(image_first: bool, image_len: int, text_len: int) -> Tuple[slice, slice]:
    """``(image, text)`` index ranges of a joint sequence: SD3 puts the image first, FLUX the text."""
    if image_first:
        return slice(0, image_len), slice(image_len, image_len + text_len)
    return slice(text_len, text_len + image_len), slice(0, text_len)
