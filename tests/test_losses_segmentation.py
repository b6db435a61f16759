"""Tests for losses.segmentation (SPEC §4, L_seg)."""

from __future__ import annotations

import math

import pytest
import torch

from losses import BalancedCrossEntropy
from utils.syncs import count_syncs


def test_known_answer_two_classes() -> None:
    # 1×2×1×3 logits, pixels labelled [0, 1, 255].
    # Pixel 0: logits (0, 0), label 0 → CE = log 2.
    # Pixel 1: logits (0, ln 3), label 1 → p = 3/4 → CE = log(4/3).
    # Pixel 2 is ignored. L = ½·log 2 + ½·log(4/3).
    logits = torch.tensor([[[[0.0, 0.0, 5.0]], [[0.0, math.log(3.0), -5.0]]]])
    target = torch.tensor([[[0, 1, 255]]])
    loss = BalancedCrossEntropy()(logits, target)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4 / 3), rel=1e-6)


def test_groups_are_balanced_not_pixel_weighted() -> None:
    # Three background pixels with CE log 2 and one foreground pixel with CE log(4/3): the plain mean would be
    # (3 log 2 + log 4/3) / 4, the balanced loss is still ½ log 2 + ½ log(4/3).
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 1, 1] = math.log(3.0)
    target = torch.tensor([[[0, 0], [0, 1]]])
    loss = BalancedCrossEntropy()(logits, target)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4 / 3), rel=1e-6)


def test_empty_group_contributes_zero() -> None:
    # Only background; 3 classes with equal logits give CE = log 3 everywhere: ½·log 3 + ½·0.
    loss = BalancedCrossEntropy()(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert loss.item() == pytest.approx(0.5 * math.log(3.0), rel=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_all_ignored_is_connected_zero(batch: int) -> None:
    logits = torch.randn(batch, 4, 3, 5, requires_grad=True)
    loss = BalancedCrossEntropy()(logits, torch.full((batch, 3, 5), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ignored_pixels_get_no_gradient() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 2], [255, 255]]])
    BalancedCrossEntropy()(logits, target).backward()
    assert torch.equal(logits.grad[0, :, 1], torch.zeros(3, 2))
    assert (logits.grad[0, :, 0].abs() > 0).all()


def test_bad_input_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="upsample"):
        BalancedCrossEntropy()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
    # The value check reads the target on the host (a device sync): MSFC_DEBUG=1 only.
    monkeypatch.setenv("MSFC_DEBUG", "1")
    with pytest.raises(ValueError, match=r"0\.\.2 or be 255"):
        BalancedCrossEntropy()(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7))


def test_value_check_reads_nothing_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSFC_DEBUG", raising=False)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 255
    with count_syncs() as counter:
        loss = BalancedCrossEntropy()(logits, target)
    assert counter.total == 0, counter.report()
    monkeypatch.setenv("MSFC_DEBUG", "1")
    with count_syncs() as counter:
        checked = BalancedCrossEntropy()(logits, target)
    assert counter.total == 1 and counter.by_kind == {"__bool__": 1}
    assert torch.equal(checked, loss)  # same value, checked
    monkeypatch.delenv("MSFC_DEBUG")
    # Without the check, an out-of-range target is still an error on CPU (PyTorch's own; a device assert on CUDA).
    with pytest.raises((IndexError, RuntimeError)):
        BalancedCrossEntropy()(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7))
