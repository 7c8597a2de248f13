"""A bank's manifest is data, not instructions: the reader and ``--resume`` use only files inside the bank
folder (no absolute names, no ``..``, no symbolic link leading out), never read, write or delete anything
else, and refuse a manifest whose counts differ from its shards and index, naming the entry that is wrong.

A manifest names only the files the builder writes (shards by their naming pattern, the index by its name), each a
regular file, and the index file must be one of the faiss types the builder writes, checked by its type tags before
faiss reads it (faiss would otherwise open and map whatever file an index with on-disk lists names).

Most tests build a small bank directly from random shards (no models: a second each); one runs the tool.
"""
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crafted_faiss import mapped_files, on_disk_ivf  # tests/crafted_faiss.py

from diffseg_d2.freeda import BankError, PrototypeBank
from diffseg_d2.freeda.bank import (
    MANIFEST_FILE,
    SPEC_FILE,
    Shard,
    finalize_bank,
    read_json,
    read_shard,
    sha256_of,
    shard_name,
    write_json,
    write_shard,
)
from diffseg_d2.freeda.builder import prepare_output

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "configs" / "tiny" / "freeda_captions.txt"
DK, DP = 8, 6
SPEC = {"models": {"clip": "tiny", "dino": "tiny"}, "captions": {"count": 9, "sha256": "0" * 64}}
FINGERPRINT = {"clip": [0.0] * 8, "clip_dim": DK, "dino": [0.0] * 8, "dino_dim": DP}
VICTIM_TEXT = "not the bank's to delete\n"


# ----------------------------------------------------------------------------- helpers
def small_bank(folder: Path) -> Path:
    """Three shards of 3 captions (rows 4, 2, 5; one caption without nouns, two skipped nouns), a flat index,
    the build record and the manifest: a finished bank as the builder leaves it."""
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((4, 2, 5)):
        write_shard(folder / shard_name(i), Shard(
            keys=F.normalize(torch.randn(n, DK, generator=g), dim=-1),
            prototypes=F.normalize(torch.randn(n, DP, generator=g), dim=-1),
            caption_index=torch.full((n,), 3 * i), seed=torch.full((n,), 3 * i), area=torch.full((n,), 0.5),
            nouns=[f"noun{i}-{j}" for j in range(n)], captions=(3 * i, 3 * i + 3),
            captions_without_nouns=[3 * i + 2] if i == 1 else [], nouns_skipped=2 if i == 2 else 0))
    write_json(folder / SPEC_FILE, {"spec": SPEC, "fingerprint": FINGERPRINT})
    finalize_bank(folder, SPEC, FINGERPRINT, 3, {"kind": "flat"})
    return folder


def edit_manifest(folder: Path, edit) -> None:
    manifest = read_json(folder / MANIFEST_FILE, "bank manifest")
    edit(manifest)
    write_json(folder / MANIFEST_FILE, manifest)


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim" / "victim.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(VICTIM_TEXT, encoding="utf-8")
    return path


def outside_shard(bank: Path, tmp_path: Path, index: int = 1) -> Path:
    """A byte-identical copy of one of the bank's shards, outside the bank (its checksum is valid)."""
    copy = tmp_path / "elsewhere" / f"copy-{index}.safetensors"
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(bank / shard_name(index), copy)
    return copy


def resume(folder: Path):
    """What ``tools/build_freeda_bank.py --resume`` does to the folder before it builds anything."""
    return prepare_output(folder, SPEC, FINGERPRINT, resume=True)


def resume_error(folder: Path) -> str:
    """The message of the ``BankError`` that ``resume(folder)`` raises ("" when it raises none), so that a
    test can look at what the resume did to the disk before it looks at the error."""
    try:
        resume(folder)
    except BankError as e:
        return str(e)
    return ""


# ----------------------------------------------------------------------------- (a) --resume deletes nothing outside
@pytest.mark.parametrize("name", ["relative", "absolute"])
def test_resume_never_deletes_a_file_outside_the_bank_that_the_manifest_names(tmp_path, name):
    bank = small_bank(tmp_path / "bank")
    target = victim(tmp_path)
    entry = "../victim/victim.txt" if name == "relative" else str(target)
    edit_manifest(bank, lambda m: m["shards"][1].update(file=entry))
    error = resume_error(bank)
    assert target.is_file() and target.read_text(encoding="utf-8") == VICTIM_TEXT, "--resume deleted the victim"
    assert (bank / MANIFEST_FILE).is_file() and (bank / shard_name(1)).is_file()  # nothing dropped on the way
    assert re.search(r"(?s)'shards\[1\]\.file'.*outside the bank folder.*--resume", error), error
    with pytest.raises(BankError, match=r"(?s)'shards\[1\]\.file'.*outside the bank folder"):
        PrototypeBank.load(bank)
    assert target.read_text(encoding="utf-8") == VICTIM_TEXT


def test_the_tool_with_resume_refuses_a_manifest_naming_a_file_outside_the_bank(freeda_bank, tiny_freeda_cfg_path,
                                                                                tmp_path, monkeypatch, capsys):
    """The report, end to end: ``--resume`` on a bank whose manifest names ``../victim/victim.txt``."""
    sys.path.insert(0, str(ROOT / "tools"))
    import build_freeda_bank

    bank = tmp_path / "bank"
    shutil.copytree(freeda_bank.path, bank)
    target = victim(tmp_path)
    edit_manifest(bank, lambda m: m["shards"][0].update(file="../victim/victim.txt"))
    monkeypatch.chdir(ROOT)
    code = build_freeda_bank.cli(["--config-file", str(tiny_freeda_cfg_path), "--captions", str(CAPTIONS),
                                  "--output", str(bank), "--no-progress", "--resume"])
    assert target.is_file() and target.read_text(encoding="utf-8") == VICTIM_TEXT, "--resume deleted the victim"
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"(?s)error: .*'shards\[0\]\.file'.*outside the bank folder", err), err


# ----------------------------------------------------------------------------- (b) the reader stays in the bank
@pytest.mark.parametrize("name", ["relative", "absolute"])
def test_load_refuses_a_valid_shard_outside_the_bank(tmp_path, name):
    bank = small_bank(tmp_path / "bank")
    copy = outside_shard(bank, tmp_path)
    entry = "../elsewhere/copy-1.safetensors" if name == "relative" else str(copy)
    edit_manifest(bank, lambda m: m["shards"][1].update(file=entry))
    assert (bank / entry).resolve() == copy.resolve() and sha256_of(copy) == read_json(
        bank / MANIFEST_FILE, "bank manifest")["shards"][1]["sha256"]  # it would pass every check but this one
    with pytest.raises(BankError, match=r"(?s)'shards\[1\]\.file'.*outside the bank folder"):
        PrototypeBank.load(bank)


def test_an_index_entry_outside_the_bank_is_refused(tmp_path):
    bank = small_bank(tmp_path / "bank")
    (tmp_path / "elsewhere").mkdir()
    shutil.copyfile(bank / "index.faiss", tmp_path / "elsewhere" / "index.faiss")
    edit_manifest(bank, lambda m: m["index"].update(file="../elsewhere/index.faiss"))
    with pytest.raises(BankError, match=r"(?s)'index\.file'.*outside the bank folder"):
        PrototypeBank.load(bank)


# ----------------------------------------------------------------------------- (c) symbolic links leading out
def test_a_shard_that_is_a_link_to_a_file_outside_the_bank_is_refused(tmp_path):
    bank = small_bank(tmp_path / "bank")
    copy = outside_shard(bank, tmp_path)
    link = bank / shard_name(1)
    link.unlink()
    link.symlink_to(copy)
    with pytest.raises(BankError, match=r"(?s)'shards\[1\]\.file'.*not a path inside the bank folder.*symbolic link"):
        PrototypeBank.load(bank)
    assert re.search("outside the bank folder", resume_error(bank))  # --resume does not vouch for it either
    assert copy.is_file() and link.is_symlink()


def test_resume_deletes_nothing_through_a_shard_folder_that_links_outside(tmp_path):
    """``shards`` a link to another folder: the damaged shard and the dot files there are not the bank's."""
    bank = small_bank(tmp_path / "bank")
    other = tmp_path / "elsewhere"
    shutil.move(str(bank / "shards"), other)
    (bank / "shards").symlink_to(other, target_is_directory=True)
    (other / ".profile").write_text(VICTIM_TEXT, encoding="utf-8")  # looks like a killed write's temporary file
    damaged = other / Path(shard_name(1)).name
    damaged.write_bytes(damaged.read_bytes()[:100])
    before = sorted(p.name for p in other.iterdir())
    error = resume_error(bank)
    assert sorted(p.name for p in other.iterdir()) == before, "--resume deleted files outside the bank"
    assert (other / ".profile").read_text(encoding="utf-8") == VICTIM_TEXT
    assert re.search(r"(?s)not a path inside the bank folder.*symbolic link", error), error
    with pytest.raises(BankError, match="outside the bank folder"):
        PrototypeBank.load(bank)


def test_a_link_that_stays_inside_the_bank_is_accepted(tmp_path):
    bank = small_bank(tmp_path / "bank")
    moved = bank / "shards" / "kept-elsewhere.safetensors"
    os.replace(bank / shard_name(1), moved)
    (bank / shard_name(1)).symlink_to(moved.name)
    assert len(PrototypeBank.load(bank)) == 11
    assert resume(bank) is not None  # intact: nothing to rebuild


# ----------------------------------------------------------------------------- (d) counts
def _set(path, value):
    def edit(m):
        *parents, last = path
        obj = m
        for p in parents:
            obj = obj[p]
        obj[last] = value(obj[last])
    return edit


COUNT_EDITS = {
    # entry named in the error: (where in the manifest, the edit)
    r"shards\[1\]\.prototypes": (("shards", 1, "prototypes"), lambda v: v + 1),
    r"shards\[2\]\.captions": (("shards", 2, "captions"), lambda v: [v[0], v[1] + 1]),
    r"counts\.prototypes": (("counts", "prototypes"), lambda v: v - 1),
    r"counts\.captions": (("counts", "captions"), lambda v: v + 3),
    r"counts\.captions_without_nouns": (("counts", "captions_without_nouns"), lambda v: v + 1),
    r"counts\.nouns_skipped": (("counts", "nouns_skipped"), lambda v: 0),
    r"index\.ntotal": (("index", "ntotal"), lambda v: v + 5),
    r"key_dim": (("key_dim",), lambda v: v * 2),
    r"spec\.captions\.count": (("spec", "captions", "count"), lambda v: v + 1),
}


@pytest.mark.parametrize("entry", list(COUNT_EDITS), ids=[k.replace("\\", "") for k in COUNT_EDITS])
def test_an_edited_count_is_refused_naming_the_entry_and_resume_rewrites_it(tmp_path, entry):
    bank = small_bank(tmp_path / "bank")
    original = read_json(bank / MANIFEST_FILE, "bank manifest")
    path, change = COUNT_EDITS[entry]
    edit_manifest(bank, _set(path, change))
    with pytest.raises(BankError, match=rf"(?s)'{entry}'.*says .*--resume") as info:
        PrototypeBank.load(bank)
    assert str(bank) in str(info.value)
    # --resume does what the message says: the shards are intact, only the manifest is rewritten
    shards = {i: sha256_of(bank / shard_name(i)) for i in range(3)}
    assert resume(bank) is None
    assert not (bank / MANIFEST_FILE).exists()
    assert {i: sha256_of(bank / shard_name(i)) for i in range(3)} == shards
    assert finalize_bank(bank, SPEC, FINGERPRINT, 3, {"kind": "flat"}) == original
    assert len(PrototypeBank.load(bank)) == 11


def test_a_manifest_missing_an_entry_says_which(tmp_path):
    bank = small_bank(tmp_path / "bank")
    edit_manifest(bank, lambda m: m["shards"][0].pop("prototypes"))
    with pytest.raises(BankError, match=r"(?s)'shards\[0\]\.prototypes' is missing"):
        PrototypeBank.load(bank)


def test_a_manifest_listing_a_shard_twice_is_refused_even_when_its_counts_add_up(tmp_path):
    """Each entry matches its file, and the counts are edited to match the entries: only the order of the
    caption ranges shows that shard 1 is listed where shard 2 belongs."""
    bank = small_bank(tmp_path / "bank")

    def list_shard_1_twice(m):
        m["shards"][2] = dict(m["shards"][1])
        m["counts"].update(prototypes=4 + 2 + 2, captions_without_nouns=2, nouns_skipped=0)

    edit_manifest(bank, list_shard_1_twice)
    with pytest.raises(BankError, match=r"(?s)'shards\[2\]\.captions' says \[3, 6\].*end at caption 6.*--resume"):
        PrototypeBank.load(bank)


# ------------------------------------------------------------------------- (e) entries name only the builder's files
def files_of(folder: Path) -> dict:
    """Every regular file under ``folder`` (links not followed) -> its bytes: what a test compares before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# A shard entry naming something the builder never writes as a shard: the bank's own records, the index, a folder.
NOT_A_SHARD = {
    "manifest": MANIFEST_FILE,
    "build record": SPEC_FILE,
    "index": "index.faiss",
    "bank folder": ".",
    "shard folder": "shards",
    "shard folder with a slash": "shards/",
    "a shard by another spelling": "shards/./shard-00001.safetensors",
}


@pytest.mark.parametrize("entry", list(NOT_A_SHARD.values()), ids=list(NOT_A_SHARD))
def test_resume_deletes_nothing_when_a_shard_entry_names_a_file_the_builder_does_not_write_as_a_shard(tmp_path, entry):
    bank = small_bank(tmp_path / "bank")
    edit_manifest(bank, lambda m: m["shards"][1].update(file=entry))
    before = files_of(bank)
    error = resume_error(bank)  # any other exception (IsADirectoryError, FileNotFoundError) fails the test
    assert files_of(bank) == before, "--resume deleted or changed a file of the bank"
    assert re.search(r"(?s)'shards\[1\]\.file'.*" + re.escape(repr(entry)), error), error
    with pytest.raises(BankError, match=r"(?s)'shards\[1\]\.file'"):
        PrototypeBank.load(bank)


@pytest.mark.parametrize("entry", [MANIFEST_FILE, SPEC_FILE, shard_name(0), ".", "./index.faiss"])
def test_an_index_entry_naming_another_file_than_the_index_is_refused_by_name(tmp_path, entry):
    bank = small_bank(tmp_path / "bank")
    edit_manifest(bank, lambda m: m["index"].update(file=entry))
    before = files_of(bank)
    with pytest.raises(BankError, match=r"(?s)'index\.file'.*" + re.escape(repr(entry))):
        PrototypeBank.load(bank)
    assert files_of(bank) == before


def test_a_folder_where_a_shard_belongs_is_refused_and_nothing_is_deleted(tmp_path):
    bank = small_bank(tmp_path / "bank")
    (bank / shard_name(1)).unlink()
    (bank / shard_name(1)).mkdir()
    (bank / shard_name(1) / "kept.txt").write_text(VICTIM_TEXT, encoding="utf-8")
    before = files_of(bank)
    error = resume_error(bank)
    assert files_of(bank) == before and (bank / shard_name(1)).is_dir()
    assert re.search(r"(?s)'shards\[1\]\.file'.*not a regular file", error), error
    with pytest.raises(BankError, match=r"(?s)'shards\[1\]\.file'.*not a regular file"):
        PrototypeBank.load(bank)


@pytest.mark.parametrize("record", [MANIFEST_FILE, SPEC_FILE, "index.faiss"])
def test_a_shard_that_is_a_link_to_one_of_the_banks_records_is_refused_and_the_record_kept(tmp_path, record):
    """A link inside the bank is fine (see above), but not one that makes a shard another of the bank's files:
    --resume would delete it as a damaged shard and then write a shard over it."""
    bank = small_bank(tmp_path / "bank")
    link = bank / shard_name(1)
    link.unlink()
    link.symlink_to(Path("..") / record)
    before = files_of(bank)
    error = resume_error(bank)
    assert files_of(bank) == before, "--resume deleted or changed one of the bank's records"
    assert re.search(rf"(?s)'shards\[1\]\.file'.*{re.escape(record)}", error), error
    with pytest.raises(BankError, match=r"(?s)'shards\[1\]\.file'"):
        PrototypeBank.load(bank)


def test_an_index_that_is_a_link_to_a_shard_is_refused(tmp_path):
    """The other way round: finalize_bank would write the index over the shard the link leads to."""
    bank = small_bank(tmp_path / "bank")
    (bank / "index.faiss").unlink()
    (bank / "index.faiss").symlink_to(shard_name(0))
    before = files_of(bank)
    with pytest.raises(BankError, match=r"(?s)'index\.file'.*'index\.faiss'.*symbolic link.*index\.faiss is a file "
                                        r"of its own"):
        PrototypeBank.load(bank)
    with pytest.raises(BankError, match=r"index\.faiss is a file of its own"):
        finalize_bank(bank, SPEC, FINGERPRINT, 3, {"kind": "flat"})
    assert files_of(bank) == before


def test_resume_deletes_only_the_temporary_files_of_a_killed_write(tmp_path):
    """Not every dot file in ``shards/``: only the names a killed atomic write leaves (``.<name>.<pid>.<hex><suffix>``),
    and never a folder."""
    bank = small_bank(tmp_path / "bank")
    shards = bank / "shards"
    leftover = shards / f".shard-00003.4242.{'a' * 32}.safetensors"
    leftover.write_bytes(b"half a shard")
    (shards / ".notes").write_text(VICTIM_TEXT, encoding="utf-8")
    (shards / ".cache").mkdir()
    (shards / ".cache" / "kept.txt").write_text(VICTIM_TEXT, encoding="utf-8")
    edit_manifest(bank, lambda m: m["counts"].update(prototypes=0))  # something to repair
    assert resume(bank) is None
    assert not leftover.exists()
    assert (shards / ".notes").read_text(encoding="utf-8") == VICTIM_TEXT
    assert (shards / ".cache" / "kept.txt").read_text(encoding="utf-8") == VICTIM_TEXT


# ----------------------------------------------------------------------------- (f) the index file's type
def test_an_index_with_on_disk_lists_naming_an_outside_file_is_refused_before_faiss_reads_it(tmp_path):
    """faiss.read_index would open the file named inside the index ("r+") and map it read-write (shown by the
    first assertions on a copy read directly); the bank refuses the index by its type tags before that."""
    import faiss

    bank = small_bank(tmp_path / "bank")
    target = victim(tmp_path)
    keys = np.concatenate([read_shard(bank / shard_name(i)).keys.numpy() for i in range(3)])
    crafted = tmp_path / "crafted.index"
    faiss.write_index(on_disk_ivf(keys, target), str(crafted))
    target.write_text(VICTIM_TEXT, encoding="utf-8")  # the lists' file is the victim again
    assert str(target).encode() in crafted.read_bytes()
    direct = faiss.read_index(str(crafted))  # the hole, shown: faiss maps the path stored in the file
    assert str(target) in mapped_files()
    del direct
    assert str(target) not in mapped_files()

    shutil.copyfile(crafted, bank / "index.faiss")
    edit_manifest(bank, lambda m: m["index"].update(bytes=crafted.stat().st_size, sha256=sha256_of(crafted)))
    with pytest.raises(BankError, match=r"(?s)index\.faiss.*IndexIVFFlat, but its inverted lists are on-disk "
                                        r"inverted lists.*Accepted: IndexFlatIP.*IndexHNSWFlat.*IndexIVFFlat") as info:
        PrototypeBank.load(bank)
    assert str(bank / "index.faiss") in str(info.value)
    assert str(target) not in mapped_files()
    assert target.read_text(encoding="utf-8") == VICTIM_TEXT
    # and when the named file does not exist, nothing creates it
    target.unlink()
    with pytest.raises(BankError, match="on-disk inverted lists"):
        PrototypeBank.load(bank)
    assert not target.exists()
    # --resume does what the message says: it keeps the shards and writes the index again from them
    assert resume(bank) is None
    finalize_bank(bank, SPEC, FINGERPRINT, 3, {"kind": "flat"})
    assert len(PrototypeBank.load(bank)) == 11 and not target.exists()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_every_index_kind_the_builder_writes_is_accepted(tmp_path, kind):
    bank = small_bank(tmp_path / "bank")
    (bank / MANIFEST_FILE).unlink()
    finalize_bank(bank, SPEC, FINGERPRINT, 3, {"kind": kind, "ivf_nlist": 2})
    loaded = PrototypeBank.load(bank)
    assert len(loaded) == 11 and loaded.manifest["index"]["type"] == kind


@pytest.mark.parametrize("layout", ["sparse lists", "array direct map", "hash table direct map", "L2 metric"])
def test_the_type_walk_follows_every_layout_of_an_ivf_flat_index(tmp_path, layout):
    """What faiss may write for an accepted kind is read whole: sparse inverted lists (most lists empty), the
    direct maps an IVF index may keep, either metric; the index read equals the one written."""
    import faiss

    from diffseg_d2.freeda.bank import read_faiss_index

    keys = F.normalize(torch.randn(300, DK, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    metric = faiss.METRIC_L2 if layout == "L2 metric" else faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatL2(DK) if layout == "L2 metric" else faiss.IndexFlatIP(DK)
    index = faiss.IndexIVFFlat(quantizer, DK, 16, metric)
    index.train(keys)
    if layout == "array direct map":
        index.make_direct_map()
    if layout == "hash table direct map":
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add(keys[:3] if layout == "sparse lists" else keys)
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    assert (b"sprs" in path.read_bytes()) == (layout == "sparse lists")
    read = read_faiss_index(path, "bank index")
    index.nprobe = read.nprobe = 16
    assert read.ntotal == index.ntotal
    np.testing.assert_array_equal(read.search(keys[:5], 3)[1], index.search(keys[:5], 3)[1])


@pytest.mark.parametrize("name", ["IndexIDMap", "IndexPQ", "IndexLSH", "IndexFlatL2 with trailing bytes", "truncated"])
def test_an_index_of_a_type_the_builder_never_writes_is_refused_naming_it(tmp_path, name):
    import faiss

    bank = small_bank(tmp_path / "bank")
    keys = np.concatenate([read_shard(bank / shard_name(i)).keys.numpy() for i in range(3)])
    if name == "IndexIDMap":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(DK))
        index.add_with_ids(keys, np.arange(len(keys)))
    elif name == "IndexPQ":
        index = faiss.IndexPQ(DK, 2, 2)
        index.train(keys)
        index.add(keys)
    elif name == "IndexLSH":
        index = faiss.IndexLSH(DK, 16)
        index.add(keys)
    else:
        index = faiss.IndexFlatL2(DK)
        index.add(keys)
    data = faiss.serialize_index(index).tobytes()
    data = data + b"\0" * 8 if "trailing" in name else data[:-4] if name == "truncated" else data
    (bank / "index.faiss").write_bytes(data)
    edit_manifest(bank, lambda m: m["index"].update(bytes=len(data), sha256=sha256_of(bank / "index.faiss")))
    expected = {"IndexIDMap": "IndexIDMap", "IndexPQ": "IndexPQ", "IndexLSH": "IndexLSH",
                "IndexFlatL2 with trailing bytes": "8 bytes after", "truncated": "ends early"}[name]
    with pytest.raises(BankError, match=rf"(?s)index\.faiss.*{expected}"):
        PrototypeBank.load(bank)
