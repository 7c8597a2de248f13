"""The shipped configs, from a clone or an installed package: ``get_config_file("diffsegmenter/voc21.yaml")``.

The repository keeps its configs in ``configs/``; a build of the package copies that tree into
``diffseg_d2/model_zoo/configs/`` (``setup.py``; in a clone it is a link to ``configs/``), so the same
names, and the ``_BASE_`` chains between them, work from a wheel installed anywhere, as detectron2's
``model_zoo.get_config_file`` does for its own configs.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

__all__ = ["get_config_file", "list_configs"]

_PACKAGED = Path(__file__).resolve().parent / "configs"
_CLONE = Path(__file__).resolve().parents[2] / "configs"


def _roots() -> List[Path]:
    return [root for root in (_PACKAGED, _CLONE) if root.is_dir()]


def _relative(name: str) -> str:
    name = str(name).replace("\\", "/").lstrip("/")
    return name[len("configs/"):] if name.startswith("configs/") else name


def find_config_file(name: str) -> Optional[Path]:
    """The shipped config ``name`` (``"diffsegmenter/voc21.yaml"``, also with a leading ``configs/``), or None."""
    relative = _relative(name)
    if not relative or ".." in Path(relative).parts:
        return None
    for root in _roots():
        path = root / relative
        if path.is_file():
            return path
    return None


def get_config_file(name: str) -> str:
    """The path of the shipped config ``name``, e.g. ``get_config_file("diffsegmenter/voc21.yaml")``.

    Raises:
        FileNotFoundError: no shipped config has that name (the message lists them).
    """
    path = find_config_file(name)
    if path is None:
        raise FileNotFoundError(f"No shipped config is named {name!r}; the shipped configs are: "
                                f"{', '.join(list_configs())}.")
    return str(path)


def list_configs() -> List[str]:
    """The names of the shipped configs (yacs ``.yaml`` files and the LazyConfig ``.py`` files), sorted."""
    names = set()
    for root in _roots():
        for pattern in ("*.yaml", "*.py"):
            names.update(str(p.relative_to(root)).replace("\\", "/") for p in root.rglob(pattern))
    return sorted(names)
