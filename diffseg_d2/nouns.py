"""Nouns of a caption: the words a FreeDA bank makes prototypes for, and the words ODISE's
caption-grounding loss matches with its queries.

Two sources (``MODEL.DIFFSEG.FREEDA.BUILD.NOUNS``):

* ``nltk``: NLTK's averaged-perceptron POS tagger; tokens tagged NN or NNS.
  NLTK installs from the package registry, its tagger data with
  ``python -m nltk.downloader averaged_perceptron_tagger_eng``.
* ``list``: the nouns and noun phrases of a file (one per line) that occur in the
  caption, longest phrase first, plural ``s``/``es`` forms included.

Both return each noun once, as it is written in the caption, in order of appearance.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence

from .optional_imports import require

# Words of letters and inner hyphens; an apostrophe ends a word, so "dog's" gives "dog".
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")


def _words(caption: str) -> List[str]:
    return _WORD.findall(caption)


class NltkNouns:
    """Nouns by NLTK's POS tagger (``NN``/``NNS`` tokens)."""

    source = "nltk"

    def __init__(self):
        self.nltk = require("nltk", "nltk", "Finding nouns with a POS tagger (FREEDA.BUILD.NOUNS nltk)")
        try:
            self.nltk.pos_tag(["a", "dog"])
        except LookupError as e:
            raise LookupError(
                "NLTK's POS tagger data is not installed. Install it once with "
                "`python -m nltk.downloader averaged_perceptron_tagger_eng`, or give the nouns yourself: "
                "MODEL.DIFFSEG.FREEDA.BUILD.NOUNS list and NOUN_LIST <file, one noun per line>."
            ) from e

    def fingerprint(self) -> dict:
        return {"source": self.source, "nltk": self.nltk.__version__}

    def __call__(self, caption: str) -> List[str]:
        out, seen = [], set()
        for word, tag in self.nltk.pos_tag(_words(caption)):
            if tag in ("NN", "NNS") and word.lower() not in seen:
                seen.add(word.lower())
                out.append(word)
        return out


class ListNouns:
    """Nouns and noun phrases of a given list found in the caption (case-insensitive)."""

    source = "list"

    def __init__(self, nouns: Sequence[str]):
        phrases = {tuple(n.lower().split()) for n in nouns if n.strip()}
        if not phrases:
            raise ValueError("The noun list is empty: give one noun or noun phrase per line.")
        self.phrases = sorted(phrases)
        self._longest = max(len(p) for p in phrases)
        # every accepted surface form -> its phrase: the last word may be plural. A listed
        # phrase always stands for itself ("glasses" is not the plural of a listed "glass").
        self._forms = {p: p for p in self.phrases}
        for p in self.phrases:
            for last in (p[-1] + "s", p[-1] + "es"):
                self._forms.setdefault(p[:-1] + (last,), p)

    @classmethod
    def from_file(cls, path) -> "ListNouns":
        path = Path(str(path)).expanduser()
        if not str(path).strip() or not path.is_file():
            raise FileNotFoundError(
                f"MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST = '{path}' is not a file (one noun or phrase per line)."
            )
        return cls(path.read_text(encoding="utf-8").splitlines())

    def fingerprint(self) -> dict:
        return {"source": self.source, "phrases": [" ".join(p) for p in self.phrases]}

    def __call__(self, caption: str) -> List[str]:
        words = _words(caption)
        lower = [w.lower() for w in words]
        out, seen, i = [], set(), 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                phrase = self._forms.get(tuple(lower[i : i + n]))
                if phrase is not None:
                    if phrase not in seen:
                        seen.add(phrase)
                        out.append(" ".join(words[i : i + n]))
                    i += n
                    break
            else:
                i += 1
        return out


def build_noun_extractor(source: str, noun_list: str = ""):
    """The extractor named by ``MODEL.DIFFSEG.FREEDA.BUILD.NOUNS`` (``nltk`` or ``list``)."""
    if source == "nltk":
        return NltkNouns()
    if source == "list":
        return ListNouns.from_file(noun_list)
    raise ValueError(f"MODEL.DIFFSEG.FREEDA.BUILD.NOUNS must be 'nltk' or 'list', not {source!r}.")
