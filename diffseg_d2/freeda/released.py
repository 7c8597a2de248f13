"""The FreeDA authors' released bank, read as their test-time code reads it.

The authors publish their offline stage's output as two downloads: a faiss index over the keys
(``faiss_index/knn.index`` once unzipped) and a folder of prototypes, one ``.npy`` file per key
(``prototype_embeddings/``). Row ``i`` of the index belongs to the ``i``-th file of that folder in
sorted name order. Point ``MODEL.DIFFSEG.FREEDA.BANK`` at the folder holding both.

Checked when loaded, as far as the format allows (it has no manifest): both parts exist, the
index is of a kind this package accepts (by its type tags, before faiss reads it: see
``read_faiss_index``) and reads, the folder holds only ``.npy`` files and exactly as many as the
index has keys, each file name stays inside the bank folder and is a regular file, the prototypes'
dimension is the same throughout what is read and matches DINOv2's, the keys' dimension matches
CLIP's. Prototypes are read when a class retrieves them (``np.load`` without pickles); like the
reference, a retrieved prototype that is not finite is left out of its class's mean.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..optional_imports import require
from .bank import BankError, bank_path, read_faiss_index, search_index, set_search_breadth

logger = logging.getLogger(__name__)

#: Where the index may lie in a released bank folder, and the prototypes' folder.
RELEASED_INDEX_NAMES = ("faiss_index/knn.index", "knn.index")
RELEASED_PROTOTYPE_DIR = "prototype_embeddings"


def released_bank_index(folder: Path) -> Optional[Path]:
    """The index file of a released bank in ``folder``, or None when it is not laid out as one."""
    if not (folder / RELEASED_PROTOTYPE_DIR).is_dir():
        return None
    for name in RELEASED_INDEX_NAMES:
        if (folder / name).is_file():
            return bank_path(folder, name, "released bank's index")
    return None


class ReleasedBank:
    """A released-format bank: faiss index + one ``.npy`` prototype per key (see the module docstring).

    Args:
        folder: the bank folder.
        index: the faiss index over the ``(M, Dk)`` keys.
        files: the M prototype file names, sorted (row ``i`` of the index is ``files[i]``).
        prototype_dim: the prototypes' dimension (read from the first file).
    """

    def __init__(self, folder: Path, index, files: List[str], prototype_dim: int):
        if index.ntotal != len(files):
            raise BankError(
                f"The released bank '{folder}' does not fit together: its index holds {index.ntotal} keys but "
                f"'{RELEASED_PROTOTYPE_DIR}/' has {len(files)} prototype files. Download and unpack both parts "
                "again (the index and the prototype embeddings of the same release)."
            )
        self.folder = folder
        self.index = index
        self.files = files
        self._prototype_dim = int(prototype_dim)
        self.manifest = {"format": "released", "counts": {"prototypes": len(files)}}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def key_dim(self) -> int:
        return int(self.index.d)

    @property
    def prototype_dim(self) -> int:
        return self._prototype_dim

    @classmethod
    def load(cls, folder, *, top_k: int = 350, ef_search: int = 50000, nprobe: int = 16) -> "ReleasedBank":
        require("faiss", "faiss-cpu", "FreeDA's prototype bank")
        folder = Path(os.path.expanduser(str(folder)))
        index_path = released_bank_index(folder)
        if index_path is None:
            raise BankError(
                f"'{folder}' is not a released FreeDA bank: it needs '{RELEASED_PROTOTYPE_DIR}/' (the unpacked "
                f"prototype embeddings) and one of {list(RELEASED_INDEX_NAMES)} (the unzipped faiss index)."
            )
        try:
            index = read_faiss_index(index_path, "released bank's index")
        except BankError as e:
            raise BankError(f"{e} A released bank's index is the authors' faiss_index/knn.index: download and "
                            "unzip it again.") from e
        proto_dir = bank_path(folder, RELEASED_PROTOTYPE_DIR, "released bank's prototype folder")
        names = sorted(os.listdir(proto_dir))
        others = [n for n in names if not n.endswith(".npy")]
        if others:
            raise BankError(
                f"'{proto_dir}' holds files that are not .npy prototypes ({others[:5]}{' ...' if len(others) > 5 else ''}); "
                "the reference numbers the prototypes by their sorted file names, so any other file would "
                "shift them. Move those files elsewhere."
            )
        if not names:
            raise BankError(f"'{proto_dir}' holds no .npy prototypes: unpack the prototype embeddings into it.")
        first = cls._read(folder, names[0])
        set_search_breadth(index, top_k, ef_search, nprobe)
        logger.info("released FreeDA bank %s: %d prototypes of %d, keys of %d", folder, len(names), first.shape[-1],
                    index.d)
        return cls(folder, index, names, first.shape[-1])

    @staticmethod
    def _read(folder: Path, name: str) -> np.ndarray:
        path = bank_path(folder, f"{RELEASED_PROTOTYPE_DIR}/{name}", "prototype file")
        if not path.is_file():  # a folder, or a FIFO that would block np.load for ever
            raise BankError(f"The prototype file '{path}' is missing or not a regular file: unpack the prototype "
                            "embeddings again, so that the folder holds one .npy file per key.")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BankError(f"The prototype file '{path}' cannot be read as a .npy array ({e}); unpack the "
                            "prototype embeddings again.") from e
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1:
            raise BankError(f"The prototype file '{path}' holds an array of shape {array.shape}, not one vector.")
        return array.astype(np.float32)

    def check_models(self, clip, dino) -> None:
        """Refuse CLIP or DINOv2 models whose dimensions do not fit the released keys and prototypes."""
        for name, key, have, want in (("CLIP", "MODEL.DIFFSEG.CLIP.WEIGHTS", clip.embed_dim, self.key_dim),
                                      ("DINOv2", "MODEL.DIFFSEG.DINO.WEIGHTS", dino.embed_dim, self.prototype_dim)):
            if have != want:
                raise BankError(
                    f"The released bank '{self.folder}' was made with a {name} of dimension {want}, but {key} gives "
                    f"{have}. The authors' bank needs the reference models (configs/freeda/Base-FreeDA.yaml)."
                )

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest keys: (Q, Dk) L2-normalised queries -> similarities and ids, each (Q, k')."""
        return search_index(self.index, queries, k, "use the reference CLIP (configs/freeda/Base-FreeDA.yaml)")

    def class_prototypes(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The plain mean of each query's retrieved prototypes (finite ones), L2-normalised ``(Q, Dp)``,
        and the best key similarity ``(Q,)``."""
        sims, ids = self.search(queries, k)
        out = torch.zeros(len(ids), self.prototype_dim)
        for q, row in enumerate(ids.tolist()):
            vectors = []
            for i in row:
                if i < 0:
                    break
                vector = self._read(self.folder, self.files[i])
                if vector.shape[0] != self.prototype_dim:
                    raise BankError(f"The prototype file '{self.files[i]}' has {vector.shape[0]} dimensions, the "
                                    f"bank's first file {self.prototype_dim}: the prototype folder mixes releases.")
                if np.isfinite(vector).all():
                    vectors.append(vector)
            if not vectors:
                raise BankError(f"None of the prototypes retrieved for query {q} of the released bank is finite.")
            out[q] = torch.from_numpy(np.stack(vectors).mean(0))
        return F.normalize(out, dim=-1), sims[:, 0]


def load_bank(folder, *, top_k: int = 350, ef_search: int = 50000, nprobe: int = 16):
    """``MODEL.DIFFSEG.FREEDA.BANK``: a bank built by tools/build_freeda_bank.py (it has a manifest),
    or the authors' released bank; a ``PrototypeBank`` or a ``ReleasedBank``."""
    from .bank import MANIFEST_FILE, PrototypeBank

    path = Path(os.path.expanduser(str(folder or "")))
    if str(folder or "").strip() and path.is_dir() and not (path / MANIFEST_FILE).exists() \
            and released_bank_index(path) is not None:
        return ReleasedBank.load(path, top_k=top_k, ef_search=ef_search, nprobe=nprobe)
    return PrototypeBank.load(folder, top_k=top_k, ef_search=ef_search, nprobe=nprobe)
