"""FreeDA's prototype bank: the build tool end to end, an interrupted build and its resume, several
processes, refusals of folders and banks that do not fit, retrieval, superpixel pooling, nouns, captions.

The bank built once by tools/build_freeda_bank.py (the ``freeda_bank`` fixture of conftest.py) is the
reference the other builds are compared with.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg_d2.freeda import BankError, CaptionsError, PrototypeBank, read_captions
from diffseg_d2.freeda.bank import (
    INDEX_FILE,
    MANIFEST_FILE,
    SPEC_FILE,
    Shard,
    build_index,
    finalize_bank,
    read_json,
    read_shard,
    set_search_breadth,
    sha256_of,
    shard_name,
    write_shard,
)
from diffseg_d2.freeda.builder import PrototypeBankBuilder, prepare_output
from diffseg_d2.nouns import ListNouns, build_noun_extractor
from diffseg_d2.freeda.superpixels import felzenszwalb_superpixels, pool_features, pooling_matrix
from diffseg_d2.tiling import sliding_windows

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "build_freeda_bank.py"
CAPTIONS = ROOT / "configs" / "tiny" / "freeda_captions.txt"
NOUN_LIST = ROOT / "configs" / "tiny" / "freeda_nouns.txt"
NO_NOUN_CAPTION = "the sky is clear today"
SHARDS = [shard_name(i) for i in range(3)]  # 12 captions in shards of 4 (configs/tiny/freeda.yaml)

sys.path.insert(0, str(ROOT / "tools"))
import build_freeda_bank  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def tool_args(cfg_path, output, *opts, captions=CAPTIONS, resume=False):
    args = ["--config-file", str(cfg_path), "--captions", str(captions), "--output", str(output), "--no-progress"]
    return args + (["--resume"] if resume else []) + [str(o) for o in opts]


# Every build runs on one CPU thread: builds are compared bit for bit and float results depend on the
# number of threads (the conftest fixture's reference bank is built so too); tiny models gain nothing from
# more threads, and several processes on a small machine would only fight over its cores.
def tool_env():
    """Read when called: the session fixture points DIFFSEG_D2_CACHE at its temporary cache first."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_tool(args, timeout=600):
    """The tool in a subprocess from the repository root (the tiny config's NOUN_LIST is relative to it)."""
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT,
                          env=tool_env(), timeout=timeout)


def run_tool_here(args, monkeypatch):
    """The tool's ``cli`` in this process (no interpreter start-up), on one thread: ``(exit code, stderr)``."""
    monkeypatch.chdir(ROOT)
    err = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err):
            code = build_freeda_bank.cli(args)
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue()


def file_states(folder):
    """``{relative path: (inode, mtime_ns, sha256)}`` of every file under ``folder``."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (st.st_ino, st.st_mtime_ns, sha256_of(p))
    return out


def copy_bank(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def bank_contents(folder):
    """Everything a bank holds, read shard by shard through its manifest."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_FILE, "bank manifest")
    shards = [read_shard(folder / e["file"]) for e in manifest["shards"]]

    def cat(name):
        return torch.cat([getattr(s, name) for s in shards])

    return {
        "files": [e["file"] for e in manifest["shards"]],
        "nouns": [n for s in shards for n in s.nouns],
        "keys": cat("keys"), "prototypes": cat("prototypes"), "caption_index": cat("caption_index"),
        "seed": cat("seed"), "area": cat("area"),
        "captions": [tuple(s.captions) for s in shards],
        "captions_without_nouns": [s.captions_without_nouns for s in shards],
        "nouns_skipped": [s.nouns_skipped for s in shards],
        "counts": manifest["counts"], "spec": manifest["spec"], "fingerprint": manifest["fingerprint"],
        "index_type": manifest["index"]["type"], "index": (folder / INDEX_FILE).read_bytes(),
    }


def assert_same_bank(folder, reference):
    """Same rows, same index, same manifest counts and spec as ``reference``."""
    a, b = bank_contents(folder), bank_contents(reference)
    for k in ("files", "nouns", "captions", "captions_without_nouns", "nouns_skipped", "counts", "spec",
              "fingerprint", "index_type"):
        assert a[k] == b[k], k
    for k in ("keys", "prototypes", "caption_index", "seed", "area"):
        assert torch.equal(a[k], b[k]), k
    assert a["index"] == b["index"], "index.faiss differs"


def assert_same_shard_files(folder, reference):
    """The manifests list byte-identical shards (same sizes and sha256), as equal builds should write."""
    a = read_json(Path(folder) / MANIFEST_FILE, "bank manifest")
    b = read_json(Path(reference) / MANIFEST_FILE, "bank manifest")
    assert a["index"]["sha256"] == b["index"]["sha256"]
    assert [(e["file"], e["sha256"]) for e in a["shards"]] == [(e["file"], e["sha256"]) for e in b["shards"]], (
        "the shards hold the same rows but are not the same bytes (see "
        "test_writing_the_same_shard_twice_gives_the_same_bytes)")


# ----------------------------------------------------------------------------- 1. a whole build
def test_the_tool_builds_a_complete_bank_from_the_tiny_config(freeda_bank):
    folder = freeda_bank.path
    captions = read_captions(CAPTIONS)
    nouns_of = ListNouns.from_file(NOUN_LIST)
    manifest = read_json(folder / MANIFEST_FILE, "bank manifest")
    counts = manifest["counts"]

    # counts: every caption is accounted for; the one without a noun is skipped and counted
    assert counts["captions"] == len(captions) == 12
    assert [i for i, c in enumerate(captions) if not nouns_of(c)] == [captions.index(NO_NOUN_CAPTION)]
    assert counts["captions_without_nouns"] == 1
    assert counts["prototypes"] > 0
    assert counts["prototypes"] + counts["nouns_skipped"] == sum(len(nouns_of(c)) for c in captions)

    # files: three shards, the index, the build record and the manifest, nothing else (no temporary files)
    assert sorted(os.listdir(folder)) == sorted([SPEC_FILE, MANIFEST_FILE, INDEX_FILE, "shards"])
    assert sorted(os.listdir(folder / "shards")) == [Path(s).name for s in SHARDS]
    assert [e["file"] for e in manifest["shards"]] == SHARDS
    assert [e["captions"] for e in manifest["shards"]] == [[0, 4], [4, 8], [8, 12]]
    for entry in manifest["shards"] + [manifest["index"]]:
        path = folder / entry["file"]
        assert path.stat().st_size == entry["bytes"] and sha256_of(path) == entry["sha256"], entry["file"]

    # what it was built from: the build record written first is the manifest's spec
    record = read_json(folder / SPEC_FILE, "bank build record")
    assert record["spec"] == manifest["spec"] and record["fingerprint"] == manifest["fingerprint"]
    spec = manifest["spec"]
    assert {k: spec["models"][k] for k in ("sd", "clip", "dino")} == {"sd": "tiny", "clip": "tiny", "dino": "tiny"}
    assert spec["build"]["steps"] == 10 and spec["build"]["shard_size"] == 4 and spec["build"]["image_size"] == 128
    assert spec["captions"] == {"count": 12, "sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest()}
    assert spec["nouns"]["source"] == "list"

    # rows: nouns of their caption, in caption order, seeded SEED + caption index
    rows = bank_contents(folder)
    n = counts["prototypes"]
    assert len(rows["nouns"]) == n and rows["keys"].shape[0] == rows["prototypes"].shape[0] == n
    cap = rows["caption_index"].tolist()
    assert cap == sorted(cap) and captions.index(NO_NOUN_CAPTION) not in cap
    assert rows["captions_without_nouns"] == [[], [], [captions.index(NO_NOUN_CAPTION)]]
    for c in sorted(set(cap)):
        found = [noun for noun, i in zip(rows["nouns"], cap) if i == c]
        expected = nouns_of(captions[c])
        assert found == [e for e in expected if e in found], (captions[c], found)  # an ordered subset
        if counts["nouns_skipped"] == 0:
            assert found == expected
    assert torch.equal(rows["seed"], rows["caption_index"] + spec["build"]["seed"])
    assert ((rows["area"] > 0) & (rows["area"] <= 1)).all()
    torch.testing.assert_close(rows["keys"].norm(dim=1), torch.ones(n))
    torch.testing.assert_close(rows["prototypes"].norm(dim=1), torch.ones(n))

    # the loaded bank is those rows, and its index holds the keys in shard order
    bank = PrototypeBank.load(folder)
    assert len(bank) == n == bank.index.ntotal == manifest["index"]["ntotal"]
    assert bank.nouns == rows["nouns"] and torch.equal(bank.prototypes, rows["prototypes"])
    assert bank.key_dim == manifest["key_dim"] == rows["keys"].shape[1]
    assert manifest["index"]["type"] == "flat"  # "auto" on a small bank
    np.testing.assert_array_equal(bank.index.reconstruct_n(0, n), rows["keys"].numpy())
    sims, ids = bank.search(rows["keys"], 1)  # each key finds itself
    assert ids[:, 0].tolist() == list(range(n))

    # the user is told where the bank is and how to use it
    assert str(folder) in freeda_bank.stdout and "MODEL.DIFFSEG.FREEDA.BANK" in freeda_bank.stdout


def test_a_finished_bank_is_not_rebuilt(freeda_bank, tmp_path):
    """Pointing the build at a folder that already holds this bank, intact, is a no-op."""
    folder = copy_bank(freeda_bank.path, tmp_path / "bank")
    before = file_states(folder)
    record = read_json(folder / SPEC_FILE, "bank build record")
    for resume in (False, True):
        manifest = prepare_output(folder, record["spec"], record["fingerprint"], resume)
        assert manifest == read_json(folder / MANIFEST_FILE, "bank manifest")
    assert file_states(folder) == before


def test_writing_the_same_shard_twice_gives_the_same_bytes(freeda_bank, tmp_path):
    """Equal builds must write equal files: the manifest's checksums are how banks are compared.

    safetensors keeps its metadata in a hash map whose order changes from one save to the next, so
    ``write_shard`` with four metadata keys writes the same rows in different bytes.
    """
    shard = read_shard(freeda_bank.path / SHARDS[0])
    digests = set()
    for i in range(6):
        path = tmp_path / f"copy-{i}.safetensors"
        write_shard(path, shard)
        again = read_shard(path)
        assert again.nouns == shard.nouns and torch.equal(again.keys, shard.keys)  # the rows survive
        digests.add(sha256_of(path))
    assert len(digests) == 1, f"one shard written 6 times gave {len(digests)} different files"


def test_shards_are_as_readable_as_the_other_bank_files(freeda_bank):
    """A bank is often built once and read by others: whoever may read its manifest may read its shards
    (safetensors alone creates private 0600 files)."""
    folder = freeda_bank.path
    readable = stat.S_IMODE((folder / MANIFEST_FILE).stat().st_mode) & 0o444
    for name in SHARDS + [INDEX_FILE]:
        mode = stat.S_IMODE((folder / name).stat().st_mode)
        assert mode & readable == readable, (name, oct(mode))


# ----------------------------------------------------------------------------- 2. killed, then resumed
@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_bank(freeda_bank, tiny_freeda_cfg_path, tmp_path, monkeypatch):
    out = tmp_path / "bank"
    first = out / SHARDS[0]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(TOOL), *tool_args(tiny_freeda_cfg_path, out)], cwd=ROOT,
                                env=tool_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    log_text = (tmp_path / "log.txt").read_text()[-3000:]
    # the precondition: killed mid-build, with a shard written and the bank unfinished
    assert proc.returncode == -signal.SIGKILL, log_text
    assert first.is_file() and (out / SPEC_FILE).is_file() and not (out / MANIFEST_FILE).exists(), log_text
    built = sorted(p.name for p in (out / "shards").glob("shard-*.safetensors"))
    assert 1 <= len(built) < len(SHARDS), built
    before = file_states(out)

    with pytest.raises(BankError, match="interrupted.*--resume"):
        PrototypeBank.load(out)

    # without --resume: refused, nothing touched
    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out), monkeypatch)
    assert code == 2 and "--resume" in err and "unfinished" in err, err
    assert file_states(out) == before

    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out, resume=True), monkeypatch)
    assert code == 0, err
    after = file_states(out)
    for name in [SPEC_FILE] + [f"shards/{b}" for b in built]:  # kept as they were, not rewritten
        assert after[name] == before[name], name
    assert sorted(p.name for p in (out / "shards").glob("shard-*.safetensors")) == [Path(s).name for s in SHARDS]
    PrototypeBank.load(out)
    assert_same_bank(out, freeda_bank.path)
    assert_same_shard_files(out, freeda_bank.path)


# ----------------------------------------------------------------------------- 3. several processes
@pytest.mark.slow
def test_two_processes_build_the_same_bank_as_one(freeda_bank, tiny_freeda_cfg_path, tmp_path):
    """``--num-gpus 2`` on a CPU: detectron2's launch starts two processes joined by GLOO; each builds
    every other shard and the first merges them."""
    out = tmp_path / "bank"
    proc = run_tool(tool_args(tiny_freeda_cfg_path, out) + ["--num-gpus", "2", "--dist-url", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    PrototypeBank.load(out)
    assert_same_bank(out, freeda_bank.path)
    assert_same_shard_files(out, freeda_bank.path)


# ----------------------------------------------------------------------------- 4. refusals
@pytest.mark.parametrize("change", ["steps", "captions"])
def test_a_folder_holding_another_bank_is_refused_untouched(freeda_bank, tiny_freeda_cfg_path, tmp_path,
                                                           monkeypatch, change):
    out = copy_bank(freeda_bank.path, tmp_path / "bank")
    before = file_states(out)
    if change == "steps":
        args = tool_args(tiny_freeda_cfg_path, out, "MODEL.DIFFSEG.FREEDA.BUILD.STEPS", 3, resume=True)
        differs = "build"
    else:
        other = tmp_path / "other.txt"
        other.write_text("a dog sleeping on a sofa\na cat sitting on a chair\n", encoding="utf-8")
        args = tool_args(tiny_freeda_cfg_path, out, captions=other, resume=True)
        differs = "captions"
    code, err = run_tool_here(args, monkeypatch)
    assert code == 2, err
    assert "already holds a different bank" in err and f"differs in: {differs}" in err, err
    assert file_states(out) == before


def test_a_non_empty_folder_that_is_no_bank_is_refused(freeda_bank, tiny_freeda_cfg_path, tmp_path, monkeypatch):
    record = read_json(freeda_bank.path / SPEC_FILE, "bank build record")
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not mine to overwrite")
    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out), monkeypatch)
    assert code == 2 and "is not empty and holds no bank" in err and str(out) in err, err
    for resume in (False, True):
        with pytest.raises(BankError, match="not empty and holds no bank"):
            prepare_output(out, record["spec"], record["fingerprint"], resume)
    assert os.listdir(out) == ["holiday.jpg"]


def test_continuing_a_build_with_other_weights_under_the_same_name_is_refused(freeda_bank, tmp_path):
    out = copy_bank(freeda_bank.path, tmp_path / "bank")
    (out / MANIFEST_FILE).unlink()  # an unfinished build of this bank
    before = file_states(out)
    record = read_json(out / SPEC_FILE, "bank build record")
    other = dict(record["fingerprint"], clip=[v + 0.5 for v in record["fingerprint"]["clip"]])
    with pytest.raises(BankError, match="CLIP model"):
        prepare_output(out, record["spec"], other, resume=True)
    assert file_states(out) == before
    with pytest.raises(BankError, match="--resume"):  # the same models, without --resume
        prepare_output(out, record["spec"], record["fingerprint"], resume=False)


def _freeda_cfg(cfg_path, bank, *opts):
    from diffseg_d2 import get_diffseg_cfg

    return get_diffseg_cfg(cfg_path, ["MODEL.DIFFSEG.FREEDA.BANK", str(bank), "DATASETS.TEST", "()", *opts])


def _edit_manifest(folder, edit):
    manifest = read_json(folder / MANIFEST_FILE, "bank manifest")
    edit(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize("model,other", [("clip", "laion/some-other-clip"), ("dino", "timm/some-other-dino")])
def test_a_bank_built_with_other_models_is_refused(freeda_bank, tiny_freeda_cfg_path, tmp_path, model, other):
    from detectron2.modeling import build_model

    bank = copy_bank(freeda_bank.path, tmp_path / "bank")
    _edit_manifest(bank, lambda m: m["spec"]["models"].update({model: other}))
    with pytest.raises(BankError, match=rf"MODEL\.DIFFSEG\.{model.upper()}\.WEIGHTS = '{other}'.*'tiny'"):
        build_model(_freeda_cfg(tiny_freeda_cfg_path, bank))


def test_a_bank_is_refused_when_the_weights_behind_the_same_name_changed(freeda_bank, tiny_freeda_cfg_path,
                                                                         tmp_path):
    from detectron2.modeling import build_model
    from safetensors.torch import load_file, save_file

    from diffseg_d2.pretrained.clip import CLIP_WEIGHTS_KEY, TINY_CLIP_FOLDER, build_tiny_open_clip
    from diffseg_d2.pretrained.weights import resolve_weights

    tiny = resolve_weights("tiny", config_key=CLIP_WEIGHTS_KEY, tiny=(TINY_CLIP_FOLDER, build_tiny_open_clip)).path
    clip_dir = tmp_path / "my-clip"
    shutil.copytree(tiny, clip_dir)
    bank = copy_bank(freeda_bank.path, tmp_path / "bank")
    _edit_manifest(bank, lambda m: m["spec"]["models"].update(clip=str(clip_dir)))
    cfg = _freeda_cfg(tiny_freeda_cfg_path, bank, "MODEL.DIFFSEG.CLIP.WEIGHTS", str(clip_dir))
    assert build_model(cfg).bank.spec["models"]["clip"] == str(clip_dir)  # the same weights: accepted

    weights = clip_dir / "open_clip_model.safetensors"
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))  # "retrained": same folder, same config string, other weights
    with pytest.raises(BankError, match="CLIP model of the config is not the one"):
        build_model(cfg)


@pytest.mark.parametrize("damaged", [SHARDS[1], INDEX_FILE])
def test_a_truncated_file_is_refused_and_resume_repairs_it(freeda_bank, tiny_freeda_cfg_path, tmp_path,
                                                           monkeypatch, damaged):
    out = copy_bank(freeda_bank.path, tmp_path / "bank")
    path = out / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BankError, match=r"(?s)truncated.*--resume"):
        PrototypeBank.load(out)
    intact = {k: v for k, v in file_states(out).items() if k.startswith("shards/") and k != damaged}

    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out, resume=True), monkeypatch)
    assert code == 0, err
    after = file_states(out)
    for name, state in intact.items():  # only the damaged file is rebuilt
        assert after[name] == state, name
    PrototypeBank.load(out)
    assert_same_bank(out, freeda_bank.path)


def test_resume_rebuilds_a_shard_damaged_without_changing_its_size(freeda_bank, tiny_freeda_cfg_path, tmp_path,
                                                                   monkeypatch):
    """A shard whose bytes changed (the same size, still a readable safetensors file) fails its checksum;
    the error says --resume rebuilds what is damaged, so the resumed bank must hold the built rows again."""
    out = copy_bank(freeda_bank.path, tmp_path / "bank")
    path = out / SHARDS[1]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # one bit of the last tensor
    path.write_bytes(bytes(data))
    read_shard(path)  # still a valid shard: only the checksum tells
    with pytest.raises(BankError, match=r"(?s)checksum.*--resume"):
        PrototypeBank.load(out)

    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out, resume=True), monkeypatch)
    assert code == 0, err
    PrototypeBank.load(out)
    reference = read_shard(freeda_bank.path / SHARDS[1])
    resumed = read_shard(path)
    same = torch.equal(resumed.keys, reference.keys) and torch.equal(resumed.prototypes, reference.prototypes)
    assert same, "--resume kept the damaged shard and wrote a manifest that vouches for it"
    assert_same_bank(out, freeda_bank.path)


@pytest.mark.parametrize("content,message", [
    (b"", "holds no captions"),
    (b"\n   \n\t\n", "holds no captions"),
    (b"\xff\xfe\xfa a dog\n", "cannot be read as UTF-8"),
    (None, "does not exist"),
], ids=["empty", "blank", "not-utf8", "missing"])
def test_bad_captions_fail_before_any_model_loads(tiny_freeda_cfg_path, tmp_path, monkeypatch, content, message):
    captions = tmp_path / "captions.txt"
    if content is not None:
        captions.write_bytes(content)
    monkeypatch.setattr(PrototypeBankBuilder, "from_config",
                        classmethod(lambda cls, cfg: pytest.fail("models were loaded before the captions were read")))
    out = tmp_path / "bank"
    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out, captions=captions), monkeypatch)
    assert code == 2 and "build_freeda_bank: error:" in err and message in err and str(captions) in err, err
    assert not out.exists()


@pytest.mark.parametrize("opts,message", [
    (["MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", "{tmp}/no-nouns.txt"], r"NOUN_LIST = '.*no-nouns.txt' is not a file"),
    (["MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", "{tmp}/empty.txt"], "noun list is empty"),
    (["MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "spacy"], "NOUNS must be 'nltk' or 'list'"),
], ids=["missing", "empty", "unknown-source"])
def test_a_bad_noun_source_fails_before_any_model_loads(tiny_freeda_cfg_path, tmp_path, monkeypatch, opts, message):
    import re

    import diffseg_d2.diffusion as diffusion

    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    monkeypatch.setattr(diffusion, "load_stable_diffusion", lambda *a, **k: pytest.fail("SD was loaded"))
    out = tmp_path / "bank"
    opts = [o.format(tmp=tmp_path) for o in opts]
    code, err = run_tool_here(tool_args(tiny_freeda_cfg_path, out, *opts), monkeypatch)
    assert code == 2 and re.search(message, err), err
    assert not out.exists()


def test_load_says_what_is_wrong_with_a_folder(freeda_bank, tmp_path):
    with pytest.raises(BankError, match="MODEL.DIFFSEG.FREEDA.BANK is empty"):
        PrototypeBank.load("")
    with pytest.raises(BankError, match="is not a folder"):
        PrototypeBank.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="not a bank folder"):
        PrototypeBank.load(tmp_path / "empty")
    other = copy_bank(freeda_bank.path, tmp_path / "other")
    _edit_manifest(other, lambda m: m.update(format="something-else"))
    with pytest.raises(BankError, match="not a version-1 diffseg_d2 FreeDA bank"):
        PrototypeBank.load(other)
    (other / MANIFEST_FILE).write_text("{ not json", encoding="utf-8")
    with pytest.raises(BankError, match="cannot be read"):
        PrototypeBank.load(other)


def test_a_bank_without_any_prototype_is_refused(tmp_path):
    empty = Shard(keys=torch.zeros(0, 4), prototypes=torch.zeros(0, 3), caption_index=torch.zeros(0, dtype=torch.long),
                  seed=torch.zeros(0, dtype=torch.long), area=torch.zeros(0), nouns=[], captions=(0, 2),
                  captions_without_nouns=[0, 1])
    write_shard(tmp_path / shard_name(0), empty)
    with pytest.raises(BankError, match=r"no prototypes.*2 of 2 captions had no noun"):
        finalize_bank(tmp_path, {}, {}, 1, {})
    assert not (tmp_path / MANIFEST_FILE).exists()


# ----------------------------------------------------------------------------- 5. retrieval
DK, DP, PER_CLASS = 16, 8, 6


def planted_bank(kind, *, distractors=200, seed=0, **index_settings):
    """3 orthonormal class directions, each with PER_CLASS noisy keys whose prototypes scatter around a
    known vector; distractor keys orthogonal to every class direction; rows shuffled.

    Returns ``(bank, directions (3, DK), planted ids per class, expected class prototypes (3, DP))``.
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(DK, DK, generator=g))[0][:, :3].T.contiguous()
    keys, protos = [], []
    centres = F.normalize(torch.randn(3, DP, generator=g), dim=-1)
    for c in range(3):
        keys.append(F.normalize(directions[c] + 0.05 * torch.randn(PER_CLASS, DK, generator=g), dim=-1))
        protos.append(F.normalize(centres[c] + 0.3 * torch.randn(PER_CLASS, DP, generator=g), dim=-1))
    r = torch.randn(distractors, DK, generator=g)
    keys.append(F.normalize(r - (r @ directions.T) @ directions, dim=-1))
    protos.append(F.normalize(torch.randn(distractors, DP, generator=g), dim=-1))
    keys, protos = torch.cat(keys), torch.cat(protos)
    expected = F.normalize(torch.stack([protos[c * PER_CLASS : (c + 1) * PER_CLASS].mean(0) for c in range(3)]), dim=-1)
    order = torch.randperm(len(keys), generator=g)  # new row i is old row order[i]
    where = torch.argsort(order)  # old row j is new row where[j]
    planted = [set(where[c * PER_CLASS : (c + 1) * PER_CLASS].tolist()) for c in range(3)]
    keys, protos = keys[order], protos[order]
    index, built = build_index(keys.numpy(), kind, **index_settings)
    assert built == (kind if kind != "auto" else "flat")
    nouns = [f"row{i}" for i in range(len(keys))]
    return PrototypeBank(index, protos, nouns, {"spec": {}}), directions, planted, expected, keys


@pytest.mark.parametrize("kind", ["auto", "flat", "hnsw", "ivf"])
def test_search_finds_the_planted_keys_first(kind):
    bank, directions, planted, expected, keys = planted_bank(kind)
    set_search_breadth(bank.index, top_k=PER_CLASS, ef_search=512, nprobe=16)
    sims, ids = bank.search(directions, PER_CLASS)
    assert sims.shape == ids.shape == (3, PER_CLASS)
    for c in range(3):
        assert set(ids[c].tolist()) == planted[c]
        assert (sims[c][:-1] >= sims[c][1:]).all()  # best first
        torch.testing.assert_close(sims[c], keys[ids[c]] @ directions[c], atol=1e-5, rtol=1e-5)
    prototypes, best = bank.class_prototypes(directions, PER_CLASS)
    torch.testing.assert_close(prototypes, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(best, sims[:, 0])
    # one more neighbour than planted is a row of no class of its own, far less similar
    sims, ids = bank.search(directions, PER_CLASS + 1)
    assert all(ids[c, -1].item() not in planted[c] for c in range(3)) and (sims[:, -1] < 0.5).all()


def test_k_larger_than_the_bank():
    bank, directions, planted, expected, keys = planted_bank("flat", distractors=4)
    m = len(bank)
    sims, ids = bank.search(directions, 1000)
    assert sims.shape == ids.shape == (3, m)
    for c in range(3):
        assert sorted(ids[c].tolist()) == list(range(m))
    prototypes, _ = bank.class_prototypes(directions, 1000)
    torch.testing.assert_close(prototypes, F.normalize(bank.prototypes.mean(0), dim=-1).expand(3, -1))


def test_an_index_that_returns_fewer_neighbours_averages_the_ones_it_found():
    bank, directions, planted, expected, keys = planted_bank("ivf", distractors=40, ivf_nlist=8)
    set_search_breadth(bank.index, top_k=1000, ef_search=512, nprobe=1)  # one list of 8: not every key
    sims, ids = bank.search(directions, 1000)
    valid = ids >= 0
    assert (~valid).any() and valid[:, 0].all()
    assert torch.isinf(sims[~valid]).all() and torch.isfinite(sims[valid]).all()
    prototypes, best = bank.class_prototypes(directions, 1000)
    for c in range(3):
        mean = bank.prototypes[ids[c][valid[c]]].mean(0)
        torch.testing.assert_close(prototypes[c], F.normalize(mean, dim=-1))
    assert torch.isfinite(best).all()


def test_a_bank_round_trips_through_its_files_with_an_approximate_index(tmp_path):
    bank, directions, planted, expected, keys = planted_bank("flat")
    half = len(bank) // 2
    for i, rows in enumerate((slice(0, half), slice(half, None))):
        n = len(bank.nouns[rows])
        write_shard(tmp_path / shard_name(i), Shard(
            keys=keys[rows], prototypes=bank.prototypes[rows], caption_index=torch.arange(n), seed=torch.arange(n),
            area=torch.ones(n), nouns=bank.nouns[rows], captions=(i * 10, i * 10 + 10), captions_without_nouns=[]))
    manifest = finalize_bank(tmp_path, {"models": {}}, {}, 2, {"kind": "hnsw"})
    assert manifest["index"]["type"] == "hnsw" and manifest["counts"]["prototypes"] == len(bank)
    loaded = PrototypeBank.load(tmp_path, top_k=PER_CLASS, ef_search=64)
    assert loaded.nouns == bank.nouns and torch.equal(loaded.prototypes, bank.prototypes)
    sims, ids = loaded.search(directions, PER_CLASS)
    assert [set(r) for r in ids.tolist()] == planted
    with pytest.raises(BankError, match="another CLIP"):
        loaded.search(torch.zeros(1, DK + 1), 3)
    with pytest.raises(BankError, match="holds .* keys but it has"):
        PrototypeBank(loaded.index, loaded.prototypes[:-1], loaded.nouns[:-1], {})


# ----------------------------------------------------------------------------- 6. superpixel pooling
@pytest.mark.parametrize("H,W,h,w", [
    (37, 53, 5, 7),  # non-integer ratios
    (50, 31, 8, 8),
    (64, 64, 16, 16),  # integer ratio
    (6, 9, 8, 10),  # image smaller than the feature grid
    (3, 40, 4, 6),  # one side smaller
    (17, 1, 3, 2),
])
def test_pooling_equals_upsampling_then_averaging(H, W, h, w):
    g = torch.Generator().manual_seed(H * 1000 + W)
    features = torch.randn(5, h, w, generator=g)
    num = min(7, H * W)
    labels = torch.randint(0, num, (H, W), generator=g)
    labels.view(-1)[:num] = torch.arange(num)  # every segment has a pixel
    sums, counts = pool_features(features, labels, num)

    up = F.interpolate(features[None].double(), size=(H, W), mode="bilinear", align_corners=False)[0]
    direct = torch.stack([up[:, labels == s].mean(1) for s in range(num)]).float()
    assert torch.equal(counts, torch.bincount(labels.view(-1), minlength=num).float())
    torch.testing.assert_close(sums / counts[:, None], direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooling_matrix(labels, (h, w), num).sum(1), counts)  # rows sum to pixel counts


@pytest.mark.parametrize("H,W,window,stride", [
    (100, 150, 40, 20), (112, 200, 112, 56), (50, 50, 50, 25), (30, 97, 30, 7), (113, 113, 40, 40), (45, 80, 45, 44),
])
def test_sliding_windows_cover_every_pixel_and_end_flush(H, W, window, stride):
    corners = sliding_windows(H, W, window, stride)
    assert len(set(corners)) == len(corners)
    covered = torch.zeros(H, W, dtype=torch.bool)
    for y, x in corners:
        assert 0 <= y and y + window <= H and 0 <= x and x + window <= W
        covered[y : y + window, x : x + window] = True
    assert covered.all()
    assert max(y for y, _ in corners) == H - window and max(x for _, x in corners) == W - window
    ys = sorted({y for y, _ in corners})
    assert all(b - a <= stride for a, b in zip(ys, ys[1:]))


def test_felzenszwalb_labels_are_consecutive_segments():
    image = torch.zeros(3, 20, 30)
    image[0, :10, :15], image[1, 10:, :15], image[2, :10, 15:] = 255.0, 255.0, 255.0  # four flat quadrants
    labels = felzenszwalb_superpixels(image, scale=100.0, sigma=0.0, min_size=5)
    assert labels.shape == (20, 30) and labels.dtype == torch.int64
    assert labels.unique().tolist() == [0, 1, 2, 3]
    for rows in (slice(0, 10), slice(10, 20)):
        for cols in (slice(0, 15), slice(15, 30)):
            assert labels[rows, cols].unique().numel() == 1
    noise = torch.rand(3, 24, 31, generator=torch.Generator().manual_seed(0)) * 255
    labels = felzenszwalb_superpixels(noise, scale=10.0, sigma=0.5, min_size=3)
    assert labels.unique().tolist() == list(range(int(labels.max()) + 1)) and labels.max() > 3


# ----------------------------------------------------------------------------- 8. nouns and captions
def test_list_nouns_finds_phrases_plurals_any_case_in_order_once():
    nouns = ListNouns(["dog", "Potted   Plant", "tv monitor", "bus", "person", "plant", "sofa", "dog"])
    assert nouns("A Dog next to two potted plants and a TV Monitor.") == ["Dog", "potted plants", "TV Monitor"]
    assert nouns("buses, a sofa; dogs and a dog and a person") == ["buses", "sofa", "dogs", "person"]
    assert nouns("a plant and a potted plant") == ["plant", "potted plant"]  # the longest phrase wins
    assert nouns("a hotdog on a sofabed") == []  # whole words only
    assert nouns("the sky is clear today") == []
    assert nouns.fingerprint() == ListNouns(["sofa", "person", "PLANT", "potted plant", "tv monitor", "bus",
                                             "dog"]).fingerprint()  # order and case of the list do not matter
    with pytest.raises(ValueError, match="noun list is empty"):
        ListNouns(["", "  "])
    with pytest.raises(ValueError, match="'nltk' or 'list'"):
        build_noun_extractor("spacy")


def test_a_listed_noun_is_itself_even_when_it_looks_like_another_ones_plural():
    """'glasses' (listed) is not just the plural of 'glass' (listed too). Which one it mapped to used to
    depend on the iteration order of a set of strings, i.e. on PYTHONHASHSEED: each process (each rank
    of a multi-process build) could find other nouns in the same caption."""
    pairs = [("glass", "glasses"), ("cloth", "clothes"), ("short", "shorts"), ("good", "goods"),
             ("arm", "arms"), ("bus", "buses"), ("box", "boxes"), ("dress", "dresses"), ("match", "matches"),
             ("bench", "benches"), ("dish", "dishes"), ("brush", "brushes")]
    nouns = ListNouns([w for pair in pairs for w in pair])
    for single, plural in pairs:
        assert nouns(f"a {single} next to {plural}") == [single, plural], (single, plural)
        assert nouns(f"{plural} next to a {single}") == [plural, single], (single, plural)


def test_noun_list_file(tmp_path):
    path = tmp_path / "nouns.txt"
    path.write_text("dog\n\n  cat  \nDog\n", encoding="utf-8")
    assert ListNouns.from_file(path).phrases == [("cat",), ("dog",)]
    with pytest.raises(FileNotFoundError, match="NOUN_LIST = '.*missing.txt' is not a file"):
        ListNouns.from_file(tmp_path / "missing.txt")


def test_captions_from_text_skip_blank_lines_and_tidy_spaces(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"\n  a dog   on a sofa  \r\n\r\n\ta cat\t\n   \nthe sky\n")
    assert read_captions(path) == ["a dog on a sofa", "a cat", "the sky"]


def test_captions_from_coco_json_keep_file_order(tmp_path):
    path = tmp_path / "captions_val.JSON"
    data = {"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 9, "caption": "  A man riding\na horse. "},
        {"image_id": 1, "id": 3, "caption": "a horse"},
        {"image_id": 1, "id": 5, "caption": "   "}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    assert read_captions(path) == ["A man riding a horse.", "a horse"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}), encoding="utf-8")
    with pytest.raises(CaptionsError, match="not a COCO captions file"):
        read_captions(bad)
    bad.write_text("{ nope", encoding="utf-8")
    with pytest.raises(CaptionsError, match="not a COCO captions file"):
        read_captions(bad)


@pytest.mark.slow
def test_the_bank_tools_help_describes_the_bank_build_not_detectron2s_trainer():
    import subprocess
    import sys

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "build_freeda_bank.py"), "--help"],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0
    assert "--captions" in out.stdout and "--resume" in out.stdout and "prototype bank" in out.stdout
    assert "--eval-only" not in out.stdout and "SOLVER.BASE_LR" not in out.stdout


def test_a_bank_row_by_hand(tiny_freeda_cfg_path, monkeypatch):
    """One caption's rows re-computed by hand from the generated image and the nouns' heat maps:
    mask = min-max normalised heat >= MASK_THRESHOLD; prototype = the DINO tokens averaged with each
    grid cell weighted by the share of its pixels inside the mask, normalised; key = CLIP's
    final-layer text features at the noun's tokens in the caption (found here by matching the noun's
    own token ids), averaged, projected, normalised; area = the mask's share of the latent grid."""
    from diffseg_d2 import get_diffseg_cfg
    from diffseg_d2.freeda import builder as builder_module

    builder = PrototypeBankBuilder.from_config(get_diffseg_cfg(str(tiny_freeda_cfg_path), ["MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "list",
                                                                                       "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", str(NOUN_LIST)]))
    builder.eval()
    caption = "a dog on a sofa"
    side = builder.image_size // builder.diffusion.latent_factor
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(2, side, side, generator=g)
    heat[1] = 0.0
    heat[1, : side // 2, : side // 3] = 1.0  # "sofa": a block
    image = torch.rand(1, 3, builder.image_size, builder.image_size, generator=g)
    monkeypatch.setattr(builder.diffusion, "generate", lambda *a, **k: image)
    monkeypatch.setattr(builder_module, "summed_cross_maps", lambda *a, **k: heat.clone())
    rows = builder.caption_prototypes(0, caption)
    assert rows.nouns == ["dog", "sofa"]

    t = builder.mask_threshold
    masks = torch.stack([(h - h.min()) / (h.max() - h.min()) >= t for h in heat])
    assert torch.equal(rows.masks, masks)
    torch.testing.assert_close(rows.areas, masks.float().mean((1, 2)))
    feats = builder.dino(image)[0]  # (D, gh, gw)
    gh, gw = feats.shape[-2:]
    for k in range(2):
        # Grid cell (i, j) covers latent rows floor(i side / gh) .. ceil((i + 1) side / gh) (the cells of
        # an area resize overlap when the sizes do not divide): its weight is the share of them inside.
        share = torch.zeros(gh, gw)
        for i in range(gh):
            for j in range(gw):
                ys = slice(i * side // gh, -(-(i + 1) * side // gh))
                xs = slice(j * side // gw, -(-(j + 1) * side // gw))
                share[i, j] = masks[k][ys, xs].float().mean()
        proto = (feats * share).sum((1, 2)) / share.sum()
        torch.testing.assert_close(rows.prototypes[k], F.normalize(proto, dim=0), rtol=1e-4, atol=1e-5)

    clip = builder.clip
    ids = clip.tokenizer([caption])
    captured = {}
    handle = clip.model.ln_final.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
    with torch.no_grad():
        clip.model.encode_text(ids)
    handle.remove()
    seq = ids[0].tolist()
    for k, noun in enumerate(["dog", "sofa"]):
        word = [t for t in clip.tokenizer([noun])[0].tolist() if t not in (0, seq[0], max(seq))]  # no SOT/EOT/pad
        start = next(i for i in range(len(seq)) if seq[i:i + len(word)] == word)
        feature = captured["x"][0, start:start + len(word)].mean(0)
        key = F.normalize(feature @ clip.model.text_projection, dim=0)
        torch.testing.assert_close(rows.keys[k], key, rtol=1e-4, atol=1e-5)


def test_the_index_moves_to_the_gpu_only_when_faiss_and_the_model_can(monkeypatch):
    """INDEX_DEVICE auto: a flat or IVF index is copied to the model's GPU (its nprobe kept) when faiss is a GPU
    build; an HNSW index, a CPU model, a CPU faiss or INDEX_DEVICE cpu keep the CPU index. The GPU calls are
    faiss's own (stood in for here; tools/gpu_check.sh compares real GPU searches with the CPU's)."""
    import faiss

    from diffseg_d2.freeda import bank as bank_module

    flat = faiss.IndexFlatIP(8)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.nprobe = 3
    hnsw = faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT)
    for index in (flat, ivf, hnsw):  # this machine's faiss: never moved
        assert bank_module.index_on_device(index, "cuda:0") is index
    moved = []

    def to_gpu(resources, device, index):
        copy = faiss.clone_index(index)
        moved.append((device, copy))
        return copy

    monkeypatch.setattr(bank_module, "faiss_has_gpu", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    assert bank_module.index_on_device(flat, "cuda:1") is moved[-1][1] and moved[-1][0] == 1
    gpu_ivf = bank_module.index_on_device(ivf, "cuda")
    assert gpu_ivf is moved[-1][1] and moved[-1][0] == 0 and faiss.downcast_index(gpu_ivf).nprobe == 3
    assert bank_module.index_on_device(hnsw, "cuda") is hnsw
    assert bank_module.index_on_device(flat, "cpu") is flat
    assert bank_module.index_on_device(flat, "cuda", "cpu") is flat
    assert len(moved) == 2
    with pytest.raises(ValueError, match="INDEX_DEVICE must be one of"):
        bank_module.index_on_device(flat, "cuda", "gpu")
