"""tools/reproduce_papers.py: the papers' tables in one command (the micro-world end to end; what the real
benchmarks need, named)."""
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import reproduce_papers  # noqa: E402


def test_each_missing_dataset_and_checkpoint_is_named_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "no_datasets"))
    loads = []
    monkeypatch.setattr(reproduce_papers.train_net, "run", lambda args: loads.append(args))
    rows = reproduce_papers.main(["--method", "freeda", "--output", str(tmp_path / "out")])["freeda"]
    assert [r["benchmark"].config for r in rows] == ["freeda/voc20.yaml", "freeda/context59.yaml",
                                                     "freeda/coco_stuff171.yaml", "freeda/cityscapes.yaml",
                                                     "freeda/ade150.yaml"]
    assert not loads and all(r["ours"] is None and r["why"].startswith("dataset diffseg_") for r in rows)
    assert "no_datasets" in rows[0]["why"]
    table = (tmp_path / "out" / "freeda.md").read_text()
    assert "| Pascal VOC 2012, 20 classes | mIoU | - | - | - | `configs/freeda/voc20.yaml` | dataset diffseg_voc20_val" in table
    assert (tmp_path / "out" / "freeda.png").stat().st_size > 1000
    odise = reproduce_papers.main(["--method", "odise", "--micro", "--output", str(tmp_path / "out")])["odise"]
    assert "ODISE is trained: set MODEL.WEIGHTS" in odise[0]["why"] and not loads
    paper = reproduce_papers.PAPERS["odise"].benchmarks
    assert [(b.metric, b.paper) for b in paper] == [("PQ", 22.6), ("AP", 14.4), ("mIoU", 29.9), ("PQ", 55.4)]


@pytest.mark.slow
def test_the_micro_diffsegmenter_table_is_evaluated_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSEG_D2_MICROWORLD_COUNT", "val=4")
    rows = reproduce_papers.main(["--method", "diffsegmenter", "--micro", "--output", str(tmp_path)])["diffsegmenter"]
    assert len(rows) == 1 and rows[0]["why"] == "" and 0.0 < rows[0]["ours"] <= 100.0
    table = (tmp_path / "diffsegmenter.md").read_text()
    assert f"| micro-world shapes, val | mIoU | - | {rows[0]['ours']:.1f} | - |" in table
    assert (tmp_path / "diffsegmenter.png").stat().st_size > 1000
