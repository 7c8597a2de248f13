"""Import heavy libraries where they are used, with an error that says what to install."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the ``package`` to install and why."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the '{package}' package, which could not be imported ({e}). "
            f"Install it with: pip install '{package}'"
        ) from e
