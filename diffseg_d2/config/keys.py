"""How a config key is declared: ``k("FREEDA.TOP_K", 350, POSITIVE)`` sets the default under ``MODEL.DIFFSEG``
and records the range ``check_config`` holds its value to, so each key is written once (with its comment above
it, in the module of its method)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from detectron2.config import CfgNode as CN

__all__ = ["NON_NEGATIVE", "POSITIVE", "RANGES", "UNIT", "Keys"]

#: (low, high, what the message says); None = no bound on that side.
Range = Tuple[Optional[float], Optional[float], str]
UNIT: Range = (0.0, 1.0, "in [0, 1]")
POSITIVE: Range = (1, None, ">= 1")
NON_NEGATIVE: Range = (0, None, ">= 0")

#: key under MODEL.DIFFSEG -> the range its value (or every value of its list) must lie in, filled as the
#: keys are declared; ``check_config`` reads it.
RANGES: Dict[str, Range] = {}


class Keys:
    """Declares keys on a config: ``k(dotted, default, valid=None)`` under ``MODEL.DIFFSEG``, ``k.top(dotted,
    default)`` from the config's root (the few keys a method adds to detectron2's own nodes)."""

    def __init__(self, cfg: CN):
        self.cfg = cfg

    def __call__(self, dotted: str, default, valid: Optional[Range] = None) -> None:
        _set(self.cfg.MODEL.DIFFSEG, dotted, default)
        if valid is not None:
            RANGES[dotted] = valid

    def top(self, dotted: str, default) -> None:
        _set(self.cfg, dotted, default)


def _set(node: CN, dotted: str, value) -> None:
    *path, name = dotted.split(".")
    for part in path:
        if part not in node:
            node[part] = CN()
        node = node[part]
    node[name] = value
