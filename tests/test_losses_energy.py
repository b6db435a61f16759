"""Tests for losses.energy (SPEC §4.6, L_reg)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from losses import EnergyLoss


def dense_reference(
    prob: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, ignored: torch.Tensor, r: int, sxy: float, srgb: float
) -> torch.Tensor:
    """The documented energy written pixel by pixel, in float64 (slow, tiny inputs only)."""
    b, c, h, w = prob.shape
    prob, image = prob.double(), image.double()
    total = torch.zeros((), dtype=torch.float64)
    for n, y, x in itertools.product(range(b), range(h), range(w)):
        if not valid[n, y, x]:
            continue
        gate = 1.0 if ignored[n, y, x] else max(1.0 - prob[n, :, y, x].max().item(), 0.0)
        message = torch.zeros(c, dtype=torch.float64)
        for dy, dx in itertools.product(range(-r, r + 1), repeat=2):
            yy, xx = y + dy, x + dx
            if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w) or not valid[n, yy, xx]:
                continue
            colour = (image[n, :, y, x] - image[n, :, yy, xx]).square().sum()
            kernel = torch.exp(-(dy * dy + dx * dx) / (2 * sxy**2) - colour / (2 * srgb**2))
            message += kernel * prob[n, :, yy, xx]
        total += gate * (prob[n, :, y, x] * message).sum()
    return -total / max(int(valid.sum()), 1)


def test_known_answer_one_by_three() -> None:
    # Pixels p0 = (1, 0), p1 = (½, ½), p2 = (0, 1); gates 0, ½, 0 → only pixel 1 counts.
    # r = 1, σ_xy = 1, σ_rgb = 15; I0 = I1 = 0, I2 = (15, 0, 0).
    # K10 = exp(−1/2), K12 = exp(−1/2 − 15²/(2·15²)) = exp(−1); diagonals fall outside the 1×3 image.
    # Σ_c p1c Σ_j K1j pjc = ½·K10·1 + ½·K12·1; N = 3 → L = −½ · ½ (e^−½ + e^−1) / 3.
    prob = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]).reshape(1, 2, 1, 3)
    image = torch.zeros(1, 3, 1, 3)
    image[0, 0, 0, 2] = 15.0
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    ignored = torch.zeros(1, 1, 3, dtype=torch.bool)
    loss = EnergyLoss(kernel_radius=1, sigma_xy=1.0, sigma_rgb=15.0)(prob, image, valid, ignored)
    assert loss.item() == pytest.approx(-0.25 * (math.exp(-0.5) + math.exp(-1.0)) / 3, rel=1e-6)


def test_known_answer_ignored_and_invalid() -> None:
    # Same map, pixel 0 ignored (gate 1) and pixel 2 outside the box (K = 0 towards it, not counted in N = 2).
    # Pixel 0: Σ_c p0c K01 p1c = 1·e^−½·½. Pixel 1: gate ½, neighbours 0 only: ½·(½·e^−½·1) = ¼ e^−½.
    # L = −(½ e^−½ + ¼ e^−½) / 2.
    prob = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]).reshape(1, 2, 1, 3)
    image = torch.zeros(1, 3, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    ignored = torch.tensor([[[True, False, False]]])
    loss = EnergyLoss(kernel_radius=1, sigma_xy=1.0, sigma_rgb=15.0)(prob, image, valid, ignored)
    assert loss.item() == pytest.approx(-0.75 * math.exp(-0.5) / 2, rel=1e-6)


def test_matches_dense_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    prob = torch.softmax(torch.randn(2, 3, 4, 5, generator=gen) * 2, dim=1)
    image = torch.rand(2, 3, 4, 5, generator=gen) * 255
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, :, 3:] = False  # a padded strip
    ignored = (torch.rand(2, 4, 5, generator=gen) > 0.7) & valid
    loss = EnergyLoss(kernel_radius=2, sigma_xy=1.5, sigma_rgb=40.0)(prob, image, valid, ignored)
    expected = dense_reference(prob, image, valid, ignored, r=2, sxy=1.5, srgb=40.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_rewards_agreeing_with_similar_neighbours() -> None:
    # An uncertain pixel between two confident class-0 neighbours of the same colour: descending the loss must
    # raise its class-0 probability (through the softmax logits).
    logits = torch.tensor([[5.0, 0.0, 5.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3).requires_grad_(True)
    args = (torch.zeros(1, 3, 1, 3), torch.ones(1, 1, 3, dtype=torch.bool), torch.zeros(1, 1, 3, dtype=torch.bool))
    EnergyLoss(kernel_radius=1, sigma_xy=1.0)(torch.softmax(logits, dim=1), *args).backward()
    assert logits.grad[0, 0, 0, 1] < 0 < logits.grad[0, 1, 0, 1]


@pytest.mark.parametrize("batch", [1, 3])
def test_nothing_valid_is_connected_zero(batch: int) -> None:
    prob = torch.softmax(torch.randn(batch, 2, 3, 3), dim=1).requires_grad_(True)
    mask = torch.zeros(batch, 3, 3, dtype=torch.bool)
    loss = EnergyLoss(kernel_radius=1)(prob, torch.rand(batch, 3, 3, 3) * 255, mask, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(prob.grad, torch.zeros_like(prob))


def test_confident_single_class_is_zero() -> None:
    # One class: max prob 1 everywhere → gate 0 → exactly 0 with zero gradient.
    prob = torch.ones(2, 1, 3, 4, requires_grad=True)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    loss = EnergyLoss(kernel_radius=1)(prob, torch.rand(2, 3, 3, 4) * 255, valid, ~valid)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(prob.grad, torch.zeros_like(prob))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kernel_radius"):
        EnergyLoss(kernel_radius=0)
    with pytest.raises(ValueError, match="image must be"):
        EnergyLoss()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3), torch.ones(1, 3, 3), torch.ones(1, 3, 3))
