"""detectron2 checkpointers that load only safe files (``SafeCheckpointer``), and only exact
matches (``StrictCheckpointer``).

* ``.pth`` files are read with ``torch.load(weights_only=True)``; pickled ``.pkl``
  and ``.pyth`` files are refused (unpickling runs arbitrary code). The same checks
  guard every other checkpointer: see ``diffseg_d2.checkpoint_safety``.
* The checkpoint's model keys must be the model's own, with the same shapes:
  a checkpoint of another architecture raises ``CheckpointMismatchError`` naming
  the missing, unexpected and mis-shaped keys, instead of detectron2's warning and
  a half-loaded model. Frozen parts (Stable Diffusion, CLIP) are in neither, see
  ``diffseg_d2.pretrained.frozen``.
"""
from __future__ import annotations

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _strip_prefix_if_present

from ..checkpoint_safety import CheckpointMismatchError, check_checkpoint_file, require_fit

__all__ = ["CheckpointMismatchError", "SafeCheckpointer", "StrictCheckpointer"]


class SafeCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, but every file it reads (``MODEL.WEIGHTS``, the file that
    ``--resume`` finds in ``last_checkpoint``, a download) is checked by ``check_checkpoint_file``
    first and read with ``torch.load(weights_only=True)``: a pickle is refused, never opened.

    ``_load_file`` is where detectron2 reads the final local path, after the query is taken off and
    a URL is downloaded, so this one check covers every route of ``load`` and ``resume_or_load``.
    """

    def _load_file(self, filename: str):
        check_checkpoint_file(filename, "the checkpoint")
        return super()._load_file(filename)

    def _torch_load(self, f: str):
        with PathManager.open(f, "rb") as fh:
            return torch.load(fh, map_location=torch.device("cpu"), weights_only=True)

    @classmethod
    def like(cls, checkpointer: DetectionCheckpointer) -> "SafeCheckpointer":
        """A ``cls`` with ``checkpointer``'s model, folder and checkpointables (to replace the
        ``DetectionCheckpointer`` that ``DefaultTrainer.__init__`` makes)."""
        return cls(checkpointer.model, checkpointer.save_dir, save_to_disk=checkpointer.save_to_disk,
                   **checkpointer.checkpointables)


class StrictCheckpointer(SafeCheckpointer):

    def _load_model(self, checkpoint):
        # DDP's "module." prefix goes exactly as fvcore's loader would take it off (only when every
        # key has it), so the keys checked here are the keys that get loaded. Checked here, before
        # fvcore drops mis-shaped keys, so the error can name their shapes.
        _strip_prefix_if_present(checkpoint["model"], "module.")
        require_fit(self.model, checkpoint["model"].items())
        return super()._load_model(checkpoint)
