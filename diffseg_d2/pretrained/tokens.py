"""Tokens: the CLIP BPE vocabulary files and the positions of words in tokenised text, shared by
every text encoder the package reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Tuple

import torch

from ..optional_imports import require


def t5_tokenizer_class(transformers):
    """The T5 tokenizer class to use: the fast one (the ``tokenizers`` library's), else the sentence-piece one."""
    return getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer


def find_subsequence(seq: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    """Start of the first occurrence of ``sub`` in ``seq`` (token ids) at or after ``start``, or -1."""
    if not sub:
        return -1
    for i in range(start, len(seq) - len(sub) + 1):
        if list(seq[i : i + len(sub)]) == list(sub):
            return i
    return -1


def token_mean_table(positions: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token positions of K words -> ``(K, T)`` padded indices and weights (1/n on a word's n
    real positions, 0 on padding), so that a weighted sum over them is the mean over the word."""
    width = max(len(p) for p in positions)
    index = torch.zeros(len(positions), width, dtype=torch.long)
    weight = torch.zeros(len(positions), width)
    for i, pos in enumerate(positions):
        index[i, : len(pos)] = torch.tensor(list(pos))
        weight[i, : len(pos)] = 1.0 / len(pos)
    return index, weight


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer into ``folder``."""
    open_clip_tokenizer = require("open_clip.tokenizer", "open_clip_torch", "The tiny tokenizer")
    simple = open_clip_tokenizer.SimpleTokenizer()
    # open_clip names its special tokens differently from the CLIP/SD tokenizer files.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for (a, b), _ in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
