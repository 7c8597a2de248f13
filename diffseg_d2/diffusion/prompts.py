"""Class prompts and the positions of each class word's tokens in them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..pretrained.tokens import find_subsequence, token_mean_table
from ..vocabulary import VocabularyError


@dataclass
class ClassPrompts:
    """Tokenised prompts, one per class.

    Attributes:
        prompts: the K prompt strings.
        input_ids: ``(K, L)`` token ids padded to the text encoder's context L.
        token_index: ``(K, T)`` positions of the tokens whose attention is read for the class.
        token_weight: ``(K, T)``: 1/n on the n real positions of a row, 0 on padding.
        emphasis: ``(K, L)`` bool, the tokens of each class name's last word: what the reference's
            Compel markup ``name++`` up-weights (``FrozenStableDiffusion.encode_text``).
    """

    prompts: List[str]
    input_ids: torch.Tensor
    token_index: torch.Tensor
    token_weight: torch.Tensor
    emphasis: Optional[torch.Tensor] = None


def _check_template(template: str) -> None:
    if "{}" not in template:
        raise VocabularyError(f"The prompt template {template!r} has no '{{}}' where the class name goes.")


def _name_tokens(tokenizer, name: str) -> List[int]:
    """Token ids of a class name on its own (no special tokens)."""
    ids = tokenizer(name, add_special_tokens=False).input_ids
    if not ids:
        raise VocabularyError(f"The class name {name!r} tokenises to nothing; use a name made of letters or digits.")
    return ids


def _padded(tokenizer, ids: List[int], length: int) -> List[int]:
    """``ids`` padded to ``length`` with the tokenizer's pad (or end-of-text) token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * (length - len(ids))


#: Which of a class name's tokens are read: the first sub-token (the reference's VOC script), the
#: last (its COCO script), or the mean over all of them.
TOKEN_SELECTIONS = ("first", "last", "mean")


def build_class_prompts(
    tokenizer,
    names: Sequence[str],
    template: str,
    suffix: str = "",
    *,
    continuations: Optional[Sequence[str]] = None,
    selection: str = "mean",
    ing_rule: bool = False,
    length: Optional[int] = None,
) -> ClassPrompts:
    """Prompt ``template.format(name)`` per class, optionally continued, and which tokens are read.

    Args:
        tokenizer: the text encoder's tokenizer.
        names: the K words the prompts name (a class's prompt name).
        template: e.g. ``"a photograph of {}"``.
        suffix: one text appended to every prompt after a space (an image caption).
        continuations: K texts, each appended right after its own prompt (the continuation of a
            caption generated from that prompt). They are tokenised on their own and the tokens
            joined, as Compel joins the fragments of ``prompt++continuation``; a continuation is
            cut where the prompt would exceed the text encoder's context.
        selection: which of the name's tokens are read, one of ``TOKEN_SELECTIONS``.
        ing_rule: the reference's "-ing" rule: when the word after the name ends in "ing", the
            token after the last selected one is averaged in as well.
        length: the text encoder's context L (None: the tokenizer's ``model_max_length``; a diffusion
            transformer reads fewer T5 tokens than T5's tokenizer allows).

    Raises:
        VocabularyError: a name that tokenises to nothing, a prompt longer than
            the tokenizer's context, or a template that does not contain the
            name as separate words.
    """
    _check_template(template)
    if selection not in TOKEN_SELECTIONS:
        raise ValueError(f"MODEL.DIFFSEG.TOKEN_SELECTION must be one of {TOKEN_SELECTIONS}, not {selection!r}.")
    if continuations is not None and len(continuations) != len(names):
        raise ValueError(f"{len(continuations)} continuations for {len(names)} class prompts.")
    context = int(tokenizer.model_max_length if length is None else length)
    prompts, rows, positions, emphasis = [], [], [], []
    for k, name in enumerate(names):
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
        after = prompt[template.index("{}") + len(name):]
        if continuations is not None and continuations[k]:
            more = tokenizer(continuations[k], add_special_tokens=False).input_ids[: context - len(ids)]
            ids = ids[:-1] + more + ids[-1:]
            prompt = prompt + continuations[k]
            after = after + continuations[k]
        name_positions = list(range(start, start + len(name_ids)))
        read = {"first": name_positions[:1], "last": name_positions[-1:], "mean": name_positions}[selection]
        next_word = after.split()[0] if after.split() else ""
        if ing_rule and next_word.endswith("ing") and read[-1] + 1 < len(ids) - 1:
            read = read + [read[-1] + 1]
        last_word_ids = _name_tokens(tokenizer, name.split()[-1])
        tail = name_ids[-len(last_word_ids):] == last_word_ids
        weighted = name_positions[-len(last_word_ids):] if tail else name_positions
        prompts.append(prompt)
        rows.append(_padded(tokenizer, ids, context))
        positions.append(read)
        emphasis.append(weighted)
    token_index, token_weight = token_mean_table(positions)
    mask = torch.zeros(len(names), context, dtype=torch.bool)
    for k, weighted in enumerate(emphasis):
        mask[k, weighted] = True
    return ClassPrompts(prompts, torch.tensor(rows, dtype=torch.long), token_index, token_weight, mask)


def build_joint_prompt(tokenizer, names: Sequence[str], template: str, length: Optional[int] = None) -> ClassPrompts:
    """ONE prompt naming every class, ``template.format(", ".join(names))``, and where each
    name's tokens sit in it (the names are searched in order, so "red square" after "square"
    is found at its own place). Returned as K identical prompts, one per class; ``length`` as in
    ``build_class_prompts``.

    Raises:
        VocabularyError: as ``build_class_prompts``; the joint prompt must fit the
            tokenizer's context, since every class is read from it.
    """
    _check_template(template)
    prompt = template.format(", ".join(names))
    ids = tokenizer(prompt).input_ids
    context = int(tokenizer.model_max_length if length is None else length)
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
    row = _padded(tokenizer, ids, context)
    return ClassPrompts([prompt] * len(names), torch.tensor([row] * len(names), dtype=torch.long), token_index, token_weight)
