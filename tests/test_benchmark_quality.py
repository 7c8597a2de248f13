"""tools/benchmark_quality.py: the micro-world quality table, as a user runs it (on a few scenes)."""
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark_quality  # noqa: E402

from diffseg_d2.evaluation import format_results_table  # noqa: E402


def test_metrics_are_read_back_from_train_nets_table():
    text = format_results_table({
        "d_val": {"sem_seg": {"mIoU": 12.345, "fwIoU": 50.0, "IoU-circle": 1.5}},
        "p_val": {"panoptic_seg": {"PQ": 7.25, "SQ": 70.0}, "sem_seg": {"mIoU": 33.0}},
    })
    assert benchmark_quality.read_metric(text, "d_val", "sem_seg", "mIoU") == 12.35
    assert benchmark_quality.read_metric(text, "p_val", "panoptic_seg", "PQ") == 7.25
    assert benchmark_quality.read_metric(text, "p_val", "sem_seg", "mIoU") == 33.0
    assert benchmark_quality.read_metric(text, "d_val", "panoptic_seg", "PQ") is None
    assert benchmark_quality.read_metric(text, "missing", "sem_seg", "mIoU") is None


def _all_background_miou(dataset) -> float:
    """mIoU of predicting background everywhere, by hand: background's IoU is its share of the
    pixels; every other class present in the ground truth scores 0; absent classes do not count."""
    from detectron2.data import DatasetCatalog

    labels = np.stack([np.asarray(Image.open(r["sem_seg_file_name"])) for r in DatasetCatalog.get(dataset)])
    present = [c for c in np.unique(labels) if c not in (0, 255)]
    return 100.0 * float((labels == 0).sum()) / labels.size / (1 + len(present))


@pytest.mark.slow
def test_the_table_is_written_with_baselines_a_method_row_and_a_failed_row(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSEG_D2_MICROWORLD_COUNT", "val=6")
    broken = benchmark_quality.Row("DiffSegmenter, weights that do not exist", benchmark_quality.DIFFSEGMENTER,
                                   ["MODEL.DIFFSEG.SD.WEIGHTS", str(tmp_path / "nowhere")])
    monkeypatch.setattr(benchmark_quality, "ROWS", benchmark_quality.ROWS + [broken])
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nText that stays.\n")

    rows = {label: result for label, result, _ in benchmark_quality.main(
        ["--count", "6", "--rows", "paper configs", "cross-attention only", "do not exist", "--write", str(target)])}

    reference = benchmark_quality.DIFFSEG_REF
    label = "DiffSegmenter, reference mode, cross-attention only (no refinement)"
    assert list(rows) == [
        "all background", "random class per pixel", reference, label, "DiffSegmenter, weights that do not exist"]
    shapes, colours = benchmark_quality.semseg_datasets("val")
    for dataset in (shapes, colours):
        assert abs(rows["all background"][dataset] - _all_background_miou(dataset)) < 1e-6
    method = rows[label]
    assert set(method) == {shapes, colours, "per_image"} and all(0 <= method[d] <= 100 for d in (shapes, colours))
    # Per-scene confusion matrices of the 6 scenes, summing to the evaluator's mIoU.
    from diffseg_d2.evaluation.bootstrap import miou_from_confusion

    names, confusion = method["per_image"][shapes]
    assert len(names) == 6 and confusion.shape == (6, 6, 6)
    assert abs(float(miou_from_confusion(confusion.sum(0))) - method[shapes]) < 0.006  # the table rounds to 0.01
    assert "nowhere" in rows["DiffSegmenter, weights that do not exist"]["error"]

    text = target.read_text()
    assert text.startswith("# Benchmarks\n\nText that stays.\n")
    assert "6 val scenes per dataset" in text
    # Each value with its interval; the departure row also with its difference from reference mode.
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    assert f"| {label} | {method[shapes]:.1f} [" in row
    ref = rows[reference]
    shapes_cell = row.split("|")[2]
    diff = re.search(r"; ([+-][0-9.]+) \[([+-][0-9.]+), ([+-][0-9.]+)\]", shapes_cell)
    assert diff, shapes_cell
    assert abs(float(diff.group(1)) - (method[shapes] - ref[shapes])) < 0.06
    assert float(diff.group(2)) <= float(diff.group(1)) <= float(diff.group(3))
    assert "| DiffSegmenter, weights that do not exist | failed: " in text


def test_an_unknown_row_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        benchmark_quality.main(["--rows", "no such method"])
    assert "no row matches" in capsys.readouterr().err
