"""A detectron2 checkpointer that loads only safe files and only exact matches.

* ``.pth`` files are read with ``torch.load(weights_only=True)``; pickled ``.pkl``
  and ``.pyth`` files are refused (unpickling runs arbitrary code).
* The checkpoint's model keys must be the model's own, with the same shapes:
  a checkpoint of another architecture raises ``CheckpointMismatchError`` naming
  the missing, unexpected and mis-shaped keys, instead of detectron2's warning and
  a half-loaded model. Frozen parts (Stable Diffusion, CLIP) are in neither, see
  ``diffseg_d2.modeling.frozen``.
"""
from __future__ import annotations

from typing import List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _strip_prefix_if_present


class CheckpointMismatchError(ValueError):
    """A checkpoint whose model keys are not the model's."""


def _listing(title: str, keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{title} ({len(keys)}): {shown}"


class StrictCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename: str):
        if filename.endswith((".pkl", ".pyth")):
            raise ValueError(
                f"{filename}: pickled checkpoints are not loaded (unpickling can run arbitrary code). "
                "Convert it to a .pth state dict, or to safetensors, with the tool that made it."
            )
        return super()._load_file(filename)

    def _torch_load(self, f: str):
        with PathManager.open(f, "rb") as fh:
            return torch.load(fh, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint):
        # DDP's "module." prefix goes exactly as fvcore's loader would take it off (only when every
        # key has it), so the keys checked here are the keys that get loaded.
        _strip_prefix_if_present(checkpoint["model"], "module.")
        state = checkpoint["model"]
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        reshaped = sorted(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in set(expected) & set(state)
            if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
        )
        if missing or unexpected or reshaped:
            parts = [_listing(t, ks) for t, ks in (
                ("missing from the checkpoint", missing), ("not in this model", unexpected),
                ("with other shapes (checkpoint vs model)", reshaped)) if ks]
            raise CheckpointMismatchError(
                f"The checkpoint does not fit {type(self.model).__name__}, so nothing was loaded. "
                + "; ".join(parts)
                + ". Was it written by another architecture or config (MODEL.META_ARCHITECTURE, head sizes, "
                "vocabulary)? Pass the matching --config-file, or MODEL.WEIGHTS of this model."
            )
        return super()._load_model(checkpoint)
