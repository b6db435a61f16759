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


def smc_terms(
    view_cams: torch.Tensor, main_cam: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> tuple[list[float], list[float]]:
    """SPEC §4.4 term by term in plain Python floats: ([m(v, main) for v], [m(v, w) for v < w]).

    Each view map is ReLU'd and divided by its maximum + 1e-5; m is the mean |difference| over the present-class
    pixels inside the box, pooled over the batch.
    """
    num_views, b, c, h, w = view_cams.shape
    raw, main, lab, box = view_cams.tolist(), main_cam.tolist(), labels.tolist(), valid.tolist()
    views = []
    for v in range(num_views):
        maps = []
        for n in range(b):
            per_class = []
            for k in range(c):
                relu = [[max(x, 0.0) for x in row] for row in raw[v][n][k]]
                peak = max(max(row) for row in relu)
                per_class.append([[x / (peak + EPS) for x in row] for row in relu])
            maps.append(per_class)
        views.append(maps)
    cells = [(n, k, y, x) for n in range(b) for k in range(c) for y in range(h) for x in range(w)]
    cells = [(n, k, y, x) for n, k, y, x in cells if lab[n][k] > 0 and box[n][y][x]]

    def mean_abs(first: list, second: list) -> float:
        return sum(abs(first[n][k][y][x] - second[n][k][y][x]) for n, k, y, x in cells) / max(len(cells), 1)

    to_main = [mean_abs(views[v], main) for v in range(num_views)]
    pairs = [mean_abs(views[v], views[u]) for v in range(num_views) for u in range(v + 1, num_views)]
    return to_main, pairs


def random_case(num_views: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = 2, C_fg = 3, 4×5 maps, an absent class per image and an out-of-box strip."""
    gen = torch.Generator().manual_seed(seed)
    views = torch.randn(num_views, 2, 3, 4, 5, generator=gen)
    main = torch.rand(2, 3, 4, 5, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, :, 3:] = False
    return views, main, labels, valid


def test_known_answer_three_views() -> None:
    # V = 3: 3 view-vs-main + 3 view-vs-view terms; all_terms = their mean (SPEC §4.4).
    views, main, labels, valid = random_case(3)
    to_main, pairs = smc_terms(views, main, labels, valid)
    assert len(to_main) == len(pairs) == 3
    all_terms = MultiViewContrast()(views, main, labels, valid)
    group_sum = MultiViewContrast(reduction="group_sum")(views, main, labels, valid)
    assert all_terms.item() == pytest.approx(sum(to_main + pairs) / 6, rel=1e-6)
    assert group_sum.item() == pytest.approx(sum(to_main) / 3 + sum(pairs) / 3, rel=1e-6)
    # Both groups hold 3 terms when V = 3, so the group sum is exactly twice the single mean.
    assert group_sum.item() == pytest.approx(2 * all_terms.item(), rel=1e-6)
    to_main_only = MultiViewContrast(reduction="to_main")(views, main, labels, valid)
    assert to_main_only.item() == pytest.approx(sum(to_main) / 3, rel=1e-6)


def test_known_answer_two_views_is_not_half_the_group_sum() -> None:
    # V = 2: 2 view-vs-main terms and 1 pair, so all_terms = (m0 + m1 + m01) / 3, not (m̄ + m01) / 2.
    views, main, labels, valid = random_case(2, seed=1)
    (m0, m1), (m01,) = smc_terms(views, main, labels, valid)
    assert MultiViewContrast()(views, main, labels, valid).item() == pytest.approx((m0 + m1 + m01) / 3, rel=1e-6)
    group_sum = MultiViewContrast(reduction="group_sum")(views, main, labels, valid)
    assert group_sum.item() == pytest.approx((m0 + m1) / 2 + m01, rel=1e-6)


@pytest.mark.parametrize("reduction", ["all_terms", "group_sum", "to_main"])
def test_single_view_is_the_view_to_main_term(reduction: str) -> None:
    views, main, labels, valid = random_case(1, seed=2)
    (m0,), pairs = smc_terms(views, main, labels, valid)
    assert pairs == []
    loss = MultiViewContrast(reduction=reduction)(views, main, labels, valid)
    assert loss.item() == pytest.approx(m0, rel=1e-6)


# One image, one class, 1×2 map, both pixels valid. Main = [1, 0].
# View 0 raw [1, −3] → ReLU [1, 0] → [a, 0], a = 1/(1+1e-5). View 1 raw [0, 2] → [0, b], b = 2/(2+1e-5).
# To main: view 0 (|a−1| + 0)/2, view 1 (1 + b)/2. Between the single pair: (|a − 0| + |0 − b|)/2 = (a + b)/2.
# all_terms: ((1 − a)/2 + (1 + b)/2 + (a + b)/2) / 3 = (1 + b)/3.
# group_sum: ((1 − a)/2 + (1 + b)/2)/2 + (a + b)/2 = (2 − a + b)/4 + (a + b)/2.
# to_main: ((1 − a)/2 + (1 + b)/2)/2 = (2 − a + b)/4.
A, B = 1 / (1 + EPS), 2 / (2 + EPS)
SIMPLE_EXPECTED = {"all_terms": (1 + B) / 3, "group_sum": (2 - A + B) / 4 + (A + B) / 2, "to_main": (2 - A + B) / 4}


@pytest.mark.parametrize("reduction", ["all_terms", "group_sum", "to_main"])
def test_known_answer_simple_disagreement(reduction: str) -> None:
    views = torch.tensor([[1.0, -3.0], [0.0, 2.0]]).reshape(2, 1, 1, 1, 2)
    main = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    loss = MultiViewContrast(reduction)(views, main, torch.ones(1, 1), torch.ones(1, 1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(SIMPLE_EXPECTED[reduction], rel=1e-6)


@pytest.mark.parametrize("reduction", ["all_terms", "group_sum", "to_main"])
def test_only_present_classes_inside_the_box_count(reduction: str) -> None:
    # The same disagreement as above on the valid pixels, plus an absent class and an out-of-box column that
    # disagree wildly: the value must not change.
    views = torch.zeros(2, 1, 2, 1, 3)
    views[:, 0, 0, 0, :2] = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    views[:, 0, 0, 0, 2] = torch.tensor([0.5, 0.0])  # outside the box, below each map's max
    views[:, 0, 1] = torch.rand(2, 1, 3) * 10  # absent class
    main = torch.zeros(1, 2, 1, 3)
    main[0, 0, 0, 0] = 1.0
    valid = torch.tensor([[[True, True, False]]])
    loss = MultiViewContrast(reduction)(views, main, torch.tensor([[1.0, 0.0]]), valid)
    assert loss.item() == pytest.approx(SIMPLE_EXPECTED[reduction], rel=1e-6)


def test_main_cam_is_stop_gradient() -> None:
    views = torch.rand(3, 2, 2, 4, 4, requires_grad=True)
    main = torch.rand(2, 2, 4, 4, requires_grad=True)
    MultiViewContrast()(views, main, torch.ones(2, 2), torch.ones(2, 4, 4, dtype=torch.bool)).backward()
    assert main.grad is None
    assert torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["all_terms", "group_sum", "to_main"])
@pytest.mark.parametrize("batch", [1, 3])
def test_no_foreground_is_connected_zero(batch: int, reduction: str) -> None:
    views = torch.randn(4, batch, 3, 2, 2, requires_grad=True)
    loss = MultiViewContrast(reduction)(
        views, torch.rand(batch, 3, 2, 2), torch.zeros(batch, 3), torch.ones(batch, 2, 2, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(views.grad, torch.zeros_like(views))


def test_nothing_inside_the_box_is_connected_zero() -> None:
    views = torch.randn(2, 1, 1, 2, 2, requires_grad=True)
    loss = MultiViewContrast()(views, torch.rand(1, 1, 2, 2), torch.ones(1, 1), torch.zeros(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(views.grad, torch.zeros_like(views))


@pytest.mark.parametrize("reduction", ["all_terms", "group_sum", "to_main"])
def test_single_view_and_all_zero_cams_are_finite(reduction: str) -> None:
    # One view (no pairs) whose CAM is negative everywhere → ReLU gives an all-zero map, 0 / 1e-5 = 0.
    views = -torch.rand(1, 3, 1, 2, 2) - 0.1
    views.requires_grad_(True)
    main = torch.full((3, 1, 2, 2), 0.5)
    loss = MultiViewContrast(reduction)(views, main, torch.ones(3, 1), torch.ones(3, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # |0 − 0.5| everywhere, no pair term
    assert torch.isfinite(views.grad).all()


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="V >= 1"):
        MultiViewContrast()(torch.zeros(0, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="valid must be"):
        MultiViewContrast()(torch.zeros(2, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1), torch.ones(1, 3, 3))


def test_invalid_reduction_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="reduction must be one of all_terms, group_sum, to_main, got 'mean'"):
        MultiViewContrast(reduction="mean")
