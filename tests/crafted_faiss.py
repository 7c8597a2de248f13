"""Crafted faiss index files for the bank tests: an index whose inverted lists live in a file it names."""
from pathlib import Path

import numpy as np


def mapped_files() -> str:
    """The files this process has mapped into memory (Linux's ``/proc/self/maps``)."""
    return Path("/proc/self/maps").read_text()


def on_disk_ivf(keys: np.ndarray, lists_file: Path):
    """An IndexIVFFlat over ``keys`` (n, d) whose inverted lists live in ``lists_file`` (faiss's
    OnDiskInvertedLists): the index file written from it stores that path, and ``faiss.read_index`` opens the
    file ("r+") and maps it read-write. Building it writes ``lists_file``."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(keys.shape[1]), keys.shape[1], 2, faiss.METRIC_INNER_PRODUCT)
    index.train(keys)
    index.add(keys)
    lists = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(lists_file))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(index.invlists)
    lists.merge_from_multiple(sources.data(), sources.size())
    index.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    return index
