"""Where diffseg_d2 reads datasets from and keeps its small cached files.

Both locations come from the environment so that nothing depends on the
package's install location:

- ``DIFFSEG_D2_CACHE``: files diffseg_d2 makes itself (the sample image,
  text-embedding caches). Defaults to ``~/.cache/diffseg_d2``.
- ``DETECTRON2_DATASETS``: the folder holding the datasets, detectron2's own
  convention. Defaults to ``./datasets``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["cache_dir", "datasets_root", "write_atomically", "CACHE_ENV", "DATASETS_ENV"]

#: Environment variable that overrides :func:`cache_dir`.
CACHE_ENV = "DIFFSEG_D2_CACHE"
#: Environment variable that sets :func:`datasets_root` (same name as detectron2 uses).
DATASETS_ENV = "DETECTRON2_DATASETS"


def cache_dir(create: bool = True) -> Path:
    """The diffseg_d2 cache folder: ``$DIFFSEG_D2_CACHE`` or ``~/.cache/diffseg_d2``.

    The environment is read at every call, so a value set after import is honoured.

    Args:
        create: make the folder (and its parents) if it does not exist. Pass
            False to only compute the path, e.g. at import time, where nothing
            may be written.

    Returns:
        The absolute path of the cache folder.
    """
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "diffseg_d2"
    path = path.absolute()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def datasets_root() -> Path:
    """The datasets folder: ``$DETECTRON2_DATASETS`` or ``./datasets``.

    Read at every call; never created (a missing dataset is reported by the
    loader that needs it).

    Returns:
        The absolute path of the datasets root (``./datasets`` is taken
        relative to the current working directory, as detectron2 does).
    """
    env = os.environ.get(DATASETS_ENV)
    return Path(env or "datasets").expanduser().absolute()


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``."""
    # A unique name in the same folder (so os.replace is atomic), created by ``write``
    # itself so that the file gets the usual permissions (mkstemp would make it 0600).
    tmp = str(path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}{path.suffix}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
