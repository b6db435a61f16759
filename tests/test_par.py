"""Tests for models/par.py (SPEC §1.3): affinity normalisation, edge preservation, neighbour geometry."""

from __future__ import annotations

import math

import pytest
import torch

from models.par import PAR, neighbour_offsets


def _half_black_white(height: int = 16, width: int = 32) -> torch.Tensor:
    """[1, 3, H, W]: black left half, white right half."""
    image = torch.zeros(1, 3, height, width)
    image[..., width // 2 :] = 1.0
    return image


def _left_half_mask(height: int = 16, width: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, 1, height, width)
    mask[..., : width // 2] = 1.0
    return mask


def test_offsets_are_dilated_eight_rings() -> None:
    offsets = neighbour_offsets((1, 2, 4, 8, 12, 24))
    assert len(offsets) == 48 and len(set(offsets)) == 48
    # Every offset is a ring position (each coordinate in {-d, 0, d}, not both 0) of its dilation.
    for index, (dy, dx) in enumerate(offsets):
        d = (1, 2, 4, 8, 12, 24)[index // 8]
        assert {abs(dy), abs(dx)} <= {0, d} and (dy, dx) != (0, 0)


def test_parameter_free_and_no_state() -> None:
    par = PAR()
    assert list(par.parameters()) == [] and list(par.buffers()) == [] and par.state_dict() == {}


def test_output_shape_and_dtype() -> None:
    par = PAR(num_iter=2)
    images = torch.rand(2, 3, 12, 10)
    masks = torch.rand(2, 5, 12, 10)
    out = par(images, masks)
    assert out.shape == (2, 5, 12, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_affinity_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    aff = PAR().affinity(torch.rand(2, 3, 9, 11))
    assert aff.shape == (2, 48, 9, 11)
    assert (aff >= 0).all()
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(2, 9, 11), atol=1e-6, rtol=0)


def test_affinity_known_answer_on_uniform_image() -> None:
    # On a uniform image every |I_k − I_0| is 0, so the image softmax is 1/48 everywhere and
    # A_k = (1/48 + 0.01·p_k) / 1.01 with p_k = softmax_k(−(d_k / std(d) / 0.3)²), d_k = dilation·(1 or √2).
    dilations = (1, 2, 4, 8, 12, 24)
    ring_factor = [math.sqrt(2.0), 1.0, math.sqrt(2.0), 1.0, 1.0, math.sqrt(2.0), 1.0, math.sqrt(2.0)]
    d = torch.tensor([dil * f for dil in dilations for f in ring_factor], dtype=torch.float64)
    p = torch.softmax(-((d / d.std() / 0.3) ** 2), dim=0)
    expected = (1.0 / 48 + 0.01 * p) / 1.01
    aff = PAR(dilations).affinity(torch.full((1, 3, 5, 6), 0.4, dtype=torch.float64))
    torch.testing.assert_close(aff[0, :, 2, 3], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(aff, expected.view(1, 48, 1, 1).expand_as(aff), atol=1e-12, rtol=0)


def test_constant_map_stays_constant() -> None:
    # A sums to 1 per pixel (normalised), so PAR is an average and fixes constants; with the raw 1.01 sum the map
    # would grow by 1.01**10 ≈ 1.105 after 10 iterations.
    torch.manual_seed(1)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)  # 8×8 < dilation 24: replicate padding beyond the image
    masks = torch.full((2, 3, 8, 8), 0.7, dtype=torch.float64)
    out = PAR()(images, masks)
    torch.testing.assert_close(out, masks, atol=1e-6, rtol=0)
    # float32 path: same up to accumulated rounding over 48 terms × 10 iterations.
    out32 = PAR()(images.float(), masks.float())
    torch.testing.assert_close(out32, masks.float(), atol=1e-5, rtol=0)


def test_mask_does_not_leak_across_colour_edge() -> None:
    par = PAR()
    out = par(_half_black_white(), _left_half_mask())[0, 0]
    # Across the edge |ΔI| / σ_I is large (≈ 2 near the edge → logit ≈ −44), so only the 0.01 position term leaks.
    assert out[:, 16:].max() < 0.05
    assert out[:, :16].min() > 0.95


def test_mask_spreads_on_uniform_image() -> None:
    # The same mask on a uniform image is averaged over all 48 neighbours: it crosses the middle substantially.
    out = PAR()(torch.full((1, 3, 16, 32), 0.5), _left_half_mask())[0, 0]
    assert out[:, 16].min() > 0.3
    assert out[:, 15].max() < 0.7


def test_neighbour_and_mask_shifts_agree() -> None:
    # One iteration, dilation 1, delta mask at the centre of a uniform image: out(q) = Σ_k A_k·mask(q + o_k), so the
    # pixel at centre − o_k receives exactly A_k; all 8 ring pixels get weight, the centre itself gets none.
    par = PAR(dilations=(1,), num_iter=1)
    images = torch.full((1, 3, 7, 7), 0.2, dtype=torch.float64)
    mask = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    mask[..., 3, 3] = 1.0
    aff = par.affinity(images)
    out = par(images, mask)[0, 0]
    for k, (dy, dx) in enumerate(par.offsets):
        assert out[3 - dy, 3 - dx].item() == pytest.approx(aff[0, k, 3 - dy, 3 - dx].item(), abs=1e-12)
    assert out[3, 3].item() == 0.0
    assert out.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs_raise() -> None:
    par = PAR()
    with pytest.raises(ValueError, match="images01"):
        par(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="masks"):
        par(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 9, 8))
    with pytest.raises(ValueError, match="dilations"):
        PAR(dilations=(0, 1))
