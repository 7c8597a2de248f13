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
checksums before reading anything and refuses a bank whose models differ from
the config's (a bank's keys only make sense with the CLIP that wrote them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

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


class BankError(ValueError):
    """A bank folder that cannot be used: unfinished, damaged, or built for other models."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


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


# ----------------------------------------------------------------------------- the bank
def finalize_bank(folder: Path, spec: dict, fingerprint: dict, num_shards: int, index_settings: dict) -> dict:
    """Index the keys of all shards and write the manifest; returns it.

    Called once every shard ``0 .. num_shards-1`` exists (by one process).
    """
    folder = Path(folder)
    keys, entries = [], []
    counts = {"captions": 0, "prototypes": 0, "captions_without_nouns": 0, "nouns_skipped": 0}
    for i in range(num_shards):
        path = folder / shard_name(i)
        shard = read_shard(path)
        keys.append(shard.keys.numpy())
        entries.append({
            "file": shard_name(i), "bytes": path.stat().st_size, "sha256": sha256_of(path),
            "prototypes": len(shard), "captions": list(shard.captions),
        })
        counts["captions"] += shard.captions[1] - shard.captions[0]
        counts["prototypes"] += len(shard)
        counts["captions_without_nouns"] += len(shard.captions_without_nouns)
        counts["nouns_skipped"] += shard.nouns_skipped
    if counts["prototypes"] == 0:
        raise BankError(
            f"The bank in {folder} has no prototypes: no caption gave a noun with a mask "
            f"({counts['captions_without_nouns']} of {counts['captions']} captions had no noun). "
            "Check the captions and MODEL.DIFFSEG.FREEDA.BUILD.NOUNS / NOUN_LIST."
        )
    all_keys = np.concatenate(keys)
    index, kind = build_index(all_keys, **index_settings)
    write_index(folder / INDEX_FILE, index)
    path = folder / INDEX_FILE
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
    write_json(folder / MANIFEST_FILE, manifest)
    logger.info("bank %s: %d prototypes from %d captions (%d without nouns), %s index",
                folder, counts["prototypes"], counts["captions"], counts["captions_without_nouns"], kind)
    return manifest


def check_file(folder: Path, entry: dict, what: str) -> Path:
    path = folder / entry["file"]
    advice = "Rerun tools/build_freeda_bank.py on this folder with --resume: it rebuilds what is damaged."
    if not path.is_file():
        raise BankError(f"The {what} {path} is missing. {advice}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise BankError(f"The {what} {path} is {size} bytes, the manifest says {entry['bytes']}: it is truncated "
                        f"or was replaced. {advice}")
    if sha256_of(path) != entry["sha256"]:
        raise BankError(f"The {what} {path} does not match its checksum in the manifest. {advice}")
    return path


def verify_bank_files(folder: Path) -> Optional[dict]:
    """The manifest of ``folder`` if the bank is finished and every file matches it, else None."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, "bank manifest")
        for entry in manifest["shards"]:
            check_file(Path(folder), entry, "bank shard")
        check_file(Path(folder), manifest["index"], "bank index")
    except (BankError, KeyError, TypeError) as e:
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
        """Read and verify a finished bank folder (``MODEL.DIFFSEG.FREEDA.BANK``)."""
        faiss = require("faiss", "faiss-cpu", "The FreeDA key index")
        if not str(folder or "").strip():
            raise BankError("MODEL.DIFFSEG.FREEDA.BANK is empty: build a bank with tools/build_freeda_bank.py "
                            "and set the key to its folder.")
        folder = Path(os.path.expanduser(str(folder)))
        if not folder.is_dir():
            raise BankError(f"MODEL.DIFFSEG.FREEDA.BANK = '{folder}' is not a folder. Build a bank with "
                            "tools/build_freeda_bank.py --output <folder> first.")
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            hint = ("its build was interrupted: rerun tools/build_freeda_bank.py with --resume"
                    if (folder / SPEC_FILE).is_file() else "it is not a bank folder")
            raise BankError(f"'{folder}' has no {MANIFEST_FILE}: {hint}.")
        manifest = read_json(manifest_path, "bank manifest")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise BankError(f"'{manifest_path}' is not a version-{VERSION} diffseg_d2 FreeDA bank manifest.")
        prototypes, nouns = [], []
        for entry in manifest["shards"]:
            shard = read_shard(check_file(folder, entry, "bank shard"))
            prototypes.append(shard.prototypes)
            nouns.extend(shard.nouns)
        index_path = check_file(folder, manifest["index"], "bank index")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise BankError(f"The bank index {index_path} cannot be read by faiss ({e}).") from e
        set_search_breadth(index, top_k, ef_search, nprobe)
        return cls(index, torch.cat(prototypes).float(), nouns, manifest)

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest keys: (Q, Dk) L2-normalised queries -> similarities and ids, each (Q, k').

        ``k' = min(k, len(bank))``; an index may return id -1 (and similarity -inf) where
        it found fewer than k' neighbours.
        """
        if queries.shape[-1] != self.key_dim:
            raise BankError(f"Queries have {queries.shape[-1]} dimensions, the bank's keys {self.key_dim}: "
                            "the bank was built with another CLIP model.")
        k = max(1, min(int(k), len(self)))
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        sims, ids = self.index.search(q, k)
        sims = torch.from_numpy(sims)
        ids = torch.from_numpy(ids)
        sims[ids < 0] = float("-inf")
        return sims, ids

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
