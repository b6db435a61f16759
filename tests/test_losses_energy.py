"""Tests for losses.energy (SPEC §4.6, L_reg): the published dense energy and the local-window option."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from losses import EnergyLoss
from losses.energy import dense_message


def dense_reference(
    prob: torch.Tensor,
    image: torch.Tensor,
    valid: torch.Tensor,
    ignored: torch.Tensor,
    sxy: float,
    srgb: float,
    weight: float,
) -> tuple[float, torch.Tensor]:
    """SPEC §4.6 written out pair by pair in plain Python floats (float64): the value and the published gradient.

    `L = −w / B · Σ_b Σ_k Σ_i G_bi S'_bki Σ_j K_ij S'_bkj` over all pixel pairs (j = i included) and
    `dL/dS = −2w / B · G ⊙ (K S') ⊙ valid`.
    """
    b, c, h, w = prob.shape
    p, img, v, ign = prob.tolist(), image.tolist(), valid.tolist(), ignored.tolist()
    pixels = list(itertools.product(range(h), range(w)))
    total = 0.0
    grad = [[[[0.0] * w for _ in range(h)] for _ in range(c)] for _ in range(b)]
    for n in range(b):
        masked = [[[p[n][k][y][x] * v[n][y][x] for x in range(w)] for y in range(h)] for k in range(c)]
        for yi, xi in pixels:
            gate = 1.0 if ign[n][yi][xi] else max(float(v[n][yi][xi]) - max(p[n][k][yi][xi] for k in range(c)), 0.0)
            message = [0.0] * c
            for yj, xj in pixels:
                colour = sum((img[n][ch][yi][xi] - img[n][ch][yj][xj]) ** 2 for ch in range(3))
                spatial = (yi - yj) ** 2 + (xi - xj) ** 2
                kernel = math.exp(-spatial / (2 * sxy**2) - colour / (2 * srgb**2))
                for k in range(c):
                    message[k] += kernel * masked[k][yj][xj]
            for k in range(c):
                total += gate * masked[k][yi][xi] * message[k]
                grad[n][k][yi][xi] = -2 * weight / b * gate * message[k] * v[n][yi][xi]
    return -weight / b * total, torch.tensor(grad, dtype=torch.float64)


def dense_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = 2, C = 3, 12×12: image 1 has an out-of-box strip, both have ignored pixels (some outside the box)."""
    gen = torch.Generator().manual_seed(seed)
    prob = torch.softmax(torch.randn(2, 3, 12, 12, generator=gen) * 2, dim=1)
    image = torch.rand(2, 3, 12, 12, generator=gen) * 255
    image[:, :, :6] = image[:, :, :6] / 8 + 100  # a flatter region, where the colour kernel is not negligible
    valid = torch.ones(2, 12, 12, dtype=torch.bool)
    valid[1, :, 9:] = False
    valid[0, :2] = False
    ignored = torch.rand(2, 12, 12, generator=gen) > 0.7
    return prob, image, valid, ignored


@pytest.mark.parametrize(
    ("sigma_xy", "sigma_rgb", "inner_weight"), [(50.0, 15.0, 1e-7), (3.0, 40.0, 1.0)], ids=["published", "narrow"]
)
def test_dense_matches_brute_force(sigma_xy: float, sigma_rgb: float, inner_weight: float) -> None:
    prob, image, valid, ignored = dense_inputs()
    prob.requires_grad_(True)
    loss_fn = EnergyLoss(sigma_xy=sigma_xy, sigma_rgb=sigma_rgb, inner_weight=inner_weight)
    loss = loss_fn(prob, image, valid, ignored)
    loss.backward()
    value, grad = dense_reference(prob.detach(), image, valid, ignored, sigma_xy, sigma_rgb, inner_weight)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(prob.grad.double(), grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
    # Out-of-box pixels get no gradient; the in-box confident and uncertain ones do.
    assert torch.equal(prob.grad[1, :, :, 9:], torch.zeros(3, 12, 3))
    assert prob.grad[1, :, :, :9].abs().sum() > 0


def test_dense_known_answer_two_pixels() -> None:
    # 1×2 image of one colour, σ_xy = 1, w = 1, B = 1: K = [[1, e^−½], [e^−½, 1]] (j = i included).
    # S0 = (1, 0) → G0 = 0; S1 = (½, ½) → G1 = ½. Only i = 1 counts:
    # L = −G1 Σ_k S1k (K10 S0k + K11 S1k) = −½ (½ (e^−½ + ½) + ½ · ½) = −(e^−½ + 1) / 4.
    # Published gradient −2 G ⊙ K S': pixel 1 gets −(e^−½ + ½) for class 0 and −½ for class 1; pixel 0 gets 0.
    prob = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).reshape(1, 2, 1, 2).requires_grad_(True)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    loss = EnergyLoss(sigma_xy=1.0, inner_weight=1.0)(prob, torch.zeros(1, 3, 1, 2), mask, ~mask)
    loss.backward()
    e = math.exp(-0.5)
    assert loss.item() == pytest.approx(-(e + 1) / 4, rel=1e-6)
    expected = torch.tensor([[0.0, -(e + 0.5)], [0.0, -0.5]]).reshape(1, 2, 1, 2)
    torch.testing.assert_close(prob.grad, expected, rtol=1e-6, atol=1e-7)


def test_dense_gradient_is_the_published_one() -> None:
    # The published gradient −2w/B · G ⊙ K S' ⊙ valid differs from the exact derivative of the value with G constant,
    # −w/B · (G ⊙ K S' + K (G ⊙ S')) ⊙ valid, whenever G varies: check that the module returns the former.
    prob, image, valid, ignored = dense_inputs(seed=1)
    prob.requires_grad_(True)
    EnergyLoss(sigma_xy=3.0, sigma_rgb=40.0, inner_weight=1.0)(prob, image, valid, ignored).backward()
    _, published = dense_reference(prob.detach(), image, valid, ignored, 3.0, 40.0, 1.0)
    p = prob.detach().double()
    gate = (valid.double() - p.amax(dim=1)).clamp(min=0)
    gate[ignored] = 1.0
    masked = p * valid[:, None]
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    exact = torch.zeros_like(p)
    for n in range(2):
        pos = torch.stack([xs.flatten(), ys.flatten()], dim=1).double()
        col = image[n].double().flatten(1).T
        log_k = -torch.cdist(pos, pos).square() / 18.0 - torch.cdist(col, col).square() / 3200.0
        kernel = log_k.exp()
        s = masked[n].flatten(1)
        g = gate[n].flatten()
        both = g * (s @ kernel) + (g * s) @ kernel  # K symmetric
        exact[n] = (-0.5 * both * valid[n].flatten()).view(3, 12, 12)  # −w/B · (...), B = 2
    torch.testing.assert_close(prob.grad.double(), published, rtol=1e-5, atol=1e-6)
    assert (prob.grad.double() - exact).abs().max() > 1e-2 * exact.abs().max()


def test_dense_chunking_invariance() -> None:
    prob, image, valid, ignored = dense_inputs(seed=2)
    results = []
    for chunk_size in (7, 144, 10**6):
        leaf = prob.clone().requires_grad_(True)
        loss = EnergyLoss(sigma_xy=3.0, inner_weight=1.0, chunk_size=chunk_size)(leaf, image, valid, ignored)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0.0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 5, 29, 30, 31, 1000])
def test_dense_message_upper_triangle_blocks_equal_the_full_kernel(chunk_size: int) -> None:
    # K is evaluated on its upper triangle only, block row by block row, and used twice: the result must be the full
    # K @ v for every block size (one pixel, blocks that do not divide N = 30, one block, more than N).
    g = torch.Generator().manual_seed(3)
    features = torch.rand(2, 30, 5, generator=g) * 2.0
    values = torch.rand(2, 4, 30, generator=g)
    f, v = features.double(), values.double()
    expected = torch.einsum("bij,bcj->bci", torch.exp(-torch.cdist(f, f).square()), v)
    torch.testing.assert_close(dense_message(features, values, chunk_size).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_nothing_valid_is_zero(batch: int) -> None:
    prob = torch.softmax(torch.randn(batch, 2, 3, 3), dim=1).requires_grad_(True)
    invalid = torch.zeros(batch, 3, 3, dtype=torch.bool)
    loss = EnergyLoss()(prob, torch.rand(batch, 3, 3, 3) * 255, invalid, ~invalid)  # all ignored, none valid
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(prob.grad, torch.zeros_like(prob))


def test_dense_float32_under_autocast() -> None:
    prob, image, valid, ignored = dense_inputs(seed=3)
    loss_fn = EnergyLoss(sigma_xy=3.0, inner_weight=1.0)
    leaf = prob.bfloat16().requires_grad_(True)
    reference = loss_fn(leaf.float(), image, valid, ignored)
    (grad_ref,) = torch.autograd.grad(reference, leaf)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = loss_fn(leaf, image, valid, ignored)
    (grad_amp,) = torch.autograd.grad(amp, leaf)
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad_amp, grad_ref, rtol=0.0, atol=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_on_cuda_matches_cpu_without_host_sync() -> None:
    prob, image, valid, ignored = dense_inputs(seed=4)
    loss_fn = EnergyLoss(sigma_xy=3.0, inner_weight=1.0, chunk_size=50)
    cpu = prob.clone().requires_grad_(True)
    loss_fn(cpu, image, valid, ignored).backward()
    gpu = prob.cuda().requires_grad_(True)
    args = (image.cuda(), valid.cuda(), ignored.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn(gpu, *args)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.item() == pytest.approx(loss_fn(prob, image, valid, ignored).item(), rel=1e-4)
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=1e-4, atol=1e-6)


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode must be one of dense, window"):
        EnergyLoss(mode="crf")


# Window mode: the earlier local-window energy, kept as an option (SPEC §4.6 allows a cheaper local variant).


def window_reference(
    prob: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, ignored: torch.Tensor, r: int, sxy: float, srgb: float
) -> torch.Tensor:
    """The window energy written pixel by pixel, in float64 (slow, tiny inputs only)."""
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


def window_loss(kernel_radius: int, sigma_xy: float = 6.0, sigma_rgb: float = 15.0) -> EnergyLoss:
    return EnergyLoss(mode="window", sigma_xy=sigma_xy, sigma_rgb=sigma_rgb, kernel_radius=kernel_radius)


def test_window_known_answer_one_by_three() -> None:
    # Pixels p0 = (1, 0), p1 = (½, ½), p2 = (0, 1); gates 0, ½, 0 → only pixel 1 counts.
    # r = 1, σ_xy = 1, σ_rgb = 15; I0 = I1 = 0, I2 = (15, 0, 0).
    # K10 = exp(−1/2), K12 = exp(−1/2 − 15²/(2·15²)) = exp(−1); diagonals fall outside the 1×3 image.
    # Σ_c p1c Σ_j K1j pjc = ½·K10·1 + ½·K12·1; N = 3 → L = −½ · ½ (e^−½ + e^−1) / 3.
    prob = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]).reshape(1, 2, 1, 3)
    image = torch.zeros(1, 3, 1, 3)
    image[0, 0, 0, 2] = 15.0
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    ignored = torch.zeros(1, 1, 3, dtype=torch.bool)
    loss = window_loss(kernel_radius=1, sigma_xy=1.0)(prob, image, valid, ignored)
    assert loss.item() == pytest.approx(-0.25 * (math.exp(-0.5) + math.exp(-1.0)) / 3, rel=1e-6)


def test_window_known_answer_ignored_and_invalid() -> None:
    # Same map, pixel 0 ignored (gate 1) and pixel 2 outside the box (K = 0 towards it, not counted in N = 2).
    # Pixel 0: Σ_c p0c K01 p1c = 1·e^−½·½. Pixel 1: gate ½, neighbours 0 only: ½·(½·e^−½·1) = ¼ e^−½.
    # L = −(½ e^−½ + ¼ e^−½) / 2.
    prob = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]).reshape(1, 2, 1, 3)
    image = torch.zeros(1, 3, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    ignored = torch.tensor([[[True, False, False]]])
    loss = window_loss(kernel_radius=1, sigma_xy=1.0)(prob, image, valid, ignored)
    assert loss.item() == pytest.approx(-0.75 * math.exp(-0.5) / 2, rel=1e-6)


def test_window_matches_pixel_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    prob = torch.softmax(torch.randn(2, 3, 4, 5, generator=gen) * 2, dim=1)
    image = torch.rand(2, 3, 4, 5, generator=gen) * 255
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, :, 3:] = False  # a padded strip
    ignored = (torch.rand(2, 4, 5, generator=gen) > 0.7) & valid
    loss = window_loss(kernel_radius=2, sigma_xy=1.5, sigma_rgb=40.0)(prob, image, valid, ignored)
    expected = window_reference(prob, image, valid, ignored, r=2, sxy=1.5, srgb=40.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["dense", "window"])
def test_gradient_rewards_agreeing_with_similar_neighbours(mode: str) -> None:
    # An uncertain pixel between two confident class-0 neighbours of the same colour: descending the loss must
    # raise its class-0 probability (through the softmax logits).
    logits = torch.tensor([[5.0, 0.0, 5.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3).requires_grad_(True)
    args = (torch.zeros(1, 3, 1, 3), torch.ones(1, 1, 3, dtype=torch.bool), torch.zeros(1, 1, 3, dtype=torch.bool))
    loss_fn = window_loss(kernel_radius=1, sigma_xy=1.0) if mode == "window" else EnergyLoss(sigma_xy=1.0)
    loss_fn(torch.softmax(logits, dim=1), *args).backward()
    assert logits.grad[0, 0, 0, 1] < 0 < logits.grad[0, 1, 0, 1]


@pytest.mark.parametrize("batch", [1, 3])
def test_window_nothing_valid_is_connected_zero(batch: int) -> None:
    prob = torch.softmax(torch.randn(batch, 2, 3, 3), dim=1).requires_grad_(True)
    mask = torch.zeros(batch, 3, 3, dtype=torch.bool)
    loss = window_loss(kernel_radius=1)(prob, torch.rand(batch, 3, 3, 3) * 255, mask, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(prob.grad, torch.zeros_like(prob))


@pytest.mark.parametrize("mode", ["dense", "window"])
def test_confident_single_class_is_zero(mode: str) -> None:
    # One class: max prob 1 everywhere → gate 0 → exactly 0 with zero gradient.
    prob = torch.ones(2, 1, 3, 4, requires_grad=True)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    loss_fn = window_loss(kernel_radius=1) if mode == "window" else EnergyLoss()
    loss = loss_fn(prob, torch.rand(2, 3, 3, 4) * 255, valid, ~valid)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(prob.grad, torch.zeros_like(prob))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kernel_radius"):
        EnergyLoss(mode="window", kernel_radius=0)
    with pytest.raises(ValueError, match="chunk_size"):
        EnergyLoss(chunk_size=0)
    with pytest.raises(ValueError, match="image must be"):
        EnergyLoss()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3), torch.ones(1, 3, 3), torch.ones(1, 3, 3))
