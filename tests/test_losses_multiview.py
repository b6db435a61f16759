"""Tests for losses.multiview (SMCM, SPEC §4.4)."""

from __future__ import annotations

import pytest
import torch

from losses import MultiViewContrast

EPS = 1e-5  # the max-normalisation constant


def test_zero_when_views_agree_with_main() -> None:
    # Main CAM already normalised as the views will be (x / (max + 1e-5) of a map with max 1): every difference is 0.
    raw = torch.rand(2, 3, 4, 5)
    raw[..., 0, 0] = 1.0  # max 1 in every map
    main = raw / (1.0 + EPS)
    views = torch.stack([raw, raw, raw]).requires_grad_(True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = MultiViewContrast()(views, main, labels, torch.ones(2, 4, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert views.grad.abs().max().item() < 1e-6  # |x|' = sign(x) = 0 at exact agreement


def test_known_answer_simple_disagreement() -> None:
    # One image, one class, 1×2 map, both pixels valid. Main = [1, 0].
    # View 0 raw [1, −3] → ReLU [1, 0] → [a, 0], a = 1/(1+1e-5). View 1 raw [0, 2] → [0, b], b = 2/(2+1e-5).
    # To main: view 0 mean (|a−1| + 0)/2, view 1 mean (1 + b)/2 → averaged over views: (1 − a + 1 + b)/4.
    # Between the single pair: (|a − 0| + |0 − b|)/2 = (a + b)/2.
    a, b = 1 / (1 + EPS), 2 / (2 + EPS)
    views = torch.tensor([[1.0, -3.0], [0.0, 2.0]]).reshape(2, 1, 1, 1, 2)
    main = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    loss = MultiViewContrast()(views, main, torch.ones(1, 1), torch.ones(1, 1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx((2 - a + b) / 4 + (a + b) / 2, rel=1e-6)


def test_only_present_classes_inside_the_box_count() -> None:
    # The same disagreement as above on the valid pixels, plus an absent class and an out-of-box column that
    # disagree wildly: the value must not change.
    a, b = 1 / (1 + EPS), 2 / (2 + EPS)
    views = torch.zeros(2, 1, 2, 1, 3)
    views[:, 0, 0, 0, :2] = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    views[:, 0, 0, 0, 2] = torch.tensor([0.5, 0.0])  # outside the box, below each map's max
    views[:, 0, 1] = torch.rand(2, 1, 3) * 10  # absent class
    main = torch.zeros(1, 2, 1, 3)
    main[0, 0, 0, 0] = 1.0
    valid = torch.tensor([[[True, True, False]]])
    loss = MultiViewContrast()(views, main, torch.tensor([[1.0, 0.0]]), valid)
    assert loss.item() == pytest.approx((2 - a + b) / 4 + (a + b) / 2, rel=1e-6)


def test_main_cam_is_stop_gradient() -> None:
    views = torch.rand(3, 2, 2, 4, 4, requires_grad=True)
    main = torch.rand(2, 2, 4, 4, requires_grad=True)
    MultiViewContrast()(views, main, torch.ones(2, 2), torch.ones(2, 4, 4, dtype=torch.bool)).backward()
    assert main.grad is None
    assert torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_no_foreground_is_connected_zero(batch: int) -> None:
    views = torch.randn(4, batch, 3, 2, 2, requires_grad=True)
    loss = MultiViewContrast()(
        views, torch.rand(batch, 3, 2, 2), torch.zeros(batch, 3), torch.ones(batch, 2, 2, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(views.grad, torch.zeros_like(views))


def test_nothing_inside_the_box_is_connected_zero() -> None:
    views = torch.randn(2, 1, 1, 2, 2, requires_grad=True)
    loss = MultiViewContrast()(views, torch.rand(1, 1, 2, 2), torch.ones(1, 1), torch.zeros(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(views.grad, torch.zeros_like(views))


def test_single_view_and_all_zero_cams_are_finite() -> None:
    # One view (no pairs) whose CAM is negative everywhere → ReLU gives an all-zero map, 0 / 1e-5 = 0.
    views = -torch.rand(1, 3, 1, 2, 2) - 0.1
    views.requires_grad_(True)
    main = torch.full((3, 1, 2, 2), 0.5)
    loss = MultiViewContrast()(views, main, torch.ones(3, 1), torch.ones(3, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # |0 − 0.5| everywhere, no pair term
    assert torch.isfinite(views.grad).all()


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="V >= 1"):
        MultiViewContrast()(torch.zeros(0, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="valid must be"):
        MultiViewContrast()(torch.zeros(2, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1), torch.ones(1, 3, 3))
