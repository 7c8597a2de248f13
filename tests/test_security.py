"""Security and lifetime: the checkpoint path detectron2 really reads, config files read as data,
instrumentation that never keeps a model alive, panoptic conventions, per-call timings
(README, "Security and reliability")."""
import contextvars
import gc
import http.server
import importlib.util
import pickle
import re
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CodePayload  # tests/conftest.py


ROOT = Path(__file__).resolve().parent.parent
TINY_DIFFSEG = str(ROOT / "configs" / "tiny" / "diffsegmenter.yaml")
PANOPTIC_FPN_PROJECT = ROOT / "projects" / "diffusion_panoptic_fpn"
LIBRARY_PROJECT = ROOT / "projects" / "use_as_library"


def _cfg(path, *opts):
    from diffseg_d2 import get_diffseg_cfg

    return get_diffseg_cfg(path, list(opts))


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ 1. the path detectron2 reads
def test_a_query_string_does_not_hide_a_pickle_next_to_a_harmless_file(tmp_path):
    """``m.pkl?dl=1`` is a harmless weights-only file, ``m.pkl`` beside it a pickle: detectron2 takes
    the query off and reads ``m.pkl``, so the check must look at ``m.pkl``."""
    from detectron2.engine import DefaultPredictor

    marker = tmp_path / "PAYLOAD_RAN"
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({"model": {"w": CodePayload(marker)}}))
    harmless = tmp_path / "m.pkl?dl=1"
    torch.save({"model": {}}, harmless)
    with pytest.raises(Exception) as refused:
        DefaultPredictor(_cfg(TINY_DIFFSEG, "MODEL.WEIGHTS", str(harmless)))
    assert not marker.exists(), "the pickle beside the checked file was unpickled"

    from diffseg_d2.checkpoint_safety import UnsafeCheckpointError, checkpoint_read_path

    assert isinstance(refused.value, UnsafeCheckpointError)
    assert re.search(r"read as .*m\.pkl'.* is a pickle file", str(refused.value))
    assert checkpoint_read_path(str(harmless)) == str(tmp_path / "m.pkl")


@pytest.fixture
def pickle_server(tmp_path):
    """A loopback HTTP server whose ``/model.pkl`` runs code when unpickled."""
    marker = tmp_path / "PAYLOAD_RAN"
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.pkl").write_bytes(pickle.dumps({"model": {"w": CodePayload(marker)}}))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", marker
    server.shutdown()
    server.server_close()


def test_a_url_with_a_query_string_is_checked_as_detectron2_reads_it(pickle_server, tmp_path, monkeypatch):
    """The shape of many share links: ``.../model.pkl?dl=1``. detectron2 downloads it and unpickles
    ``model.pkl``; the build refuses it before any download."""
    from detectron2.engine import DefaultPredictor

    from diffseg_d2.checkpoint_safety import UnsafeCheckpointError

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "download_cache"))
    url, marker = pickle_server
    with pytest.raises(Exception) as refused:
        DefaultPredictor(_cfg(TINY_DIFFSEG, "MODEL.WEIGHTS", f"{url}/model.pkl?dl=1"))
    assert not marker.exists(), "the download was unpickled"
    assert isinstance(refused.value, UnsafeCheckpointError)
    assert re.search(r"model\.pkl\?dl=1.*is a pickle file", str(refused.value))
    assert not (tmp_path / "download_cache").exists(), "nothing is downloaded for a refused path"


def test_remote_weights_are_refused_when_torch_is_told_to_unpickle(monkeypatch):
    from diffseg_d2.checkpoint_safety import UnsafeCheckpointError, check_checkpoint_file

    check_checkpoint_file("https://example.org/model_final.pth")  # weights-only by default: allowed
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        check_checkpoint_file("https://example.org/model_final.pth")


@pytest.mark.parametrize("route", ["safe", "strict"])
def test_resume_never_unpickles_what_last_checkpoint_names(route, tmp_path):
    """``--resume`` reads the file named in OUTPUT_DIR/last_checkpoint: a pickle there is refused by
    the checkpointers of the package (the example project's trainer and ours)."""
    from detectron2.modeling import build_model

    from diffseg_d2.checkpoint_safety import UnsafeCheckpointError
    from diffseg_d2.engine import SafeCheckpointer, StrictCheckpointer

    marker = tmp_path / "PAYLOAD_RAN"
    (tmp_path / "model_0000009.pkl").write_bytes(pickle.dumps({"model": {"w": CodePayload(marker)}}))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pkl")
    model = build_model(_cfg(TINY_DIFFSEG))
    checkpointer = (SafeCheckpointer if route == "safe" else StrictCheckpointer)(model, save_dir=str(tmp_path))
    with pytest.raises(UnsafeCheckpointError, match=r"model_0000009\.pkl.*is a pickle file"):
        checkpointer.resume_or_load("", resume=True)
    assert not marker.exists()


@pytest.mark.slow
def test_example_project_resume_never_unpickles_what_last_checkpoint_names(tmp_path):
    """projects/diffusion_panoptic_fpn's trainer (detectron2's DefaultTrainer) with --resume."""
    from diffseg_d2.checkpoint_safety import UnsafeCheckpointError
    from diffseg_d2.config import get_diffseg_cfg

    project = _load_script(PANOPTIC_FPN_PROJECT / "train_net.py", "diffusion_panoptic_fpn_train_net")
    marker = tmp_path / "PAYLOAD_RAN"
    (tmp_path / "model_0000009.pkl").write_bytes(pickle.dumps({"model": {"w": CodePayload(marker)}}))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pkl")
    cfg = get_diffseg_cfg(str(PANOPTIC_FPN_PROJECT / "configs" / "tiny.yaml"),
                          ["OUTPUT_DIR", str(tmp_path), "DATALOADER.NUM_WORKERS", "0"])
    trainer = project.Trainer(cfg)
    with pytest.raises(Exception) as refused:
        trainer.resume_or_load(resume=True)
    assert not marker.exists(), "--resume unpickled what last_checkpoint names"
    assert isinstance(refused.value, UnsafeCheckpointError) and "model_0000009.pkl" in str(refused.value)


# ------------------------------------------------------------------ 2. config files are data
def _tagged_config(tmp_path: Path, marker: Path, base: str = TINY_DIFFSEG) -> Path:
    path = tmp_path / "tagged.yaml"
    path.write_text(
        f"_BASE_: {base}\n"
        "MODEL:\n"
        "  DIFFSEG:\n"
        f"    SEED: !!python/object/apply:builtins.open [\"{marker}\", \"w\"]\n"
    )
    return path


def test_a_python_tag_in_a_config_file_is_refused_naming_file_and_line(tmp_path):
    from diffseg_d2 import get_diffseg_cfg

    marker = tmp_path / "CONFIG_CODE_RAN"
    tagged = _tagged_config(tmp_path, marker)
    with pytest.raises(Exception) as refused:
        get_diffseg_cfg(str(tagged))
    assert not marker.exists(), "reading the config ran the tag's call"

    from diffseg_d2.config import ConfigKeyError, UnsafeConfigError

    assert isinstance(refused.value, UnsafeConfigError)
    assert re.search(rf"{tagged}, line 4: .*python/object/apply.*read as data", str(refused.value))
    # ... also when the tag sits in a _BASE_ of the file given.
    child = tmp_path / "child.yaml"
    child.write_text(f"_BASE_: {tagged}\nMODEL:\n  DEVICE: cpu\n")
    with pytest.raises(UnsafeConfigError, match=rf"{tagged}, line 4"):
        get_diffseg_cfg(str(child))
    assert not marker.exists()
    # The tools catch it with the other config errors (one message, no traceback).
    assert issubclass(UnsafeConfigError, ConfigKeyError)


def test_every_config_reader_of_the_repository_refuses_a_python_tag(tmp_path):
    """The example projects read configs through merge_config_file, and nothing in the package,
    its tools or projects calls detectron2's merge_from_file (unsafe by default) another way."""
    import argparse

    marker = tmp_path / "CONFIG_CODE_RAN"
    tagged = _tagged_config(tmp_path, marker)
    fpn = _load_script(PANOPTIC_FPN_PROJECT / "train_net.py", "diffusion_panoptic_fpn_train_net")
    library = _load_script(LIBRARY_PROJECT / "segment.py", "use_as_library_segment")
    refused = []
    for read in (lambda: fpn.setup(argparse.Namespace(config_file=str(tagged), opts=[])),
                 lambda: library.main(["--config-file", str(tagged), "--image", str(tmp_path / "none.png"),
                                       "--vocab", "cat"])):
        with pytest.raises(Exception) as info:
            read()
        assert not marker.exists(), "reading the config ran the tag's call"
        refused.append(info.value)

    from diffseg_d2.config import UnsafeConfigError

    assert all(isinstance(e, UnsafeConfigError) for e in refused), refused

    callers = []
    for folder in ("diffseg_d2", "tools", "projects"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "merge_from_file(" in text and path != ROOT / "diffseg_d2" / "config" / "__init__.py":
                callers.append(str(path.relative_to(ROOT)))
    assert callers == [], f"read config files with diffseg_d2.merge_config_file instead: {callers}"


def test_tools_report_an_unsafe_config_as_a_request_error(tmp_path, capsys):
    """tools/train_net.py ends with one message naming the file (its expected-error path)."""
    train_net = _load_script(ROOT / "tools" / "train_net.py", "diffseg_tools_train_net")
    marker = tmp_path / "CONFIG_CODE_RAN"
    tagged = _tagged_config(tmp_path, marker)
    args = train_net.argument_parser().parse_args(["--config-file", str(tagged), "--eval-only"])
    with pytest.raises(SystemExit, match=rf"UnsafeConfigError: {tagged}, line 4"):
        train_net.main(args)
    assert not marker.exists()


# ------------------------------------------------------------------ 7. instrumentation lifetime
def test_a_model_that_recorded_is_freed_when_deleted(tmp_path):
    """The instrumentation registry must not keep a UNet alive: a server that swaps configs would
    grow without bound."""
    from detectron2.modeling import build_model

    model = build_model(_cfg(TINY_DIFFSEG, "MODEL.DIFFSEG.VOCABULARY", "['background', 'cat', 'dog']"))
    model.eval()
    with torch.no_grad():
        model([{"image": torch.zeros(3, 32, 32)}])
    unet_ref = weakref.ref(model.diffusion.unet)
    time_ref = weakref.ref(model.diffusion.unet.time_embedding)
    del model
    gc.collect()
    assert unet_ref() is None, "the UNet outlived its model"
    assert time_ref() is None


def _store():
    from diffseg_d2.diffusion import AttentionStore

    return AttentionStore((16, 16), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))


def test_a_recording_left_in_another_context_still_restores_the_unet(tiny_sd):
    """A ``with`` block entered in one context and left in another (a generator or task resumed
    elsewhere) must still take the recording processors off."""
    from diffseg_d2.diffusion import record_attention

    unet = tiny_sd.unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    block = record_attention(unet, _store(), cross_factors=[1])
    contextvars.copy_context().run(block.__enter__)
    assert any("Recording" in type(p).__name__ for p in unet.attn_processors.values())
    block.__exit__(None, None, None)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_processors_the_user_sets_while_a_call_records_are_kept(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor

    from diffseg_d2.diffusion import record_attention

    unet = tiny_sd.unet
    originals = dict(unet.attn_processors)
    try:
        with record_attention(unet, _store(), cross_factors=[1]):
            mine = AttnProcessor()
            unet.set_attn_processor(mine)
        assert all(p is mine for p in unet.attn_processors.values())
    finally:
        unet.set_attn_processor(originals)


# ------------------------------------------------------------------ 10. panoptic conventions
def test_panoptic_roles_background_void_and_stuff_classes():
    from diffseg_d2.vocabulary import STUFF, THING, VOID, VocabularyError, panoptic_roles

    names = ["background", "sky", "dog"]
    assert panoptic_roles(names) == [VOID, THING, THING]
    assert panoptic_roles(names, stuff_classes=["Sky"]) == [VOID, STUFF, THING]
    # A dataset's metadata decides for its own classes; its "background" is one of its categories.
    assert panoptic_roles(names, thing_classes=["dog"]) == [STUFF, STUFF, THING]
    with pytest.raises(VocabularyError, match="'grass'.* not in the vocabulary"):
        panoptic_roles(names, stuff_classes=["grass"])


def test_users_vocabulary_background_is_void_and_stuff_is_one_segment(tiny_cfg_path):
    """With a vocabulary of the user's, "background" pixels belong to no segment (id 0, as in
    detectron2 and Mask2Former), a STUFF_CLASSES class is one segment however many regions it has,
    and the others are things."""
    from detectron2.engine import DefaultPredictor

    from diffseg_d2.modeling.meta_arch.semantic_to_panoptic import semantic_to_panoptic
    from diffseg_d2.vocabulary import panoptic_roles

    labels = np.zeros((12, 12), np.int64)
    labels[0:3, :] = 1  # sky, top
    labels[9:12, :] = 1  # sky, bottom: another region
    labels[5:7, 1:3] = 2  # dog A
    labels[5:7, 8:10] = 2  # dog B
    scores = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).permute(2, 0, 1).float()
    roles = panoptic_roles(["background", "sky", "dog"], stuff_classes=["sky"])
    ids, segments = semantic_to_panoptic(scores, roles, min_area=0.0)
    ids = ids.numpy()
    assert (ids[labels == 0] == 0).all() and not any(s["category_id"] == 0 for s in segments)
    sky = [s for s in segments if s["category_id"] == 1]
    dogs = [s for s in segments if s["category_id"] == 2]
    assert len(sky) == 1 and not sky[0]["isthing"] and sky[0]["area"] == 72
    assert len(dogs) == 2 and all(s["isthing"] for s in dogs)

    # The same conventions through the model: config key and input dict.
    cfg = _cfg(tiny_cfg_path, "MODEL.DIFFSEG.VOCABULARY", "['background', 'sky', 'dog']",
               "MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES", "['sky']", "MODEL.DIFFSEG.PANOPTIC.MIN_AREA", "0.0")
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for out in (predictor(image), predictor.model([{
            "image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "vocabulary": ["background", "sky", "dog"],
            "stuff_classes": ["sky"]}])[0]):
        ids, segments = out["panoptic_seg"]
        labels = out["sem_seg"].argmax(0)
        assert ((ids == 0) == (labels == 0)).all()
        assert all(s["isthing"] == (s["category_id"] == 2) for s in segments)
        assert sum(s["category_id"] == 1 for s in segments) <= 1

    from diffseg_d2.vocabulary import VocabularyError

    with pytest.raises(VocabularyError, match="'grass'"):
        DefaultPredictor(_cfg(tiny_cfg_path, "MODEL.DIFFSEG.VOCABULARY", "['background', 'sky']",
                              "MODEL.DIFFSEG.PANOPTIC.STUFF_CLASSES", "['grass']"))


# ------------------------------------------------------------------ 6. per-call timings (FreeDA)
def test_freeda_timings_are_per_thread(freeda_bank, tiny_freeda_cfg_path):
    """Two threads segmenting with one FreeDA model each read the timings of their own call."""
    from detectron2.modeling import build_model

    cfg = _cfg(tiny_freeda_cfg_path, "MODEL.DIFFSEG.FREEDA.BANK", str(freeda_bank.path))
    model = build_model(cfg).eval()
    image = torch.rand(3, 40, 40) * 255
    seen = {}

    def work(name, size):
        model.segment(image, ["background", "cat"], (size, size))
        seen[name] = (threading.get_ident(), model.last_timings)

    assert model.last_timings == {}
    threads = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", 40), ("b", 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {"a", "b"}
    assert all(set(t) >= {"superpixels", "dino", "clip", "scoring"} for _, t in seen.values())
    assert model.last_timings == {}, "another thread's call is not this thread's last call"
    model.segment(image, ["background", "cat"], (40, 40))
    assert set(model.last_timings) >= {"superpixels", "scoring"}
