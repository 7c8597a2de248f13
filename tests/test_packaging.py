"""diffseg_d2 as an existing Detectron2 project installs it: a wheel (not editable, not from the clone) in
another environment, its configs reached by name."""
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.model_zoo import get_config_file, list_configs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_shipped_configs_are_reached_by_name():
    assert "diffsegmenter/voc21.yaml" in list_configs() and "micro/diffsegmenter.yaml" in list_configs()
    path = get_config_file("diffsegmenter/voc21_sdxl.yaml")
    assert os.path.samefile(path, os.path.join(ROOT, "configs", "diffsegmenter", "voc21_sdxl.yaml"))
    # A name (with or without the leading configs/) works from any folder, _BASE_ chain included.
    cfg = get_diffseg_cfg("diffsegmenter/voc21_sdxl.yaml")
    assert cfg.MODEL.DIFFSEG.IMAGE_SIZE == 1024 and cfg.MODEL.META_ARCHITECTURE == "DiffSegmenter"
    with pytest.raises(FileNotFoundError, match="No shipped config is named 'nope.yaml'.*diffsegmenter/voc21.yaml"):
        get_config_file("nope.yaml")
    assert get_config_file("configs/tiny/odise.yaml") == get_config_file("tiny/odise.yaml")
    with pytest.raises(FileNotFoundError):
        get_config_file("../setup.py")


@pytest.mark.slow
def test_the_wheel_in_another_environment_segments_with_its_own_configs(tmp_path):
    """Build the wheel, install it (no dependencies) into a fresh virtual environment that already holds
    torch, detectron2 and the rest (this checkout's environment, reached through a path file, whose own
    .pth files, this checkout's editable install among them, are not read), and segment a micro-world scene
    with DefaultPredictor from a folder outside the clone, by config name."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the clone on the path
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    ROOT], check=True, cwd=tmp_path, timeout=600, env=env)
    (wheel,) = wheels.glob("diffseg_d2-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()
    with open(os.path.join(site, "existing_project.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=300, env=env, cwd=tmp_path)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        import diffseg_d2
        assert diffseg_d2.__file__.startswith({str(venv)!r}), diffseg_d2.__file__
        from detectron2.engine import DefaultPredictor
        from diffseg_d2 import get_diffseg_cfg
        from diffseg_d2.microworld.scenes import render_scene, scene_seeds
        cfg = get_diffseg_cfg("micro/diffsegmenter.yaml", ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "()",
                              "MODEL.DIFFSEG.VOCABULARY", "['background', 'circle', 'square', 'triangle', 'cross']"])
        scene = render_scene(scene_seeds("val", 1)[0])
        scores = DefaultPredictor(cfg)(np.ascontiguousarray(scene.image[:, :, ::-1]))["sem_seg"]
        assert scores.shape == (5, 64, 64) and torch.isfinite(scores).all()
        print("segmented", tuple(scores.shape), diffseg_d2.__file__)
    """)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=outside, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "segmented (5, 64, 64)" in proc.stdout
