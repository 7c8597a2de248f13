"""Reading the captions a FreeDA bank is built from: a text file or COCO captions JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List


class CaptionsError(ValueError):
    """A captions file that cannot be used."""


def read_captions(path) -> List[str]:
    """Captions in file order; caption ``i`` of the list is caption id ``i`` of the bank.

    Args:
        path: a UTF-8 text file with one caption per line (blank lines are skipped), or a
            COCO captions JSON (``{"annotations": [{"caption": ...}, ...]}``, ``.json``).

    Raises:
        CaptionsError: a missing, unreadable, malformed or empty file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CaptionsError(f"The captions file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionsError(f"The captions file '{path}' cannot be read as UTF-8 text ({e}).") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            captions = [str(a["caption"]) for a in data["annotations"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CaptionsError(
                f"'{path}' is not a COCO captions file: expected {{\"annotations\": [{{\"caption\": ...}}]}} ({e})."
            ) from e
    else:
        captions = text.splitlines()
    captions = [" ".join(c.split()) for c in captions]
    captions = [c for c in captions if c]
    if not captions:
        raise CaptionsError(f"The captions file '{path}' holds no captions (one per line, or COCO JSON).")
    return captions
