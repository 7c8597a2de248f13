"""Where model weights come from: a hub id, a local folder, or a preset (``tiny``, ``micro``, ``random:<architecture>``).

Every model the package loads (Stable Diffusion, CLIP, DINOv2, the captioner) names its
weights with one config string. ``resolve_weights`` turns that string into a
location and checks a local folder before anything is loaded, so a missing or
incomplete folder gives an error that names the config key, not a stack trace
from deep inside a library.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence

from ..paths import cache_dir

logger = logging.getLogger(__name__)

TINY = "tiny"
# The micro-world models trained by the project (diffseg_d2/microworld/weights/).
MICRO = "micro"
# Random weights of a real architecture, built in memory: for speed and memory measurements.
RANDOM_PREFIX = "random:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class WeightsLocation:
    """A resolved weights string: ``path`` is a local folder or a hub id (``is_local`` says which)."""

    path: str
    is_local: bool
    config_key: str


class MissingWeightsError(FileNotFoundError):
    """A weights folder named in the config is missing or incomplete."""


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(value))


def build_once(name: str, builder: Callable[[Path], None]) -> Path:
    """Build a preset folder into the cache once, atomically, and return it.

    The builder writes into a temporary sibling folder that is renamed into
    place when complete, so an interrupted build never leaves a half-written
    preset behind.
    """
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("building the %s preset into %s", name, target)
        builder(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the preset is ordinary cache content
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # lost a race only if someone else finished it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_weights(
    value: str,
    *,
    config_key: str,
    required_files: Sequence[str] = (),
    tiny: Optional[tuple[str, Callable[[Path], None]]] = None,
    micro: Optional[str] = None,
) -> WeightsLocation:
    """Resolve a weights string from the config.

    Args:
        value: hub id (``org/name``), local folder, ``"tiny"`` or ``"micro"``.
        config_key: the config key the value came from, named in every error.
        required_files: paths (globs allowed) that a local folder must contain.
        tiny: ``(cache folder name, builder)`` for the ``tiny`` preset, if it has one.
        micro: the folder under ``diffseg_d2/microworld/weights/`` holding this model's
            micro-world weights (trained by tools/train_microworld.py, shipped with the package).
    """
    value = (value or "").strip()
    if not value:
        raise MissingWeightsError(f"{config_key} is empty: set it to a hub id or a local folder.")
    if value == TINY:
        if tiny is None:
            raise MissingWeightsError(f"{config_key}: there is no 'tiny' preset for this model.")
        folder = build_once(*tiny)
        return WeightsLocation(str(folder), True, config_key)
    if value == MICRO:
        if micro is None:
            raise MissingWeightsError(f"{config_key}: there is no 'micro' (micro-world) model of this kind.")
        folder = Path(__file__).resolve().parent.parent / "microworld" / "weights" / micro
        if not folder.is_dir():
            raise MissingWeightsError(
                f"{config_key} = 'micro': the micro-world weights are not in {folder}. They ship with the "
                f"repository; to rebuild them run `python tools/train_microworld.py {micro} --output {folder}`."
            )
        value = str(folder)
    if _looks_like_path(value):
        folder = Path(os.path.expanduser(value))
        if not folder.is_dir():
            raise MissingWeightsError(
                f"{config_key} = '{value}' is not an existing folder. Point it at a downloaded copy "
                "of the weights, or use a hub id."
            )
        missing = [f for f in required_files if not list(folder.glob(f))]
        if missing:
            raise MissingWeightsError(
                f"The weights folder '{value}' ({config_key}) is incomplete: missing {', '.join(missing)}. "
                "Download the whole model into it (e.g. `huggingface-cli download <id> --local-dir <folder>`)."
            )
        return WeightsLocation(str(folder), True, config_key)
    if _HUB_ID.match(value):
        return WeightsLocation(value, False, config_key)
    raise MissingWeightsError(
        f"{config_key} = '{value}' is neither an existing folder nor a hub id of the form 'org/name'."
    )


def hub_load_error(location: WeightsLocation, what: str, error: Exception) -> MissingWeightsError:
    """The error to raise when loading ``what`` from a hub id failed (offline, unknown id, ...)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    advice = (" (HF_HUB_OFFLINE is set: only models already in the local hub cache load by id)" if offline else
              " (and set HF_HUB_OFFLINE=1 on a machine without network, so that the hub client does not retry)")
    return MissingWeightsError(
        f"Could not load the {what} from the hub id '{location.path}' ({location.config_key}): {error}. "
        f"Without hub access, download the model elsewhere and set {location.config_key} to its local folder"
        f"{advice}."
    )


def random_architecture(value: str, *, config_key: str, choices: Collection[str]) -> Optional[str]:
    """The architecture a ``random:<architecture>`` weights string names, or None for any other string.

    Random weights segment nothing: the preset exists so that speed and memory can be measured on
    the real architectures without downloading them.
    """
    value = (value or "").strip()
    if not value.startswith(RANDOM_PREFIX):
        return None
    architecture = value[len(RANDOM_PREFIX):]
    if architecture not in choices:
        raise MissingWeightsError(
            f"{config_key} = '{value}': there is no random architecture '{architecture}' for this model; "
            f"choose one of {', '.join(RANDOM_PREFIX + c for c in sorted(choices))}."
        )
    return architecture
