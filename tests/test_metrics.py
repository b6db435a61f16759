"""Tests for utils/metrics.py: confusion matrix metrics (SPEC §5.3) and their table (the CAM threshold sweep:
tests/test_cam_label.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, compute_metrics, format_table

# A 4-class example (0 background, 1, 2, and 3 which is predicted once but has no ground truth).
GT = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 1], [2, 3, 0, 0]])
# Kept (gt, pred) pairs, the 255 pixel skipped: (0,0) (0,1) (1,1) (1,1) (2,2) (2,3) (1,0).
EXPECTED_MATRIX = np.array([[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])


def test_confusion_matrix_known_answer() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    np.testing.assert_array_equal(cm.matrix, EXPECTED_MATRIX)
    assert cm.matrix.dtype == np.int64
    r = cm.compute()
    # TP = [1, 2, 1, 0], GT counts = [2, 3, 2, 0], predicted counts = [2, 3, 1, 1]
    # FP = [1, 1, 0, 1], FN = [1, 1, 1, 0], union = [3, 4, 2, 1]
    assert r["iou"][:3] == pytest.approx([1 / 3, 2 / 4, 1 / 2])
    assert r["iou"][3] is None  # no GT pixel of class 3
    # mIoU over the 3 classes with GT: (1/3 + 1/2 + 1/2) / 3 = 4/9; over all 4 (class 3 as 0) it would be 1/3.
    assert r["miou"] == pytest.approx(4 / 9)
    assert r["present"] == [0, 1, 2]
    assert r["num_pixels"] == 7
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    assert r["recall"][:3] == pytest.approx([1 / 2, 2 / 3, 1 / 2]) and r["recall"][3] is None
    assert r["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert r["precision"] == pytest.approx([1 / 2, 2 / 3, 1.0, 0.0])
    assert r["fp_share"] == pytest.approx([1 / 3, 1 / 4, 0.0, 1.0])
    assert r["fn_share"] == pytest.approx([1 / 3, 1 / 4, 1 / 2, 0.0])
    json.dumps(r)  # JSON-friendly: None, not NaN, and plain Python numbers


def test_confusion_matrix_accepts_torch_and_batches() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(PRED)[None].to(torch.uint8), torch.from_numpy(GT)[None])
    np.testing.assert_array_equal(cm.matrix, EXPECTED_MATRIX)


def test_shares_and_iou_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(5)
    cm.update(rng.integers(0, 5, (6, 7)), rng.integers(0, 5, (6, 7)))
    r = cm.compute()
    for c in r["present"]:
        assert r["iou"][c] + r["fp_share"][c] + r["fn_share"][c] == pytest.approx(1.0)


def test_out_of_range_prediction_rejected() -> None:
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match=r"pred contains class id 7, outside the valid range 0\.\.3"):
        cm.update(np.array([[0, 7]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"gt .* class id 9"):
        cm.update(np.array([[0, 1]]), np.array([[0, 9]]))
    with pytest.raises(ValueError, match=r"pred contains class id -1"):
        cm.update(np.array([[0, -1]]), np.array([[0, 1]]))
    assert cm.matrix.sum() == 0  # a rejected update leaves the matrix untouched


def test_prediction_at_ignored_pixel_is_skipped() -> None:
    # The pixel with gt 255 is skipped entirely, so its (out-of-range) prediction 255 is not an error.
    cm = ConfusionMatrix(2)
    cm.update(np.array([1, 255]), np.array([1, 255]))
    np.testing.assert_array_equal(cm.matrix, [[0, 0], [0, 1]])


def test_shape_and_dtype_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"pred \(2, 3\) and gt \(3, 2\)"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(TypeError, match="pred must hold integer"):
        cm.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)


def test_merge_equals_update_on_concatenated_data() -> None:
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 6, (5, 8)) for _ in range(3)]
    gts = [np.where(rng.random((5, 8)) < 0.2, 255, rng.integers(0, 6, (5, 8))) for _ in range(3)]
    whole = ConfusionMatrix(6)
    whole.update(np.concatenate(preds, axis=1), np.concatenate(gts, axis=1))
    parts = [ConfusionMatrix(6) for _ in range(3)]
    for part, pred, gt in zip(parts, preds, gts, strict=True):
        part.update(pred, gt)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.matrix.sum() == sum(int((g != 255).sum()) for g in gts)
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(ConfusionMatrix(5))


def test_all_reduce_is_identity_in_one_process() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    cm.all_reduce()
    np.testing.assert_array_equal(cm.matrix, EXPECTED_MATRIX)
    assert cm.matrix.dtype == np.int64


def test_empty_matrix_has_no_miou() -> None:
    r = compute_metrics(np.zeros((3, 3), np.int64))
    assert r["miou"] is None and r["pixel_acc"] is None and r["present"] == [] and r["num_pixels"] == 0


def test_format_table() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    table = format_table(cm.compute(), ["background", "cat", "dog", "unicorn"])
    lines = table.splitlines()
    assert len(lines) == 1 + 4 + 1  # header, one row per class, summary
    assert lines[2].split()[:2] == ["cat", "50.00"]
    assert lines[4].split()[:2] == ["unicorn", "-"]  # no GT: IoU undefined
    assert "mIoU 44.44 over 3 classes" in lines[-1]
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        format_table(cm.compute(), ["a", "b", "c"])
