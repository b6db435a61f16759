"""Tests for losses.classification (SPEC §4, L_cls)."""

from __future__ import annotations

import math

import pytest
import torch

from losses import MultiLabelSoftMargin


def test_known_answer() -> None:
    # Class 1 present with logit 0: −log σ(0) = log 2. Class 2 absent with logit 2: −log(1 − σ(2)) = log(1 + e²).
    # Image 2 (all classes absent, logits 0): log 2 twice. Mean over classes, then over images.
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = ((math.log(2) + math.log(1 + math.e**2)) / 2 + math.log(2)) / 2
    loss = MultiLabelSoftMargin()(logits, labels)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_float32_under_low_precision_input() -> None:
    logits = torch.tensor([[3.0, -3.0, 0.5]], dtype=torch.bfloat16, requires_grad=True)
    loss = MultiLabelSoftMargin()(logits, torch.tensor([[1.0, 0.0, 1.0]]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_degenerate_batches_finite(batch: int) -> None:
    # No foreground at all, and one class only: both finite with a gradient on every logit.
    for num_classes in (1, 4):
        logits = torch.randn(batch, num_classes, requires_grad=True)
        loss = MultiLabelSoftMargin()(logits, torch.zeros(batch, num_classes))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        assert (logits.grad > 0).all()  # every absent class is pushed down


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="logits and labels"):
        MultiLabelSoftMargin()(torch.zeros(2, 3), torch.zeros(2, 4))
