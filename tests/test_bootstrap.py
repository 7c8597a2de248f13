"""Bootstrap intervals over images (diffseg_d2.evaluation.bootstrap)."""
import numpy as np
import pytest
import torch

from diffseg_d2.evaluation.bootstrap import (
    PER_IMAGE_FILE,
    bootstrap_difference,
    bootstrap_miou,
    bootstrap_weights,
    excludes_zero,
    load_per_image_confusion,
    miou_from_confusion,
)


def _confusion(pred, gt, classes):
    """(K+1, K+1) [pred, gt] with ignore (255) in the last column, as SemSegEvaluator counts."""
    gt = np.where(gt == 255, classes, gt)
    return np.bincount((classes + 1) * pred.ravel() + gt.ravel(), minlength=(classes + 1) ** 2).reshape(
        classes + 1, classes + 1)


def _images(rng, n, classes, accuracy):
    """n random 16x16 label maps and predictions right on about ``accuracy`` of the pixels."""
    gts = rng.integers(0, classes, (n, 16, 16))
    wrong = rng.random((n, 16, 16)) > accuracy
    preds = np.where(wrong, rng.integers(0, classes, (n, 16, 16)), gts)
    return preds, gts


def test_miou_matches_detectron2s_sem_seg_evaluator(tmp_path):
    """Point estimate = SemSegEvaluator's mIoU, also with ignore pixels and a class absent from the GT."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    from diffseg_d2.evaluation.bootstrap import PerImageSemSegEvaluator

    rng = np.random.default_rng(0)
    preds, gts = _images(rng, 5, 4, 0.6)
    gts[gts == 3] = 1  # class 3 never in the ground truth (but predicted)
    gts[:, :2] = 255  # ignored rows
    records = []
    for i, gt in enumerate(gts):
        Image.fromarray(gt.astype(np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"file_name": f"img{i}.jpg", "sem_seg_file_name": str(tmp_path / f"{i}.png")})
    name = "test_bootstrap_dataset"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c", "d"], ignore_label=255, evaluator_type="sem_seg")
    evaluator = PerImageSemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "out"))
    evaluator.reset()
    for record, pred in zip(records, preds):
        scores = torch.nn.functional.one_hot(torch.from_numpy(pred), 4).permute(2, 0, 1).float()
        evaluator.process([{"file_name": record["file_name"]}], [{"sem_seg": scores}])
    expected = evaluator.evaluate()["sem_seg"]["mIoU"]

    names, confusion = load_per_image_confusion(str(tmp_path / "out" / PER_IMAGE_FILE))
    assert list(names) == [r["file_name"] for r in records]
    np.testing.assert_array_equal(confusion[2], _confusion(preds[2], gts[2], 4))
    assert float(miou_from_confusion(confusion.sum(0))) == pytest.approx(expected, abs=1e-9)


def test_the_interval_holds_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 320):
        preds, gts = _images(rng, n, 3, 0.7)
        per_image = np.stack([_confusion(p, g, 3) for p, g in zip(preds, gts)])
        point, low, high = bootstrap_miou(per_image, bootstrap_weights(n, 500))
        assert low <= point <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) as wide


def test_paired_difference_separates_a_real_effect_from_none():
    rng = np.random.default_rng(2)
    preds, gts = _images(rng, 50, 3, 0.7)
    base = np.stack([_confusion(p, g, 3) for p, g in zip(preds, gts)])
    weights = bootstrap_weights(50, 500)
    same = bootstrap_difference(base, base, weights)
    assert same == (0.0, 0.0, 0.0) and not excludes_zero(same)
    # Better on every image: every wrong pixel of image i is put right.
    better = np.stack([_confusion(gts[i], gts[i], 3) for i in range(50)])
    diff = bootstrap_difference(better, base, weights)
    assert diff[0] > 0 and excludes_zero(diff)
    with pytest.raises(ValueError, match="same images"):
        bootstrap_difference(base[:10], base, weights)
