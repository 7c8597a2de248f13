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


def name_key(name: str) -> str:
    """How class names are compared: case and runs of spaces ignored ("Potted  Plant" = "potted plant")."""
    return " ".join(str(name).lower().split())


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
        k = name_key(n)
        if k in seen and n not in dupes:
            dupes.append(n)
        seen[k] = n
    if dupes:
        raise VocabularyError(f"The vocabulary names these classes more than once: {dupes}. Each class must be unique.")
    return names


def _classes_of_text(text: str) -> List[str]:
    """``"person,sofa;couch"`` -> ``["person", "sofa, couch"]``: commas separate classes, semicolons the
    synonyms of one class (the package's own synonym separator is the comma inside a name)."""
    return [", ".join(part.strip() for part in entry.split(";")) for entry in text.split(",")]


def _checked(entries: List[str]) -> List[str]:
    """``parse_vocabulary`` plus the check that no class has an empty synonym."""
    names = parse_vocabulary(entries)
    for name in names:
        if any(not part.strip() for part in name.split(",")):
            raise VocabularyError(f"The class {name!r} has an empty synonym: remove the extra separator.")
    return names


def vocabulary_from_command_line(text: str) -> List[str]:
    """The vocabulary of a command-line argument, as the package's list of class names.

    ``"person,sofa;couch,dog"``: commas separate classes, semicolons separate the synonyms of one
    class (it scores the best of them). ``"@classes.txt"``: a file with one class per line, commas
    separating synonyms, ``#`` starting a comment. Validated as ``parse_vocabulary`` does.
    Text from anyone but the user running the command goes to :func:`vocabulary_from_untrusted_text`.
    """
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0].strip() for line in f]
        except OSError as e:
            raise VocabularyError(f"Cannot read the vocabulary file {path!r}: {e.strerror or e}.") from None
        return _checked([line for line in lines if line])
    return _checked(_classes_of_text(text))


def vocabulary_from_untrusted_text(text: str, *, max_classes: Optional[int] = None,
                                   max_chars: Optional[int] = None) -> List[str]:
    """The vocabulary of text typed by someone else (a web form, an API request): never opens a file.

    The same syntax as :func:`vocabulary_from_command_line` without its ``@file`` form: commas between
    classes, semicolons between synonyms. A class starting with ``@`` is refused with a message (it
    would read a file on the command line; here it is almost surely that mistake, and a name of ours
    never starts so).

    Args:
        max_classes: the most classes accepted (each one is a prompt the model encodes); None: no cap.
        max_chars: the most characters accepted, checked before the text is split; None: no cap.

    Raises:
        VocabularyError: ``@``, over a cap, or what :func:`parse_vocabulary` refuses.
    """
    text = text or ""
    if max_chars is not None and len(text) > max_chars:
        raise VocabularyError(
            f"The vocabulary is {len(text):,} characters long; at most {max_chars:,} are accepted here. "
            "Give fewer or shorter class names.")
    entries = _classes_of_text(text)
    if any(synonym.lstrip().startswith("@") for entry in entries for synonym in entry.split(",")):
        raise VocabularyError(
            "A name starting with '@' would read a vocabulary file on the command line; no file is read "
            "here. Type the class names themselves, separated by commas.")
    if max_classes is not None and len(entries) > max_classes:
        raise VocabularyError(
            f"The vocabulary has {len(entries)} classes; at most {max_classes} are accepted here. "
            "Give fewer classes.")
    return _checked(entries)


def background_index(names: Sequence[str]) -> Optional[int]:
    """Index of the ``background`` class, or None."""
    for i, n in enumerate(names):
        if n.strip().lower() == BACKGROUND:
            return i
    return None


def split_synonyms(name: str) -> List[str]:
    """The synonyms a class name lists, separated by commas (``"sofa, couch"``), stripped."""
    return [part.strip() for part in name.split(",") if part.strip()]


def synonym_classes(names: Sequence[str]) -> Tuple[List[str], List[List[int]]]:
    """Every synonym of ``names`` once, as a class of its own, and per class the indices of its
    synonyms in that list: ``["person", "sofa, couch"]`` -> ``(["person", "sofa", "couch"],
    [[0], [1, 2]])``. A vocabulary without synonyms comes back as it is."""
    flat: List[str] = []
    members: List[List[int]] = []
    for name in names:
        own = []
        for part in split_synonyms(name) or [name]:
            if part not in flat:
                flat.append(part)
            own.append(flat.index(part))
        members.append(own)
    return flat, members


def display_name(name: str) -> str:
    """How a class is shown (legends, tables, logs): its first synonym."""
    parts = split_synonyms(name)
    return parts[0] if parts else name


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


#: Roles of a class in panoptic output (``panoptic_roles``).
THING, STUFF, VOID = "thing", "stuff", "void"


def panoptic_roles(names: Sequence[str], thing_classes: Optional[Sequence[str]] = None,
                   stuff_classes: Optional[Sequence[str]] = None) -> List[str]:
    """Per class of ``names``, its role in ``panoptic_seg``: ``THING`` (split into instances),
    ``STUFF`` (one segment) or ``VOID`` (its pixels belong to no segment, id 0).

    Args:
        thing_classes: a dataset's thing classes (its metadata), compared case-insensitively: those
            are things and every other class is stuff, "background" included when the dataset
            lists it (it is a category of that dataset's ground truth).
        stuff_classes: for a vocabulary of the user's (``thing_classes`` None): the classes that are
            stuff. The others are things, and "background" is void, as in detectron2 and
            Mask2Former, where pixels of no category get segment id 0.

    Raises:
        VocabularyError: ``stuff_classes`` names a class that is not in ``names``, or both lists are given.
    """
    if thing_classes is not None:
        if stuff_classes:
            raise VocabularyError("Give thing_classes (a dataset's) or stuff_classes (for your vocabulary), not both.")
        thing_set = {name_key(t) for t in thing_classes}
        return [THING if name_key(n) in thing_set else STUFF for n in names]
    stuff_set = {name_key(t) for t in stuff_classes or ()}
    unknown = sorted(stuff_set - {name_key(n) for n in names})
    if unknown:
        raise VocabularyError(
            f"The stuff classes {unknown} are not in the vocabulary {list(names)}: name each as it appears "
            "there (MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES, or the input's 'stuff_classes')."
        )
    return [VOID if name_key(n) == BACKGROUND else STUFF if name_key(n) in stuff_set else THING for n in names]
