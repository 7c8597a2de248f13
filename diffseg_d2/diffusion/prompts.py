"""Class prompts and the positions of each class word's tokens in them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..vocabulary import VocabularyError


@dataclass
class ClassPrompts:
    """Tokenised prompts, one per class.

    Attributes:
        prompts: the K prompt strings.
        input_ids: ``(K, L)`` token ids padded to the text encoder's context L.
        token_index: ``(K, T)`` positions of the class word's (sub-word) tokens.
        token_weight: ``(K, T)``: 1/n on the n real positions of a row, 0 on padding.
    """

    prompts: List[str]
    input_ids: torch.Tensor
    token_index: torch.Tensor
    token_weight: torch.Tensor


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


def _check_template(template: str) -> None:
    if "{}" not in template:
        raise VocabularyError(f"The prompt template {template!r} has no '{{}}' where the class name goes.")


def _name_tokens(tokenizer, name: str) -> List[int]:
    """Token ids of a class name on its own (no special tokens)."""
    ids = tokenizer(name, add_special_tokens=False).input_ids
    if not ids:
        raise VocabularyError(f"The class name {name!r} tokenises to nothing; use a name made of letters or digits.")
    return ids


def _padded(tokenizer, ids: List[int]) -> List[int]:
    """``ids`` padded to the tokenizer's context with its pad (or end-of-text) token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * (int(tokenizer.model_max_length) - len(ids))


def build_class_prompts(tokenizer, names: Sequence[str], template: str, suffix: str = "") -> ClassPrompts:
    """Prompt ``template.format(name) + suffix`` per class, and where the name's tokens sit.

    Raises:
        VocabularyError: a name that tokenises to nothing, a prompt longer than
            the tokenizer's context, or a template that does not contain the
            name as separate words.
    """
    _check_template(template)
    context = int(tokenizer.model_max_length)
    prompts, rows, positions = [], [], []
    for name in names:
        name_ids = _name_tokens(tokenizer, name)
        prompt = template.format(name) + (f" {suffix}" if suffix else "")
        ids = tokenizer(prompt).input_ids
        if len(ids) > context:
            raise VocabularyError(
                f"The prompt {prompt!r} is {len(ids)} tokens long, more than the text encoder's context of "
                f"{context}. Shorten the class name or MODEL.DIFFSEG.PROMPT_TEMPLATE."
            )
        start = find_subsequence(ids, name_ids)
        if start < 0:
            raise VocabularyError(
                f"The class name {name!r} is not tokenised the same way inside the prompt {prompt!r}; "
                "put '{}' in MODEL.DIFFSEG.PROMPT_TEMPLATE between spaces or punctuation."
            )
        prompts.append(prompt)
        rows.append(_padded(tokenizer, ids))
        positions.append(list(range(start, start + len(name_ids))))
    token_index, token_weight = token_mean_table(positions)
    return ClassPrompts(prompts, torch.tensor(rows, dtype=torch.long), token_index, token_weight)


def build_joint_prompt(tokenizer, names: Sequence[str], template: str) -> ClassPrompts:
    """ONE prompt naming every class, ``template.format(", ".join(names))``, and where each
    name's tokens sit in it (the names are searched in order, so "red square" after "square"
    is found at its own place). Returned as K identical prompts, one per class.

    Raises:
        VocabularyError: as ``build_class_prompts``; the joint prompt must fit the
            tokenizer's context, since every class is read from it.
    """
    _check_template(template)
    prompt = template.format(", ".join(names))
    ids = tokenizer(prompt).input_ids
    context = int(tokenizer.model_max_length)
    if len(ids) > context:
        raise VocabularyError(
            f"The prompt naming all {len(names)} classes is {len(ids)} tokens long, more than the text "
            f"encoder's context of {context}; use fewer or shorter class names."
        )
    positions, start = [], 0
    for name in names:
        name_ids = _name_tokens(tokenizer, name)
        at = find_subsequence(ids, name_ids, start)
        if at < 0:
            raise VocabularyError(
                f"The class name {name!r} is not tokenised the same way inside the prompt {prompt!r}; "
                "put '{}' in the template between spaces or punctuation."
            )
        positions.append(list(range(at, at + len(name_ids))))
        start = at + len(name_ids)
    token_index, token_weight = token_mean_table(positions)
    row = _padded(tokenizer, ids)
    return ClassPrompts([prompt] * len(names), torch.tensor([row] * len(names), dtype=torch.long), token_index, token_weight)
