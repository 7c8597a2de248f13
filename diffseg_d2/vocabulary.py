"""Class vocabularies: where they come from and what makes one valid.

A vocabulary is an ordered list of class names; its order is the channel
order of the ``sem_seg`` output. A class named ``background`` is not prompted:
its channel is the method's background score. Every method and tool checks a
vocabulary here, so the same mistakes get the same messages.
"""
from __future__ import annotations

import unicodedata
from typing import Iterable, List, Optional, Sequence, Tuple, Union

BACKGROUND = "background"


class VocabularyError(ValueError):
    """A vocabulary that cannot be segmented with."""


def parse_vocabulary(names: Union[str, Iterable[str]]) -> List[str]:
    """Validate class names (a list, or one comma-separated string) and return them cleaned.

    Raises:
        VocabularyError: no classes, a name with no visible characters, or the same name twice
            (compared case-insensitively, ignoring surrounding spaces).
    """
    if isinstance(names, str):
        names = names.split(",")
    # Control and format characters (NUL, zero-width space, BOM, ...) carry no meaning for a
    # text encoder; a name made only of them would give a prompt with no class word.
    names = ["".join(ch for ch in str(n) if unicodedata.category(ch)[0] != "C").strip() for n in names]
    if not names or all(not n for n in names):
        raise VocabularyError(
            "The vocabulary is empty: give at least one class name (e.g. --vocab 'cat,dog' or "
            "MODEL.DIFFSEG.VOCABULARY, or evaluate on a dataset whose metadata has stuff_classes)."
        )
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise VocabularyError(
            f"The vocabulary has class names with no visible characters at positions {empty}; such a "
            "name tokenises to nothing. Remove them or give each class a name."
        )
    seen, dupes = {}, []
    for n in names:
        k = " ".join(n.lower().split())
        if k in seen and n not in dupes:
            dupes.append(n)
        seen[k] = n
    if dupes:
        raise VocabularyError(f"The vocabulary names these classes more than once: {dupes}. Each class must be unique.")
    return names


def vocabulary_from_command_line(text: str) -> List[str]:
    """The vocabulary of a command-line argument, as the package's list of class names.

    ``"person,sofa;couch,dog"``: commas separate classes, semicolons separate the synonyms of one
    class (it scores the best of them). ``"@classes.txt"``: a file with one class per line, commas
    separating synonyms, ``#`` starting a comment. Validated as ``parse_vocabulary`` does.
    """
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0].strip() for line in f]
        except OSError as e:
            raise VocabularyError(f"Cannot read the vocabulary file {path!r}: {e.strerror or e}.") from None
        entries = [line for line in lines if line]
    else:
        entries = text.split(",")
        entries = [", ".join(part.strip() for part in entry.split(";")) for entry in entries]
    names = parse_vocabulary(entries)
    for name in names:
        if any(not part.strip() for part in name.split(",")):
            raise VocabularyError(f"The class {name!r} has an empty synonym: remove the extra separator.")
    return names


def background_index(names: Sequence[str]) -> Optional[int]:
    """Index of the ``background`` class, or None."""
    for i, n in enumerate(names):
        if n.strip().lower() == BACKGROUND:
            return i
    return None


def split_synonyms(name: str) -> List[str]:
    """The synonyms a class name lists, separated by commas (``"sofa, couch"``), stripped."""
    return [part.strip() for part in name.split(",") if part.strip()]


def vocabulary_from_metadata(dataset_name: str) -> List[str]:
    """The classes of a dataset's metadata: its ``stuff_classes`` (all classes, Mask2Former's
    convention), else its ``thing_classes``.

    The name may be a registered dataset or a metadata-only entry, the way Detectron2 users give a
    vocabulary: ``MetadataCatalog.get("my_vocab").set(stuff_classes=[...])`` (or ``thing_classes``)
    and ``DATASETS.TEST = ("my_vocab",)``.
    """
    from detectron2.data import MetadataCatalog

    from .catalog import check_dataset_name

    if dataset_name not in MetadataCatalog.list():
        check_dataset_name(dataset_name)  # neither metadata nor a dataset: the error lists the choices
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("stuff_classes", None) or meta.get("thing_classes", None)
    if not classes:
        raise VocabularyError(
            f"The metadata of '{dataset_name}' has no stuff_classes or thing_classes to segment: set them with "
            f"MetadataCatalog.get('{dataset_name}').set(stuff_classes=[...]), or set MODEL.DIFFSEG.VOCABULARY."
        )
    return parse_vocabulary(classes)


def classes_from_metadata(dataset_name: str) -> Tuple[List[str], List[str]]:
    """``(classes, thing_classes)`` of a dataset's metadata: :func:`vocabulary_from_metadata` and the
    subset that are countable things (its ``thing_classes``; empty for semantic datasets). A
    metadata-only entry with ``thing_classes`` alone makes every class a thing."""
    from detectron2.data import MetadataCatalog

    classes = vocabulary_from_metadata(dataset_name)
    return classes, list(MetadataCatalog.get(dataset_name).get("thing_classes", []) or [])


def thing_flags(names: Sequence[str], thing_classes: Optional[Sequence[str]] = None) -> List[bool]:
    """Per class of ``names``, whether it is a thing (instances, panoptic ``isthing``).

    Args:
        thing_classes: the names that are things (compared case-insensitively); None when nobody
            says, which makes every class except "background" a thing.
    """
    if thing_classes is None:
        return [n.strip().lower() != BACKGROUND for n in names]
    thing_set = {t.strip().lower() for t in thing_classes}
    return [n.strip().lower() in thing_set for n in names]
