"""DiffSegmenter's released per-image class lists: which classes each image's prompts name.

The reference segments, for each image, only the classes listed for it in a label file it ships
(``dataset/<voc12|voc10|coco>/predict_syn_txt_0.8_img_0.97.json``): a JSON object with up to three
tables, ``synonym_matching``, ``image_similarity`` and ``text_similarity``, each mapping an image
(a full path or a file name) to the prompt words of its classes (``"plane"``, ``"people"``: the
words of the reference's ``PROMPT_NAMES``). Its VOC script reads the union of the image and text
tables. ``ImageClassLists`` reads such a file once, as data (``json``), and answers per image,
matched by file name, which classes of a vocabulary are listed.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Sequence

from ...vocabulary import split_synonyms

__all__ = ["ClassListError", "ImageClassLists", "REFERENCE_TABLES"]

#: The tables the reference's VOC script reads (``read_json(..., choice=['image_similarity', 'text_similarity'])``).
REFERENCE_TABLES = ("image_similarity", "text_similarity")


class ClassListError(ValueError):
    """A class-list file that cannot be used, or an image it has no entry for."""


class ImageClassLists:
    """Per-image prompt words, looked up by an image's file name.

    Args:
        words: file name (no folder) -> the prompt words listed for it, in first-seen order.
        source: where they came from (for messages).
    """

    def __init__(self, words: Dict[str, List[str]], source: str = "the class lists"):
        self.words = words
        self.source = source

    @classmethod
    def from_file(cls, path: str, tables: Sequence[str] = REFERENCE_TABLES,
                  config_key: str = "MODEL.DIFFSEG.CATEGORY_FILTER.CLASS_LISTS") -> "ImageClassLists":
        """Read a label file in the reference's format, joining ``tables`` per image.

        Raises:
            ClassListError: the file is missing or not such a file, a table is missing, or two
                entries of one table name the same file name.
        """
        if not os.path.isfile(path):
            raise ClassListError(f"{config_key} = {path!r}: no such file. Give the path of a per-image class-list "
                                 "JSON (the reference's predict_syn_txt_0.8_img_0.97.json), or '' for the CLIP filter.")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClassListError(f"{config_key} = {path!r} cannot be read as JSON: {e}") from None
        if not isinstance(data, dict):
            raise ClassListError(f"{path} holds a {type(data).__name__}; expected an object of tables "
                                 f"({', '.join(REFERENCE_TABLES)}).")
        missing = [t for t in tables if t not in data]
        if missing:
            raise ClassListError(f"{path} has no table {missing} (it has {sorted(data)}); set "
                                 f"{config_key}_TABLES to tables it holds.")
        words: Dict[str, List[str]] = {}
        for table in tables:
            entries = data[table]
            if not isinstance(entries, dict):
                raise ClassListError(f"{path}: table {table!r} is not an object of image -> class words.")
            seen_here: Dict[str, str] = {}
            for image, listed in entries.items():
                if not isinstance(listed, list) or not all(isinstance(w, str) for w in listed):
                    raise ClassListError(f"{path}: {table}[{image!r}] is not a list of class words.")
                name = os.path.basename(str(image).replace("\\", "/"))
                if name in seen_here:
                    raise ClassListError(f"{path}: {table} lists the file name {name!r} twice "
                                         f"({seen_here[name]!r} and {image!r}); images are matched by file name.")
                seen_here[name] = image
                own = words.setdefault(name, [])
                own.extend(w.strip() for w in listed if w.strip() and w.strip() not in own)
        return cls(words, path)

    def listed(self, file_name: str, names: Sequence[str], prompt_name: Callable[[str], str]) -> List[bool]:
        """Per class of ``names``, whether the image ``file_name`` lists it: by its prompt word
        (``prompt_name(class)``, e.g. "people" for "person"), its name or one of its synonyms.

        Raises:
            ClassListError: no file name (the input dict has no ``file_name``), or no entry for it.
        """
        if not file_name:
            raise ClassListError(f"Per-image class lists ({self.source}) need each input's 'file_name', and this "
                                 "input has none. Pass it in the input dict, or use the CLIP filter.")
        key = os.path.basename(str(file_name).replace("\\", "/"))
        if key not in self.words:
            raise ClassListError(f"{self.source} has no entry for the image {key!r} (the reference skips such an "
                                 "image). Evaluate the images it lists, or use the CLIP filter.")
        listed = set(self.words[key])
        return [prompt_name(n) in listed or n in listed or any(s in listed for s in split_synonyms(n)) for n in names]
