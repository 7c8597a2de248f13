"""The FreeDA prototype bank on disk: shards, a faiss index over the keys, a manifest.

A bank is a folder::

    build.json                  what is being built (models, settings, captions): written first
    shards/shard-00000.safetensors  keys (n, Dk), prototypes (n, Dp), caption/seed/area per row,
                                the nouns and the caption counts in the file's metadata
    index.faiss                 nearest-neighbour index over all keys, rows in shard order
    manifest.json               written last: build.json's spec, shard and index sizes and
                                sha256, counts. A folder without it is an unfinished build.

Every file is written atomically (temporary name, then rename), so a killed
build leaves only whole files behind. ``PrototypeBank.load`` checks sizes and
checksums before reading anything, and every count of the manifest against the
shards and the index, and refuses a bank whose models differ from the config's
(a bank's keys only make sense with the CLIP that wrote them).

A manifest is data that anyone may edit or copy, never a list of files to trust:
every path the reader or the builder opens, writes or deletes comes from
``bank_path``, which refuses whatever leads outside the bank folder or, under
another name, to one of the bank's records; a manifest entry may only name
what the builder writes there (``manifest_file``). An index file is read by
faiss only once its type tags show one of the kinds the builder writes
(``read_faiss_index``): faiss itself reads any kind, including indexes whose
inverted lists live in another file that the index names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..optional_imports import require
from ..paths import write_atomically

logger = logging.getLogger(__name__)

FORMAT = "diffseg_d2.freeda_bank"
VERSION = 1
SPEC_FILE = "build.json"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SHARD_DIR = "shards"
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
# The bank's records: no other name of the bank may lead to one of them (a link named like a shard would
# have --resume delete the record as a damaged shard and write a shard over it).
RECORD_FILES = (SPEC_FILE, MANIFEST_FILE, INDEX_FILE)
# The only names a manifest's shard entries may hold: those ``shard_name`` gives.
SHARD_FILE_PATTERN = re.compile(rf"{SHARD_DIR}/shard-[0-9]{{5,}}\.safetensors")


# What fixes a manifest that does not match its files (build_bank rewrites the manifest from intact shards).
REWRITE_MANIFEST = ("Rerun tools/build_freeda_bank.py on this folder with --resume: it keeps the intact shards and "
                    "writes the manifest again from them.")


class BankError(ValueError):
    """A bank folder that cannot be used: unfinished, damaged, or built for other models."""


class BankPathError(BankError):
    """A path of a bank (named by its manifest, or a link in its folder) that is not one of the bank's own files:
    it leads outside the bank folder or to another of its records, it is not a name the builder writes, or it is
    not a regular file. ``--resume`` stops on it instead of deleting what the path names."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def bank_path(folder, name, what: str) -> Path:
    """The file or folder ``name`` of the bank in ``folder``, refusing any name that leads outside it.

    The one containment check of a bank: the reader and ``--resume`` read, write and delete only paths
    that come from here, so an edited manifest (``../x``, ``/etc/passwd``) or a symbolic link inside the
    bank pointing elsewhere can never make them touch a file that is not the bank's.

    Args:
        folder: the bank folder (it may itself be, or lie under, a symbolic link).
        name: a relative path as the manifest writes it, e.g. ``shards/shard-00000.safetensors``.
        what: what names the path, for the error, e.g. ``"manifest entry 'shards[1].file'"``.

    Returns:
        The path with symbolic links resolved, strictly inside the resolved ``folder``; one of the bank's
        records (``RECORD_FILES``) exactly when ``name`` is that record's own name.

    Raises:
        BankPathError: ``name`` is not a relative path, it resolves outside ``folder``, it leads (through a
            link) to a record of the bank that it does not name, or it names a record that is a link.
    """
    root = Path(folder).resolve()
    link = False
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        reason = "it is not a file name"
    elif Path(name).is_absolute():
        reason = "it is an absolute path"
    else:
        try:
            path = (root / name).resolve()
        except (OSError, RuntimeError) as e:  # a loop of links: RuntimeError before Python 3.13
            path, reason = None, f"it cannot be resolved ({e})"
        if path is not None:
            link = Path(os.path.normpath(root / name)).is_relative_to(root)
            # A record is a file of its own under its own name, never reached through a link from another name,
            # nor a link to another of the bank's files (or --resume would delete or write over one for the other).
            # "./manifest.json" is the manifest's own name.
            record = next((r for r in RECORD_FILES if (path == root / r) != (os.path.normpath(name) == r)), None)
            if record is not None:
                raise BankPathError(
                    f"The {what}, {name!r}, leads to '{path}' through a symbolic link, but a bank's {record} is a "
                    f"file of its own under that name only, so nothing was read, written or deleted through the "
                    "link. Remove the link and rerun tools/build_freeda_bank.py on this folder with --resume to "
                    "rebuild what it held."
                )
            if path != root and path.is_relative_to(root):
                return path
            if path == root and os.path.normpath(name) == ".":
                link, reason = False, "it names the bank folder itself, not a file in it"
            else:
                reason = f"it leads to '{path}'" + (" through a symbolic link" if link else "")
    if link:
        advice = ("Replace the link with the file itself, or remove the link and rerun tools/build_freeda_bank.py "
                  "on this folder with --resume to rebuild what it held.")
    else:
        advice = (f"The manifest was edited or copied from elsewhere: restore this bank's own {MANIFEST_FILE}, or "
                  "delete it and rerun tools/build_freeda_bank.py on this folder with --resume, which writes it "
                  "again from the intact shards.")
    raise BankPathError(
        f"The {what}, {name!r}, is not a path inside the bank folder '{root}': {reason}. A bank uses only its "
        f"own files, so nothing outside the bank folder was read or deleted. {advice}"
    )


def sha256_of(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankError(f"The {what} {path} cannot be read ({e}).") from e


# ----------------------------------------------------------------------------- shards
@dataclass
class Shard:
    """Rows of one shard. Tensors are float32 / int64 on CPU.

    Attributes:
        keys: (n, Dk) L2-normalised CLIP text embeddings of each noun in its caption.
        prototypes: (n, Dp) L2-normalised DINOv2 features pooled in each noun's mask.
        caption_index: (n,) index of the caption in the captions file.
        seed: (n,) seed of the generated image.
        area: (n,) mask area as a fraction of the image.
        nouns: n noun strings as they appear in the caption.
        captions: ``[start, stop)`` caption range the shard covers.
        captions_without_nouns: caption indices that had no noun (skipped).
        nouns_skipped: nouns that got no row (an empty mask, or cut off by a model's context).
    """

    keys: torch.Tensor
    prototypes: torch.Tensor
    caption_index: torch.Tensor
    seed: torch.Tensor
    area: torch.Tensor
    nouns: List[str]
    captions: Tuple[int, int]
    captions_without_nouns: List[int]
    nouns_skipped: int = 0

    def __len__(self) -> int:
        return len(self.nouns)


def write_shard(path: Path, shard: Shard) -> None:
    """Save a shard atomically as safetensors (tensors + JSON metadata)."""
    st = require("safetensors.torch", "safetensors", "Writing bank shards")
    tensors = {
        "keys": shard.keys.float().contiguous(),
        "prototypes": shard.prototypes.float().contiguous(),
        "caption_index": shard.caption_index.long().contiguous(),
        "seed": shard.seed.long().contiguous(),
        "area": shard.area.float().contiguous(),
    }
    # One metadata entry with sorted keys: safetensors does not keep the order of several,
    # and equal shards must be equal bytes (the manifest's checksums compare builds).
    metadata = {"diffseg_d2": json.dumps({
        "nouns": shard.nouns,
        "captions": list(shard.captions),
        "captions_without_nouns": shard.captions_without_nouns,
        "nouns_skipped": int(shard.nouns_skipped),
    }, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        st.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates private files; a bank is ordinary shared data

    write_atomically(path, save)


def read_shard(path: Path) -> Shard:
    """Load a shard; a truncated or malformed file raises ``BankError``."""
    safetensors = require("safetensors", "safetensors", "Reading bank shards")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["diffseg_d2"])
            t = {k: f.get_tensor(k) for k in ("keys", "prototypes", "caption_index", "seed", "area")}
        shard = Shard(
            keys=t["keys"],
            prototypes=t["prototypes"],
            caption_index=t["caption_index"],
            seed=t["seed"],
            area=t["area"],
            nouns=list(meta["nouns"]),
            captions=tuple(meta["captions"]),
            captions_without_nouns=list(meta["captions_without_nouns"]),
            nouns_skipped=int(meta["nouns_skipped"]),
        )
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise BankError(f"The bank shard {path} is damaged or not a shard ({type(e).__name__}: {e}).") from e
    n = len(shard.nouns)
    if any(len(x) != n for x in (shard.keys, shard.prototypes, shard.caption_index, shard.seed, shard.area)):
        raise BankError(f"The bank shard {path} is inconsistent: its tensors and nouns differ in length.")
    return shard


# ----------------------------------------------------------------------------- index
def build_index(keys: np.ndarray, kind: str = "auto", *, exact_up_to: int = 200000, hnsw_m: int = 32,
                hnsw_ef_construction: int = 200, ivf_nlist: int = 0, seed: int = 0):
    """A faiss inner-product index over L2-normalised keys (inner product = cosine).

    Args:
        keys: (n, Dk) float32.
        kind: "flat" (exact), "hnsw", "ivf", or "auto" (flat up to ``exact_up_to`` keys, else HNSW).
        ivf_nlist: IVF lists; 0 = 4 * sqrt(n), at most n.

    Returns:
        ``(index, kind)`` with the kind actually built.
    """
    faiss = require("faiss", "faiss-cpu", "The FreeDA key index")
    if kind not in INDEX_TYPES:
        raise ValueError(f"MODEL.DIFFSEG.FREEDA.BUILD.INDEX must be one of {INDEX_TYPES}, not {kind!r}.")
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, dim = keys.shape
    if kind == "auto":
        kind = "flat" if n <= exact_up_to else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(hnsw_ef_construction)
    else:
        nlist = int(ivf_nlist) or int(4 * math.sqrt(max(n, 1)))
        nlist = max(1, min(nlist, n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        index.train(keys)
    index.add(keys)
    return index, kind


def write_index(path: Path, index) -> None:
    faiss = require("faiss", "faiss-cpu", "The FreeDA key index")
    write_atomically(path, lambda tmp: faiss.write_index(index, tmp))


def set_search_breadth(index, top_k: int, ef_search: int, nprobe: int) -> None:
    """Search settings of an index read from disk: HNSW efSearch >= top_k, IVF nprobe."""
    faiss = require("faiss", "faiss-cpu", "The FreeDA key index")
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = max(int(ef_search), int(top_k))
    if hasattr(inner, "nprobe"):
        inner.nprobe = max(1, int(nprobe))


# ----------------------------------------------------------------------------- the index file's kind
# faiss.read_index reads any kind of index, and some name other files that it then opens: an IVF index whose
# inverted lists are faiss's OnDiskInvertedLists ("ilod") stores a path that it opens read-write and maps into
# memory (a search then reads that file as vectors, or the process dies of SIGBUS past its end). So the file's
# structure is walked first, by its four-byte type tags (faiss's index_write.cpp), and only the kinds that
# ``build_index`` writes, and the released FreeDA bank's HNSW, are handed to faiss.
FLAT_TAGS = {b"IxFI": "IndexFlatIP", b"IxF2": "IndexFlatL2"}
INDEX_TAGS = {**FLAT_TAGS, b"IHNf": "IndexHNSWFlat", b"IwFl": "IndexIVFFlat"}
ARRAY_LISTS_TAG = b"ilar"
ACCEPTED_INDEXES = ("IndexFlatIP, IndexFlatL2, IndexHNSWFlat (storage flat), IndexIVFFlat (quantizer flat, "
                    "inverted lists in the index file)")
# What a refused tag is, to name it (the rest of faiss's tags are shown as they are).
OTHER_TAGS = {b"ilod": "on-disk inverted lists, OnDiskInvertedLists", b"il00": "no inverted lists",
              b"IxMp": "IndexIDMap", b"IxM2": "IndexIDMap2", b"IxPT": "IndexPreTransform", b"IxPq": "IndexPQ",
              b"IxSQ": "IndexScalarQuantizer", b"IxHe": "IndexLSH", b"IwPQ": "IndexIVFPQ",
              b"IwSq": "IndexIVFScalarQuantizer", b"IxRF": "IndexRefine", b"IHNp": "IndexHNSWPQ",
              b"IHNs": "IndexHNSWSQ", b"null": "no index"}


class _IndexFileError(Exception):
    """What is wrong with an index file's structure (``read_faiss_index`` turns it into a ``BankError``)."""


class _IndexFileReader:
    """Reads the fields of a faiss index file in order, never past its end (little-endian, as faiss writes them
    on the x86 and ARM machines it runs on)."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise _IndexFileError(f"it ends early, at byte {self.size} (truncated)")
        return data

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:  # a damaged count cannot send a seek past the end
            raise _IndexFileError(f"it ends early, at byte {self.size} (truncated, or a length field is damaged)")
        self.f.seek(n, os.SEEK_CUR)

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def vector(self, itemsize: int) -> None:
        """A faiss vector (a 64-bit count, then the items): skipped."""
        self.skip(self.u64() * itemsize)

    def header(self) -> None:
        """An index's common fields: d, ntotal, two unused, is_trained, metric (and its argument beyond L2)."""
        self.take(4 + 8 + 16 + 1)
        metric = struct.unpack("<i", self.take(4))[0]
        if metric > 1:
            self.take(4)

    def index(self, accepted: Dict[bytes, str], place: str) -> str:
        """One index of the ``accepted`` kinds at the current position (``place`` names it); its description."""
        tag = self.take(4)
        if tag not in accepted:
            raise _IndexFileError(f"{place} is {_tag_name(tag)}")
        try:
            return self._index_body(tag, accepted[tag])
        except _IndexFileError as e:
            raise _IndexFileError(f"{place} is an {accepted[tag]}, but {e}") from None

    def _index_body(self, tag: bytes, name: str) -> str:
        self.header()
        if tag in FLAT_TAGS:
            self.vector(4)  # the vectors, counted in 4-byte words
            return name
        if tag == b"IHNf":
            for itemsize in (8, 4, 4, 8, 4):  # level probabilities, cumulated neighbours, levels, offsets, neighbours
                self.vector(itemsize)
            self.take(5 * 4)  # entry point, max level, efConstruction, efSearch, an unused field
            return f"{name} (storage {self.index(FLAT_TAGS, 'its storage')})"
        self.take(16)  # nlist, nprobe
        quantizer = self.index(FLAT_TAGS, "its quantizer")
        direct_map = self.take(1)[0]
        self.vector(8)
        if direct_map == 2:  # a hash table direct map: (id, id) pairs
            self.vector(16)
        self.array_lists()
        return f"{name} (quantizer {quantizer}, inverted lists in the index file)"

    def array_lists(self) -> None:
        """An IVF index's inverted lists, which must be faiss's ArrayInvertedLists (held in the file itself)."""
        tag = self.take(4)
        if tag != ARRAY_LISTS_TAG:
            raise _IndexFileError(f"its inverted lists are {_tag_name(tag)}")
        self.take(8)  # nlist
        code_size = self.u64()
        layout = self.take(4)
        count = self.u64()
        if layout not in (b"full", b"sprs") or count * 8 > self.size:
            raise _IndexFileError("its inverted lists' sizes are damaged")
        sizes = struct.unpack(f"<{count}Q", self.take(8 * count))
        rows = sum(sizes) if layout == b"full" else sum(sizes[1::2])  # sparse: (list, size) pairs
        self.skip(rows * (code_size + 8))  # codes and 64-bit ids


def _tag_name(tag: bytes) -> str:
    name = OTHER_TAGS.get(tag) or INDEX_TAGS.get(tag)
    return f"{name} (type tag {tag!r})" if name else f"of faiss type tag {tag!r}"


def read_faiss_index(path: Path, what: str):
    """``faiss.read_index`` of ``path`` once its structure shows one of the kinds a bank may hold.

    The file is walked by its type tags and lengths without faiss: an ``IndexFlatIP`` / ``IndexFlatL2``, an
    ``IndexHNSWFlat`` over a flat storage, or an ``IndexIVFFlat`` with a flat quantizer and its inverted lists
    in the file (faiss's ``ArrayInvertedLists``), and nothing after it. faiss then reads the same open file, so
    what it reads is what was checked.

    Args:
        path: the index file.
        what: what it is, for the errors, e.g. ``"bank index"``.

    Raises:
        BankError: the file is of another kind (named, with the kinds accepted), damaged, or unreadable.
    """
    faiss = require("faiss", "faiss-cpu", "The FreeDA key index")
    if not Path(path).is_file():  # a folder, or a FIFO that would block the open
        raise BankError(f"The {what} '{path}' is missing or not a regular file.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            reader = _IndexFileReader(f, size)
            try:
                kind = reader.index(INDEX_TAGS, "the index")
                if f.tell() != size:
                    raise _IndexFileError(f"it has {size - f.tell()} bytes after the index")
            except _IndexFileError as e:
                raise BankError(
                    f"The {what} '{path}' is not an index this package reads: {e}. Accepted: {ACCEPTED_INDEXES}. "
                    "faiss was not given the file (some kinds make faiss open other files that the index names). "
                    "Use an index that tools/build_freeda_bank.py wrote (rerun it on the bank with --resume: it "
                    "writes the index again from the shards) or the released bank's own."
                ) from None
            f.seek(0)
            logger.debug("%s %s: %s", what, path, kind)
            return faiss.read_index(faiss.PyCallbackIOReader(f.read))
    except OSError as e:
        raise BankError(f"The {what} '{path}' cannot be opened ({e}).") from e
    except RuntimeError as e:
        raise BankError(f"The {what} '{path}' cannot be read by faiss ({e}).") from e


# ----------------------------------------------------------------------------- the bank
# The manifest's ``counts``, each summed over the shards.
COUNTS = ("captions", "prototypes", "captions_without_nouns", "nouns_skipped")


def shard_counts(shard: Shard) -> dict:
    """One shard's share of each of the manifest's ``COUNTS``."""
    return {"captions": shard.captions[1] - shard.captions[0], "prototypes": len(shard),
            "captions_without_nouns": len(shard.captions_without_nouns), "nouns_skipped": shard.nouns_skipped}


def finalize_bank(folder: Path, spec: dict, fingerprint: dict, num_shards: int, index_settings: dict) -> dict:
    """Index the keys of all shards and write the manifest; returns it.

    Called once every shard ``0 .. num_shards-1`` exists (by one process).
    """
    folder = Path(folder)
    keys, entries = [], []
    counts = dict.fromkeys(COUNTS, 0)
    for i in range(num_shards):
        path = bank_path(folder, shard_name(i), "bank shard")
        shard = read_shard(path)
        keys.append(shard.keys.numpy())
        entries.append({
            "file": shard_name(i), "bytes": path.stat().st_size, "sha256": sha256_of(path),
            "prototypes": len(shard), "captions": list(shard.captions),
        })
        counts = {k: counts[k] + v for k, v in shard_counts(shard).items()}
    if counts["prototypes"] == 0:
        raise BankError(
            f"The bank in {folder} has no prototypes: no caption gave a noun with a mask "
            f"({counts['captions_without_nouns']} of {counts['captions']} captions had no noun). "
            "Check the captions and MODEL.DIFFSEG.FREEDA.BUILD.NOUNS / NOUN_LIST."
        )
    all_keys = np.concatenate(keys)
    index, kind = build_index(all_keys, **index_settings)
    path = bank_path(folder, INDEX_FILE, "bank index")
    write_index(path, index)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "fingerprint": fingerprint,
        "shards": entries,
        "index": {"file": INDEX_FILE, "type": kind, "bytes": path.stat().st_size, "sha256": sha256_of(path),
                  "ntotal": int(index.ntotal)},
        "counts": counts,
        "key_dim": int(all_keys.shape[1]),
    }
    write_json(bank_path(folder, MANIFEST_FILE, "bank manifest"), manifest)
    logger.info("bank %s: %d prototypes from %d captions (%d without nouns), %s index",
                folder, counts["prototypes"], counts["captions"], counts["captions_without_nouns"], kind)
    return manifest


def manifest_entry(container, key, name: str, folder, kind: Optional[type] = None):
    """``container[key]`` of the manifest of the bank in ``folder``; ``name`` (``shards[1].bytes``) is its place."""
    try:
        value = container[key]
    except (KeyError, IndexError, TypeError):
        raise BankError(f"The manifest of the bank '{folder}' is damaged: its entry '{name}' is missing. "
                        f"{REWRITE_MANIFEST}") from None
    if kind is not None and not isinstance(value, kind):
        raise BankError(f"The manifest of the bank '{folder}' is damaged: its entry '{name}' is {value!r}, not a "
                        f"{kind.__name__}. {REWRITE_MANIFEST}")
    return value


def manifest_mismatch(folder, name: str, recorded, found: str) -> BankError:
    """The error for a manifest entry ``name`` whose value ``recorded`` is not what the files hold (``found``)."""
    return BankError(
        f"The manifest of the bank '{folder}' does not match its files: its entry '{name}' says {recorded!r}, but "
        f"{found}. The manifest was edited or belongs to other files. {REWRITE_MANIFEST}"
    )


def manifest_file(folder: Path, entry: dict, name: str) -> Path:
    """The file that the manifest entry ``name`` (``shards[1]``, ``index``) names, resolved inside the bank.

    An entry may only name what ``finalize_bank`` writes: the index entry ``INDEX_FILE``, a shard entry a name
    of ``shard_name``'s pattern (spelt as it writes it, so no ``.``, ``..`` or doubled slash) that stays in the
    shard folder once links are followed; and what it names, if it exists, must be a regular file. So neither
    the reader nor ``--resume``, which deletes a shard that fails its checks, ever takes the manifest, the build
    record, the index or a folder for a shard.

    Raises:
        BankPathError: the entry names anything else (the message names the entry); see also ``bank_path``.
    """
    value = manifest_entry(entry, "file", f"{name}.file", folder)
    what = f"manifest entry '{name}.file'"
    path = bank_path(folder, value, what)  # first: a path outside the bank is named as such
    is_index = name == "index"
    expected = f"'{INDEX_FILE}'" if is_index else f"'{SHARD_DIR}/shard-NNNNN.safetensors' (5 or more digits)"
    if not (value == INDEX_FILE if is_index else SHARD_FILE_PATTERN.fullmatch(value)):
        raise BankPathError(
            f"The {what} of the bank '{folder}' is {value!r}, but a bank's manifest names only the files its builder "
            f"writes there, here {expected}: it was edited or is damaged, so nothing it names was read or deleted. "
            f"Restore this bank's own {MANIFEST_FILE}, or delete it and rerun tools/build_freeda_bank.py on this "
            "folder with --resume, which writes it again from the intact shards."
        )
    if not is_index and not path.is_relative_to(bank_path(folder, SHARD_DIR, "bank shard folder")):
        raise BankPathError(
            f"The {what} of the bank '{folder}', {value!r}, leads to '{path}' through a symbolic link, outside the "
            f"bank's shard folder: a shard is a file of '{SHARD_DIR}/', so nothing was read or deleted through it. "
            "Replace the link with the shard itself, or remove it and rerun tools/build_freeda_bank.py on this "
            "folder with --resume to rebuild the shard."
        )
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "a special file"
        raise BankPathError(
            f"The {what} of the bank '{folder}', {value!r}, is {kind}, not a regular file: nothing in it was read or "
            f"deleted. Move '{path}' out of the bank folder; then rerun tools/build_freeda_bank.py on this folder "
            "with --resume to rebuild what belongs there."
        )
    return path


def check_file(folder: Path, path: Path, entry: dict, name: str, what: str) -> None:
    """Raise ``BankError`` unless ``path`` has the size and sha256 that the manifest entry ``name`` records."""
    advice = "Rerun tools/build_freeda_bank.py on this folder with --resume: it rebuilds what is damaged."
    size = manifest_entry(entry, "bytes", f"{name}.bytes", folder)
    sha256 = manifest_entry(entry, "sha256", f"{name}.sha256", folder)
    if not path.is_file():
        raise BankError(f"The {what} {path} is missing. {advice}")
    if path.stat().st_size != size:
        raise BankError(f"The {what} {path} is {path.stat().st_size} bytes, the manifest says {size}: it is "
                        f"truncated or was replaced. {advice}")
    if sha256_of(path) != sha256:
        raise BankError(f"The {what} {path} does not match its checksum in the manifest. {advice}")


def read_bank(folder) -> Tuple[dict, object, torch.Tensor, List[str]]:
    """Read a finished bank, checking every file and every count of its manifest against the files.

    Only paths inside ``folder`` are read (``bank_path``). Besides sizes and checksums, each shard's
    row count and caption range must be its entry's, the ranges must follow each other from caption 0,
    the manifest's ``counts`` (and its spec's caption count) must be the shards' sums, and the index
    must hold one key of ``key_dim`` dimensions per row.

    Returns:
        ``(manifest, index, prototypes, nouns)``: the faiss index over the ``(M, Dk)`` keys, the
        ``(M, Dp)`` float32 prototypes and the M nouns, rows in shard order.

    Raises:
        BankPathError: the manifest names a path outside ``folder``, or a link in it leads out.
        BankError: the manifest is not a bank's, a file is missing or damaged, or a count is wrong.
    """
    require("faiss", "faiss-cpu", "The FreeDA key index")  # before any shard is read
    folder = Path(folder)
    manifest_path = bank_path(folder, MANIFEST_FILE, "bank manifest")
    manifest = read_json(manifest_path, "bank manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BankError(f"'{manifest_path}' is not a version-{VERSION} diffseg_d2 FreeDA bank manifest.")
    key_dim = manifest_entry(manifest, "key_dim", "key_dim", folder)
    prototypes, nouns, totals, stop = [], [], dict.fromkeys(COUNTS, 0), 0
    for i, entry in enumerate(manifest_entry(manifest, "shards", "shards", folder, list)):
        name = f"shards[{i}]"
        path = manifest_file(folder, entry, name)
        check_file(folder, path, entry, name, "bank shard")
        shard = read_shard(path)
        rows = manifest_entry(entry, "prototypes", f"{name}.prototypes", folder)
        if rows != len(shard):
            raise manifest_mismatch(folder, f"{name}.prototypes", rows, f"{path} holds {len(shard)} rows")
        captions = manifest_entry(entry, "captions", f"{name}.captions", folder)
        if captions != list(shard.captions):
            raise manifest_mismatch(folder, f"{name}.captions", captions,
                                    f"{path} covers captions {list(shard.captions)}")
        if shard.captions[0] != stop:
            raise manifest_mismatch(folder, f"{name}.captions", captions, f"the shards before it end at caption "
                                    f"{stop} (the shards cover the captions in order, each once)")
        dim = shard.keys.shape[1] if shard.keys.dim() == 2 else None
        if dim != key_dim:
            raise manifest_mismatch(folder, "key_dim", key_dim, f"the keys in {path} have {dim} dimensions")
        stop = shard.captions[1]
        totals = {k: totals[k] + v for k, v in shard_counts(shard).items()}
        prototypes.append(shard.prototypes)
        nouns.extend(shard.nouns)
    counts = manifest_entry(manifest, "counts", "counts", folder, dict)
    for key in COUNTS:
        recorded = manifest_entry(counts, key, f"counts.{key}", folder)
        if recorded != totals[key]:
            raise manifest_mismatch(folder, f"counts.{key}", recorded, f"the shards add up to {totals[key]}")
    spec = manifest.get("spec")
    spec_captions = spec.get("captions") if isinstance(spec, dict) else None
    if isinstance(spec_captions, dict) and spec_captions.get("count") != totals["captions"]:
        raise manifest_mismatch(folder, "spec.captions.count", spec_captions.get("count"),
                                f"the shards cover {totals['captions']} captions")

    index_entry = manifest_entry(manifest, "index", "index", folder, dict)
    index_path = manifest_file(folder, index_entry, "index")
    check_file(folder, index_path, index_entry, "index", "bank index")
    index = read_faiss_index(index_path, "bank index")
    ntotal = manifest_entry(index_entry, "ntotal", "index.ntotal", folder)
    if ntotal != index.ntotal:
        raise manifest_mismatch(folder, "index.ntotal", ntotal, f"{index_path} holds {index.ntotal} keys")
    if index.ntotal != totals["prototypes"]:
        raise manifest_mismatch(folder, "index.ntotal", ntotal,
                                f"the shards hold {totals['prototypes']} rows, each with one key in the index")
    if index.d != key_dim:
        raise manifest_mismatch(folder, "key_dim", key_dim, f"{index_path} holds keys of {index.d} dimensions")
    prototypes = torch.cat(prototypes).float() if prototypes else torch.zeros(0, 0)
    return manifest, index, prototypes, nouns


def verify_bank_files(folder: Path) -> Optional[dict]:
    """The manifest of ``folder`` if the bank is finished and every file and count matches it, else None.

    Raises:
        BankPathError: the bank names a path outside its folder. Repairing it (``--resume``) would
            delete what the manifest names, so it must stop here.
    """
    if not bank_path(folder, MANIFEST_FILE, "bank manifest").is_file():
        return None
    try:
        manifest = read_bank(folder)[0]
    except BankPathError:
        raise
    except BankError as e:
        logger.warning("the finished bank in %s needs repair: %s", folder, e)
        return None
    return manifest


# ----------------------------------------------------------------------------- compatibility
# A bank's keys are CLIP text embeddings and its prototypes DINOv2 features: they only mean
# something to the same two models. Besides their weights strings, the bank records a few
# numbers each model computes from fixed inputs, so a folder whose weights changed is caught too.
_PROBE_TEXT, _PROBE_WORD = "a photo of a dog on a sofa.", "dog"
_FINGERPRINT_TOLERANCE = 2e-2


@torch.no_grad()
def model_fingerprint(clip, dino) -> dict:
    """Eight numbers from each model on fixed inputs: CLIP ``clip`` and DINOv2 ``dino``."""
    key = clip.encode_words_in_context([_PROBE_TEXT], [_PROBE_WORD])[0]
    side = 4 * dino.patch_size
    ramp = torch.linspace(0, 255, side)
    image = torch.stack([ramp[None, :].expand(side, side), ramp[:, None].expand(side, side),
                         torch.full((side, side), 127.0)])[None]
    feat = F.normalize(dino(image).mean((2, 3)), dim=-1)[0]
    return {
        "clip": [round(float(v), 4) for v in key[:8]], "clip_dim": int(key.shape[0]),
        "dino": [round(float(v), 4) for v in feat[:8]], "dino_dim": int(feat.shape[0]),
    }


def check_fingerprint(recorded: dict, current: dict, what: str) -> None:
    """Raise ``BankError`` when ``recorded`` (from a bank) and ``current`` models differ."""
    for name, key in (("CLIP", "clip"), ("DINOv2", "dino")):
        a, b = recorded.get(key), current.get(key)
        same = (a is not None and b is not None and recorded.get(f"{key}_dim") == current.get(f"{key}_dim")
                and len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= _FINGERPRINT_TOLERANCE)
        if not same:
            raise BankError(
                f"The {name} model of the config is not the one {what} was built with (their outputs on a fixed "
                f"probe differ). Use the {name} weights the bank was built with, or build a new bank."
            )


def check_bank_models(manifest: dict, models: dict, fingerprint: dict, folder) -> None:
    """Refuse a bank built with other CLIP or DINOv2 weights than ``models`` (config strings)."""
    built = manifest.get("spec", {}).get("models", {})
    for key, config_key in (("clip", "MODEL.DIFFSEG.CLIP.WEIGHTS"), ("dino", "MODEL.DIFFSEG.DINO.WEIGHTS")):
        if built.get(key) != models.get(key):
            raise BankError(
                f"The bank '{folder}' was built with {config_key} = '{built.get(key)}', but the config has "
                f"'{models.get(key)}'. Set {config_key} to the bank's model, or build a bank with this one "
                "(tools/build_freeda_bank.py)."
            )
    check_fingerprint(manifest.get("fingerprint", {}), fingerprint, f"the bank '{folder}'")


#: ``MODEL.DIFFSEG.FREEDA.INDEX_DEVICE`` values.
INDEX_DEVICES = ("auto", "cpu")


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is a GPU build with a usable GPU (``pip install diffseg_d2[faiss-gpu]``)."""
    faiss = require("faiss", "faiss-cpu", "FreeDA's bank index")
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def index_on_device(index, device: str, choice: str = "auto"):
    """The index a bank searches with: with ``choice`` "auto", a copy on the model's GPU when ``device`` is a
    CUDA device and faiss is a GPU build, for the kinds faiss searches on a GPU (flat and IVF-flat; it has no
    GPU HNSW); otherwise, and with "cpu", ``index`` itself. A GPU copy returns what the CPU index returns
    (``tools/gpu_check.sh``, step faiss-gpu), at most float rounding in the similarities."""
    if choice not in INDEX_DEVICES:
        raise ValueError(f"MODEL.DIFFSEG.FREEDA.INDEX_DEVICE must be one of {list(INDEX_DEVICES)}, not {choice!r}.")
    target = torch.device(device)
    if choice == "cpu" or target.type != "cuda" or not faiss_has_gpu():
        return index
    faiss = require("faiss", "faiss-cpu", "FreeDA's bank index")
    inner = faiss.downcast_index(index)
    if not isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        logger.info("FreeDA: a %s index searches on the CPU (faiss has no GPU version of it).", type(inner).__name__)
        return index
    resources = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(resources, target.index or 0, index)
    # The resources must live as long as the index (faiss's own attribute for objects an index holds on to).
    gpu.referenced_objects = [*(getattr(gpu, "referenced_objects", None) or []), resources]
    if isinstance(inner, faiss.IndexIVFFlat):
        faiss.downcast_index(gpu).nprobe = inner.nprobe
    return gpu


def search_index(index, queries: torch.Tensor, k: int, other_clip: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest keys of a bank's faiss index: (Q, Dk) L2-normalised queries -> similarities and ids,
    each (Q, k') with ``k' = min(k, keys)``; id -1 (similarity -inf) where fewer were found.

    Args:
        other_clip: what the error says when the queries' dimension is not the keys'.
    """
    if queries.shape[-1] != index.d:
        raise BankError(f"Queries have {queries.shape[-1]} dimensions, the bank's keys {index.d}: {other_clip}.")
    k = max(1, min(int(k), index.ntotal))
    sims, ids = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
    sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
    sims[ids < 0] = float("-inf")
    return sims, ids


class PrototypeBank:
    """A loaded bank: the faiss index over keys and the prototypes, row-aligned.

    Args:
        index: faiss index over the ``(M, Dk)`` keys.
        prototypes: ``(M, Dp)`` float32, L2-normalised.
        nouns: the M nouns.
        manifest: the bank's manifest (``spec`` says which models built it).
    """

    def __init__(self, index, prototypes: torch.Tensor, nouns: Sequence[str], manifest: dict):
        if index.ntotal != len(prototypes):
            raise BankError(f"The bank's index holds {index.ntotal} keys but it has {len(prototypes)} prototypes.")
        self.index = index
        self.prototypes = prototypes
        self.nouns = list(nouns)
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.prototypes)

    def check_models(self, clip, dino) -> None:
        """Refuse a CLIP or DINOv2 other than the ones that built this bank (their fingerprints)."""
        check_fingerprint(self.manifest.get("fingerprint", {}), model_fingerprint(clip, dino), "this bank")

    @property
    def spec(self) -> dict:
        return self.manifest.get("spec", {})

    @property
    def key_dim(self) -> int:
        return int(self.index.d)

    @property
    def prototype_dim(self) -> int:
        return int(self.prototypes.shape[1])

    @classmethod
    def load(cls, folder, *, top_k: int = 350, ef_search: int = 512, nprobe: int = 16) -> "PrototypeBank":
        """Read and verify a finished bank folder (``MODEL.DIFFSEG.FREEDA.BANK``); see ``read_bank``."""
        if not str(folder or "").strip():
            raise BankError("MODEL.DIFFSEG.FREEDA.BANK is empty: build a bank with tools/build_freeda_bank.py "
                            "and set the key to its folder.")
        folder = Path(os.path.expanduser(str(folder)))
        if not folder.is_dir():
            raise BankError(f"MODEL.DIFFSEG.FREEDA.BANK = '{folder}' is not a folder. Build a bank with "
                            "tools/build_freeda_bank.py --output <folder> first.")
        if not bank_path(folder, MANIFEST_FILE, "bank manifest").is_file():
            hint = ("its build was interrupted: rerun tools/build_freeda_bank.py with --resume"
                    if (folder / SPEC_FILE).is_file() else "it is not a bank folder")
            raise BankError(f"'{folder}' has no {MANIFEST_FILE}: {hint}.")
        manifest, index, prototypes, nouns = read_bank(folder)
        set_search_breadth(index, top_k, ef_search, nprobe)
        return cls(index, prototypes, nouns, manifest)

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest keys: (Q, Dk) L2-normalised queries -> similarities and ids, each (Q, k').

        ``k' = min(k, len(bank))``; an index may return id -1 (and similarity -inf) where
        it found fewer than k' neighbours.
        """
        return search_index(self.index, queries, k, "the bank was built with another CLIP model")

    def class_prototypes(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean of the prototypes of each query's ``k`` nearest keys.

        Args:
            queries: (Q, Dk) L2-normalised.

        Returns:
            prototypes (Q, Dp) L2-normalised, and the best key similarity (Q,)
            (how close the bank came to each query).
        """
        sims, ids = self.search(queries, k)
        valid = (ids >= 0).float()
        weights = valid / valid.sum(1, keepdim=True).clamp(min=1)
        # A weighted bag sum reads each prototype once; gathering a (Q, k, Dp) copy first was
        # 20-50x slower (BENCHMARKS.md, retrieval).
        mean = F.embedding_bag(ids.clamp(min=0), self.prototypes, per_sample_weights=weights, mode="sum")
        return F.normalize(mean, dim=-1), sims[:, 0]
