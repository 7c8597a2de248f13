"""The authors' released bank format: a faiss knn.index and one .npy prototype per key, numbered by
sorted file name. Written here by the test at the tiny models' sizes and read through FreeDA."""
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from crafted_faiss import mapped_files, on_disk_ivf  # tests/crafted_faiss.py

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.freeda import BankError
from diffseg_d2.freeda.bank import BankPathError
from diffseg_d2.freeda.released import ReleasedBank, load_bank
from diffseg_d2.pretrained.clip import OpenCLIP
from diffseg_d2.pretrained.dino import DenseDINO

M = 40


def write_released_bank(folder, key_dim, proto_dim, seed=0):
    import faiss

    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((M, key_dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    index = faiss.IndexHNSWFlat(key_dim, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(keys)
    (folder / "faiss_index").mkdir(parents=True)
    faiss.write_index(index, str(folder / "faiss_index" / "knn.index"))
    (folder / "prototype_embeddings").mkdir()
    protos = (rng.standard_normal((M, proto_dim)) * 3 + 1).astype(np.float32)  # raw, not normalised
    for i, p in enumerate(protos):
        np.save(folder / "prototype_embeddings" / f"img{i:04d}_noun.npy", p)
    return keys, protos


@pytest.fixture(scope="module")
def models(_session_cache):
    return OpenCLIP.from_weights("tiny", ["a photo of a {}."]), DenseDINO.from_weights("tiny")


@pytest.fixture
def released(tmp_path, models):
    clip, dino = models
    keys, protos = write_released_bank(tmp_path / "bank", clip.embed_dim, dino.embed_dim)
    return tmp_path / "bank", keys, protos


def test_the_class_prototype_is_the_plain_mean_of_the_retrieved_raw_prototypes(released):
    folder, keys, protos = released
    bank = load_bank(folder, top_k=5)
    assert isinstance(bank, ReleasedBank) and len(bank) == M
    queries = F.normalize(torch.randn(3, keys.shape[1]), dim=-1)
    got, best = bank.class_prototypes(queries, 5)
    exact = queries.numpy() @ keys.T
    for q in range(3):
        top = np.argsort(-exact[q])[:5]  # the HNSW search is exact at this size and breadth
        expected = F.normalize(torch.from_numpy(protos[top].mean(0)), dim=0)
        torch.testing.assert_close(got[q], expected, rtol=1e-5, atol=1e-6)
        assert abs(float(best[q]) - exact[q, top[0]]) < 1e-5


def test_freeda_segments_with_a_released_bank(released, tiny_freeda_cfg_path):
    folder, _, _ = released
    cfg = get_diffseg_cfg(tiny_freeda_cfg_path, ["MODEL.DIFFSEG.FREEDA.BANK", str(folder), "DATASETS.TEST", "()"])
    model = build_model(cfg).eval()
    out = model([{"image": torch.rand(3, 90, 120) * 255, "vocabulary": ["background", "dog", "sofa"]}])[0]["sem_seg"]
    assert out.shape == (3, 90, 120) and torch.isfinite(out).all()


def test_a_released_bank_that_does_not_fit_is_named(released, tmp_path):
    folder, _, _ = released
    protos = folder / "prototype_embeddings"
    os.remove(protos / "img0003_noun.npy")
    with pytest.raises(BankError, match=r"index holds 40 keys but 'prototype_embeddings/' has 39 prototype files"):
        load_bank(folder)
    np.save(protos / "img0003_noun.npy", np.zeros(3, np.float32))
    (protos / "notes.txt").write_text("x")
    with pytest.raises(BankError, match=r"not \.npy prototypes \(\['notes.txt'\]\)"):
        load_bank(folder)
    os.remove(protos / "notes.txt")
    bank = load_bank(folder)
    with pytest.raises(BankError, match="has 3 dimensions"):
        bank.class_prototypes(torch.eye(bank.key_dim)[:bank.key_dim], M)
    # A pickled object array is never unpickled; a link out of the bank is never followed.
    np.save(protos / "img0003_noun.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BankError, match="cannot be read as a .npy array"):
        bank.class_prototypes(torch.eye(bank.key_dim)[:bank.key_dim], M)
    outside = tmp_path / "outside.npy"
    np.save(outside, np.ones(bank.prototype_dim, np.float32))
    os.remove(protos / "img0003_noun.npy")
    os.symlink(outside, protos / "img0003_noun.npy")
    with pytest.raises(BankPathError, match="not a path inside the bank folder"):
        bank.class_prototypes(torch.eye(bank.key_dim)[:bank.key_dim], M)


def test_released_bank_needs_the_models_of_its_dimensions(released, models):
    folder, _, _ = released
    clip, dino = models
    bank = load_bank(folder)
    bank.check_models(clip, dino)
    bank._prototype_dim += 1
    with pytest.raises(BankError, match="DINOv2 of dimension .* MODEL.DIFFSEG.DINO.WEIGHTS"):
        bank.check_models(clip, dino)


# The index kinds a released bank may hold (the reference sets efSearch on an IndexHNSWFlat), both metrics.
ACCEPTED = {
    "HNSWFlat IP": lambda d: faiss_index("IndexHNSWFlat", d, 8, "METRIC_INNER_PRODUCT"),
    "HNSWFlat L2": lambda d: faiss_index("IndexHNSWFlat", d, 8),
    "FlatIP": lambda d: faiss_index("IndexFlatIP", d),
    "FlatL2": lambda d: faiss_index("IndexFlatL2", d),
}


def faiss_index(cls: str, *args):
    import faiss

    args = [getattr(faiss, a) if isinstance(a, str) else a for a in args]
    return getattr(faiss, cls)(*args)


@pytest.mark.parametrize("kind", list(ACCEPTED))
def test_a_released_index_of_an_accepted_kind_loads(tmp_path, models, kind):
    import faiss

    clip, dino = models
    folder = tmp_path / "bank"
    keys, _ = write_released_bank(folder, clip.embed_dim, dino.embed_dim)
    index = ACCEPTED[kind](clip.embed_dim)
    index.add(keys)
    faiss.write_index(index, str(folder / "faiss_index" / "knn.index"))
    bank = load_bank(folder)
    assert isinstance(bank, ReleasedBank) and bank.index.ntotal == M


@pytest.mark.parametrize("nested", [False, True], ids=["IVF index", "HNSW index whose storage is an IVF index"])
def test_a_released_index_with_on_disk_lists_is_refused_before_faiss_maps_the_file_it_names(released, tmp_path,
                                                                                            nested):
    """An index file with faiss's on-disk inverted lists names a file that faiss.read_index opens ("r+") and maps
    read-write; nested as an HNSW index's storage too. The loader reads the type tags first and refuses it."""
    import faiss

    folder, keys, _ = released
    target = tmp_path / "victim" / "lists.ivfdata"
    target.parent.mkdir()
    data = faiss.serialize_index(on_disk_ivf(keys, target)).tobytes()
    if nested:  # an HNSW index's bytes up to its storage, then the IVF index as that storage
        hnsw = faiss.IndexHNSWFlat(keys.shape[1], 8, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(keys)
        head = faiss.serialize_index(hnsw).tobytes()
        data = head[:head.index(b"IxFI")] + data
    index_file = folder / "faiss_index" / "knn.index"
    index_file.write_bytes(data)
    target.write_bytes(b"victim\n")
    direct = faiss.read_index(str(index_file))  # the hole, shown: faiss maps the file named inside the index
    assert str(target) in mapped_files() and direct.ntotal == M
    del direct
    found = ("IndexHNSWFlat, but its storage is IndexIVFFlat" if nested
             else "IndexIVFFlat, but its inverted lists are on-disk inverted lists")
    with pytest.raises(BankError, match=rf"(?s){index_file}.*{found}.*Accepted: IndexFlatIP"):
        load_bank(folder)
    assert str(target) not in mapped_files() and target.read_bytes() == b"victim\n"


def test_a_prototype_that_is_not_a_regular_file_is_refused_without_opening_it(released):
    """A FIFO named like a prototype would block np.load until something writes to it: refused unopened. (A
    helper thread opens the FIFO's other end whenever a reader waits, so that a reader fails instead of hanging.)"""
    folder, _, _ = released
    bank = load_bank(folder, top_k=5)
    fifo = folder / "prototype_embeddings" / "img0000_noun.npy"
    fifo.unlink()
    os.mkfifo(fifo)
    stop, readers = threading.Event(), []

    def release_readers():
        while not stop.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
                readers.append(1)
            except OSError:
                stop.wait(0.05)

    helper = threading.Thread(target=release_readers, daemon=True)
    helper.start()
    try:
        with pytest.raises(BankError, match=r"(?s)img0000_noun\.npy.*not a regular file"):
            bank.class_prototypes(torch.eye(bank.key_dim)[:bank.key_dim], M)
    finally:
        stop.set()
        helper.join()
    assert not readers, "the FIFO was opened"
