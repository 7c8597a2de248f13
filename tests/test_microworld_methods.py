"""FreeDA and ODISE on the micro-world, through the commands in configs/micro/*.yaml (shortened).

tools/benchmark_quality.py runs the same commands at full size; here they run on a few
scenes with a few steps, so that the benchmark's FreeDA and ODISE rows cannot rot unseen.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MICRO = os.path.join(ROOT, "configs", "micro")


def _run(args, **env):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2", **env)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_micro_freeda_bank_from_train_captions_then_evaluation(tmp_path):
    captions, bank = tmp_path / "captions.txt", tmp_path / "bank"
    _run(["tools/make_microworld.py", "--splits", "--count", "6", "--captions", str(captions)])
    lines = captions.read_text().splitlines()
    assert len(lines) == 6 and all(line.startswith("a ") for line in lines)

    _run(["tools/build_freeda_bank.py", "--config-file", os.path.join(MICRO, "freeda.yaml"), "--captions",
          str(captions), "--output", str(bank), "--no-progress", "MODEL.DIFFSEG.FREEDA.BUILD.STEPS", "3",
          "MODEL.DIFFSEG.FREEDA.BUILD.SHARD_SIZE", "3"])
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["counts"]["captions"] == 6 and manifest["counts"]["prototypes"] > 0

    proc = _run(["tools/train_net.py", "--config-file", os.path.join(MICRO, "freeda.yaml"), "--eval-only",
                 "MODEL.DIFFSEG.FREEDA.BANK", str(bank), "OUTPUT_DIR", str(tmp_path / "eval")],
                DIFFSEG_D2_MICROWORLD_COUNT="val=3")
    assert "diffseg_microworld_shapes_val [sem_seg]" in proc.stdout and "| mIoU " in proc.stdout


@pytest.mark.slow
def test_micro_odise_trains_on_the_panoptic_train_split_and_reports_pq(tmp_path):
    out = tmp_path / "odise"
    proc = _run(["tools/train_net.py", "--config-file", os.path.join(MICRO, "odise.yaml"), "SOLVER.MAX_ITER", "2",
                 "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out)],
                DIFFSEG_D2_MICROWORLD_COUNT="train=8,val=3")
    assert (out / "model_final.pth").is_file()
    # The final evaluation on the held-out panoptic split: PQ and mIoU from detectron2's evaluators.
    assert "diffseg_microworld_panoptic_val [panoptic_seg]" in proc.stdout
    assert "| PQ " in proc.stdout and "| mIoU " in proc.stdout
