"""Tests for the one CAM -> hard label rule of core/labels.py (cam_label) and its one-pass threshold sweep (§5.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.labels import CamThresholdSweep, cam_label
from core.pseudo_labels import score_stacks
from utils.metrics import ConfusionMatrix

# ----------------------------------------------------------------------------------------------------------------------
# cam_label
# ----------------------------------------------------------------------------------------------------------------------


def test_cam_label_tie_rules() -> None:
    cams = np.array([[[0.5, 0.49, 0.7]], [[0.2, 0.3, 0.7]]], dtype=np.float32)  # [K=2, 1, 3]
    classes = np.array([3, 5])
    # Pixel 0: max 0.5 == threshold -> background wins the tie. Pixel 1: 0.49 < 0.5 -> background.
    # Pixel 2: both classes 0.7 -> the first maximum, class 3.
    np.testing.assert_array_equal(cam_label(cams, classes, 0.5), [[0, 0, 3]])
    np.testing.assert_array_equal(cam_label(cams, classes, 0.45), [[3, 3, 3]])
    np.testing.assert_array_equal(cam_label(cams, classes, 0.0), [[3, 3, 3]])
    np.testing.assert_array_equal(cam_label(torch.from_numpy(cams), torch.tensor([3, 5]), 0.5), [[0, 0, 3]])
    empty = cam_label(np.zeros((0, 2, 2), np.float32), np.zeros(0, int), 0.1)
    assert empty.dtype == np.uint8 and empty.shape == (2, 2) and not empty.any()
    with pytest.raises(ValueError, match="cams must be"):
        cam_label(cams, np.array([3]), 0.5)
    with pytest.raises(ValueError, match="foreground ids"):
        cam_label(cams, np.array([0, 1]), 0.5)
    with pytest.raises(ValueError, match=r"background must be a number or \[H, W\]"):
        cam_label(cams, classes, np.zeros((2, 3)))


def test_cam_label_refuses_class_ids_a_uint8_map_cannot_hold_apart_from_the_ignore_index() -> None:
    cams = np.ones((1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="ignore index 255"):
        cam_label(cams, np.array([255]), 0.5)
    with pytest.raises(ValueError, match="ignore index 254"):
        cam_label(cams, np.array([254]), 0.5, ignore_index=254)
    np.testing.assert_array_equal(cam_label(cams, np.array([254]), 0.5), np.full((2, 2), 254))


def test_cam_label_with_a_per_pixel_background_is_the_first_argmax_of_the_stack() -> None:
    # Refined probability stacks are labelled by cam_label(stack[1:], classes, stack[0]): it must equal the arg-max
    # over [background, classes...] with the first of equal maxima winning (background first), ties included.
    gen = torch.Generator().manual_seed(0)
    classes = np.array([2, 7, 9])
    for _ in range(20):
        stack = (torch.randint(0, 5, (4, 6, 7), generator=gen) / 4.0).float()  # a coarse grid: many ties
        expected = np.array([0, *classes], dtype=np.uint8)[stack.argmax(dim=0).numpy()]
        np.testing.assert_array_equal(cam_label(stack[1:], classes, stack[0]), expected)
        np.testing.assert_array_equal(cam_label(stack[1:].numpy(), classes, stack[0].numpy()), expected)


def test_exact_comparison_equals_the_float32_background_plane_for_float16_cams() -> None:
    # Until the one rule, the offline pseudo labels took the arg-max of a float32 stack (background plane float32(t)),
    # while CAM evaluation compared float64(v) > t. For float16 CAMs (the saved files) the two can only differ where
    # float32(t) > t is itself a float16 value; no threshold with at most 6 decimals in [-1, 2] is such a value.
    thresholds = np.arange(-1_000_000, 2_000_001) / 1e6
    as_float32 = thresholds.astype(np.float32).astype(np.float64)
    as_float16 = as_float32.astype(np.float16).astype(np.float64)
    assert not ((as_float32 > thresholds) & (as_float16 == as_float32)).any()
    # ... and directly, with CAM values on and next to the thresholds
    rng = np.random.default_rng(4)
    classes = np.array([1, 4])
    for t in (0.05, 0.25, 0.3, 0.45, 0.5, 0.55, 0.7, 0.95):
        near = np.array([np.nextafter(np.float16(t), np.float16(0)), np.float16(t), np.nextafter(np.float16(t), 1)])
        cams = rng.choice(np.concatenate([near, rng.random(8).astype(np.float16)]), (2, 5, 6)).astype(np.float16)
        old = np.array([0, *classes], np.uint8)[score_stacks(cams.astype(np.float32), (t,))[0].argmax(0).numpy()]
        np.testing.assert_array_equal(cam_label(cams, classes, t), old, err_msg=f"threshold {t}")


# ----------------------------------------------------------------------------------------------------------------------
# CamThresholdSweep
# ----------------------------------------------------------------------------------------------------------------------


def _random_case(rng: np.random.Generator, num_fg: int, shape: tuple[int, int]) -> tuple:
    k = int(rng.integers(0, 4))
    classes = np.sort(rng.choice(np.arange(1, num_fg + 1), size=k, replace=False))
    # CAM values on a 1/8 grid so that several pixels equal a threshold exactly (tie rule) and classes tie.
    cams = (rng.integers(0, 9, (k, *shape)) / 8.0).astype(np.float32)
    gt = rng.integers(0, num_fg + 1, shape)
    gt[rng.random(shape) < 0.15] = 255
    return cams, classes, gt


def test_sweep_matches_cam_label_at_every_threshold() -> None:
    # The vectorised sweep must give exactly the confusion matrix of the one rule (cam_label) at each threshold.
    rng = np.random.default_rng(2)
    num_classes = 5
    thresholds = [0.5, 0.0, 0.25, 0.3, 0.625, 1.0, 0.25, 0.55]  # unsorted, a duplicate, grid and off-grid values
    sweep = CamThresholdSweep(num_classes, thresholds)
    np.testing.assert_array_equal(sweep.thresholds, [0.0, 0.25, 0.3, 0.5, 0.55, 0.625, 1.0])
    cases = [_random_case(rng, num_classes - 1, (6, 7)) for _ in range(6)]
    cases.append((np.zeros((0, 6, 7), np.float32), np.zeros(0, int), rng.integers(0, num_classes, (6, 7))))
    # float16 CAMs: 0.3 is not representable, the comparison must be the same in both paths.
    cases.append((np.full((1, 6, 7), 0.3, np.float16), np.array([2]), rng.integers(0, num_classes, (6, 7))))
    # float32 CAMs exactly at float32(0.55) > 0.55: foreground at 0.55 in both (the comparison is exact).
    cases.append((np.full((1, 6, 7), 0.55, np.float32), np.array([3]), rng.integers(0, num_classes, (6, 7))))
    for cams, classes, gt in cases:
        sweep.update(cams, classes, gt)
    confusions = sweep.confusions()
    assert confusions.shape == (7, num_classes, num_classes) and confusions.dtype == np.int64
    for i, t in enumerate(sweep.thresholds):
        reference = ConfusionMatrix(num_classes)
        for cams, classes, gt in cases:
            reference.update(cam_label(cams, classes, float(t)), gt)
        np.testing.assert_array_equal(confusions[i], reference.matrix, err_msg=f"threshold {t}")
    # The threshold changes the answer (the test would not notice a sweep that ignores it otherwise).
    assert not np.array_equal(confusions[0], confusions[-1])
    # At threshold 1.0 no CAM value (max 1.0) is strictly above it: everything is background.
    assert confusions[-1][:, 1:].sum() == 0


def test_sweep_best_known_answer() -> None:
    # gt [1, 0], class-1 CAM [0.8, 0.4]:
    #   t=0.2 -> pred [1, 1]: IoU_0 = 0/1, IoU_1 = 1/2 -> mIoU 0.25
    #   t=0.5 -> pred [1, 0]: both IoU 1 -> mIoU 1.0
    #   t=0.9 -> pred [0, 0]: IoU_0 = 1/2, IoU_1 = 0 -> mIoU 0.25
    sweep = CamThresholdSweep(3, [0.2, 0.5, 0.9])
    sweep.update(torch.tensor([[[0.8, 0.4]]]), torch.tensor([1]), torch.tensor([[1, 0]]))
    results = sweep.results()
    assert [r["miou"] for r in results] == pytest.approx([0.25, 1.0, 0.25])
    assert [r["threshold"] for r in results] == pytest.approx([0.2, 0.5, 0.9])
    threshold, best = sweep.best()
    assert threshold == pytest.approx(0.5) and best["miou"] == pytest.approx(1.0)


def test_sweep_merge_and_all_reduce() -> None:
    rng = np.random.default_rng(3)
    cases = [_random_case(rng, 3, (4, 5)) for _ in range(4)]
    whole, first, second = (CamThresholdSweep(4, [0.25, 0.5]) for _ in range(3))
    for i, case in enumerate(cases):
        whole.update(*case)
        (first if i < 2 else second).update(*case)
    first.merge(second).all_reduce()
    np.testing.assert_array_equal(first.confusions(), whole.confusions())
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(CamThresholdSweep(4, [0.25]))


def test_sweep_rejects_bad_input() -> None:
    sweep = CamThresholdSweep(3, [0.5])
    with pytest.raises(ValueError, match="classes contains class id 4"):
        sweep.update(np.ones((1, 2, 2), np.float32), np.array([4]), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="NaN"):
        sweep.update(np.full((1, 2, 2), np.nan, np.float32), np.array([1]), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"but gt is \(3, 2\)"):
        sweep.update(np.ones((1, 2, 2), np.float32), np.array([1]), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="thresholds"):
        CamThresholdSweep(3, [])
    with pytest.raises(ValueError, match="no labelled pixels"):
        sweep.best()
