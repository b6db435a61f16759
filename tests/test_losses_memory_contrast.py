"""Tests for losses.memory_contrast (MP2M, SPEC §4.5)."""

from __future__ import annotations

import math

import pytest
import torch

from losses import MemoryContrast, PatchTokenContrast, adaptive_memory_weight

FULL_BOX = torch.tensor([[0, 32, 0, 32]])
SIZE = (32, 32)  # a 2×2 token grid over a 32×32 crop: token centres at 8 and 24


def hand_tokens() -> torch.Tensor:
    """`[1, 2, 2, 2]` tokens F0 = e1, F1 = 2·e1, F2 = e2, F3 = −e2 (row-major 2×2 grid)."""
    return torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]).T.reshape(1, 2, 2, 2)


def test_known_answer_from_a_hand_made_bank() -> None:
    # Bank: class 1 prototype m1 = e1 (initialised, present); class 2 absent → S_2 = 0.
    # S_1 = ReLU(cos(F, m1)) = [1, 1, 0, −0 → 0], max-normalised by 1 + 1e-5 → [≈1, ≈1, 0, 0].
    # Token labels (high 0.7, low 0.25): [1, 1, 0, 0] → the PTC value of that grid: |P| = 4 with s = 1,
    # |N| = 8 with s = 0 → ½(1 − 4/5) = 0.1.
    tokens = hand_tokens()
    flat = torch.nn.functional.normalize(tokens.flatten(2), dim=1)  # [1, D, N]
    bank = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    cos = torch.einsum("cd,bdn->bcn", bank, flat).relu()
    cos[:, 1] = 0.0  # absent class
    sim = (cos / (cos.amax(dim=2, keepdim=True) + 1e-5)).reshape(1, 2, 2, 2)
    loss = MemoryContrast(high=0.7, low=0.25)(tokens, sim, FULL_BOX, SIZE)
    assert loss.item() == pytest.approx(0.1, abs=1e-6)


def test_known_answer_with_ignore_band() -> None:
    # S: token 0 class 1 at 0.9, token 1 class 1 at 0.8, token 2 class 2 at 0.5 (in (low, high] → ignore), token 3
    # nothing → background. Labels [1, 1, 255, 0]: P = {(0,1), (1,0)} with s = 1; N = {(0,3), (1,3), (3,0), (3,1)}
    # with |cos(e1, e2)| = 0 → ½(1 − 2/3) = 1/6.
    sim = torch.zeros(1, 2, 2, 2)
    sim[0, 0, 0, 0], sim[0, 0, 0, 1], sim[0, 1, 1, 0] = 0.9, 0.8, 0.5
    loss = MemoryContrast(high=0.7, low=0.25)(hand_tokens(), sim, FULL_BOX, SIZE)
    assert loss.item() == pytest.approx(1 / 6, abs=1e-6)


def test_tokens_outside_the_box_are_ignored() -> None:
    # Box x ∈ [0, 16): the right column (centre 24) is outside. Labels [1, 1, 0, 0] → [1, 255, 0, 255]:
    # only the negative pair (0, 2) / (2, 0) with s = 0 is left → ½(1 − 0/1) + ½·0/3 = 0.5.
    sim = torch.zeros(1, 2, 2, 2)
    sim[0, 0, 0, :] = 1.0
    loss = MemoryContrast()(hand_tokens(), sim, torch.tensor([[0, 32, 0, 16]]), SIZE)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)


def test_equals_ptc_and_similarity_gets_no_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 8, 3, 4, generator=gen, requires_grad=True)
    sim = torch.rand(2, 3, 3, 4, generator=gen).requires_grad_(True)
    box = torch.tensor([[0, 48, 0, 64], [0, 32, 0, 64]])
    loss = MemoryContrast(high=0.6, low=0.3)(tokens, sim, box, (48, 64))
    loss.backward()
    assert sim.grad is None and torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0
    # Recompute the labels independently of core.cam: v > 0.6 → argmax + 1, v ≤ 0.3 → 0, else 255; the box of
    # image 1 covers rows 0..31 of 48 → token rows with centres 8 and 24 are inside, 40 is outside.
    value, index = sim.detach().max(dim=1)
    labels = torch.full_like(index, 255)
    labels[value > 0.6] = index[value > 0.6] + 1
    labels[value <= 0.3] = 0
    labels[1, 2] = 255
    flat = labels.flatten(1)
    pairs = (flat[:, :, None] == flat[:, None, :]).to(torch.uint8)
    ignore = (flat == 255)[:, :, None] | (flat == 255)[:, None, :] | torch.eye(12, dtype=torch.bool)
    pairs[ignore] = 255
    assert loss.item() == pytest.approx(PatchTokenContrast()(tokens, pairs).item(), abs=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_degenerate_inputs(batch: int) -> None:
    tokens = torch.randn(batch, 4, 2, 2, requires_grad=True)
    # Uninitialised bank: S = 0 → every token background → finite.
    loss = MemoryContrast()(tokens, torch.zeros(batch, 5, 2, 2), FULL_BOX.repeat(batch, 1), SIZE)
    assert torch.isfinite(loss)
    # Empty box: everything ignored → connected zero with exactly zero gradient.
    loss = MemoryContrast()(tokens, torch.rand(batch, 5, 2, 2), torch.zeros(batch, 4, dtype=torch.long), SIZE)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(tokens.grad, torch.zeros_like(tokens))


def test_adaptive_weight_identical_histograms() -> None:
    # S = CAM_aux = CAM: every profile cosine is 1 → both histograms are one-hot in the last bin,
    # Σ √(h1·h2) = 1 → w = e^−1.
    maps = torch.rand(2, 3, 4, 5) + 0.1
    w = adaptive_memory_weight(maps, maps.clone(), maps.clone())
    assert w.dim() == 0 and w.item() == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_adaptive_weight_disjoint_histograms() -> None:
    # S and CAM_aux live on class 0 only (cosine 1 → last bin); CAM on class 1 only (cosine 0 → first bin):
    # Σ √(h1·h2) = 0 → w = 1.
    s = torch.zeros(2, 2, 3, 3)
    s[:, 0] = torch.rand(2, 3, 3) + 0.1
    cam = torch.zeros(2, 2, 3, 3)
    cam[:, 1] = torch.rand(2, 3, 3) + 0.1
    assert adaptive_memory_weight(s, s * 2, cam).item() == pytest.approx(1.0, rel=1e-6)


def test_adaptive_weight_pools_the_batch() -> None:
    # Image 0: CAM = S (cosine 1); image 1: CAM orthogonal to S (cosine 0). CAM_aux = S for both.
    # h1 = one-hot in bin 9; h2 = ½ in bin 9, ½ in bin 0 (equal position counts per image) → Σ √ = √½.
    s = torch.zeros(2, 2, 2, 3)
    s[:, 0] = torch.rand(2, 2, 3) + 0.1
    cam = s.clone()
    cam[1] = 0.0
    cam[1, 1] = 1.0
    w = adaptive_memory_weight(s, s.clone(), cam)
    assert w.item() == pytest.approx(math.exp(-math.sqrt(0.5)), rel=1e-6)


def test_adaptive_weight_degenerate_and_constant() -> None:
    # All-zero S (no initialised class): every cosine is 0 → identical one-hot histograms → e^−1, finite.
    zeros = torch.zeros(1, 4, 3, 3)
    assert adaptive_memory_weight(zeros, torch.rand(1, 4, 3, 3), torch.rand(1, 4, 3, 3)).item() == pytest.approx(
        math.exp(-1.0), rel=1e-6
    )
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(3, 4, 5, 5, generator=gen, requires_grad=True)
    w = adaptive_memory_weight(s, torch.randn(3, 4, 5, 5, generator=gen), torch.rand(3, 4, 5, 5, generator=gen))
    assert not w.requires_grad
    assert math.exp(-1.0) - 1e-6 <= w.item() <= 1.0
    assert adaptive_memory_weight(s, s, s).item() == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        MemoryContrast(high=0.2, low=0.5)
    with pytest.raises(ValueError, match="same shape"):
        adaptive_memory_weight(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="share B, h and w"):
        MemoryContrast()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 3, 3), FULL_BOX, SIZE)
