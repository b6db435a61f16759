"""IRN's random walk (core/random_walk.py): the transition, the walk's invariants, sparse = dense, the refinement."""

from __future__ import annotations

import pytest
import torch

import core.random_walk as rw
from core.random_walk import grid_size, propagate, to_grid, transition_dense, transition_sparse_t, walk
from utils.errors import InputError


def _boundary(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(height, width, generator=torch.Generator().manual_seed(seed)) * 0.6


def test_transition_is_column_stochastic_and_keeps_a_distributions_mass():
    boundary = _boundary(6, 7)
    matrix = transition_dense(boundary, radius=3, beta=10)
    torch.testing.assert_close(matrix.sum(dim=0), torch.ones(42))
    affinity = matrix * matrix.sum(dim=0, keepdim=True) / matrix.diagonal()[None]  # undo D⁻¹ (A has a_ii = 1)
    torch.testing.assert_close(affinity, affinity.t())  # A is symmetric
    p = torch.rand(42, dtype=torch.float64)
    walked = torch.linalg.matrix_power(matrix.double(), 64) @ p
    assert walked.sum().item() == pytest.approx(p.sum().item(), rel=1e-6)  # T is float32


def test_sparse_transition_is_the_transpose_of_the_dense_one():
    boundary = _boundary(5, 8, seed=1)
    dense = transition_dense(boundary, radius=4, beta=8)
    sparse = transition_sparse_t(boundary, radius=4, beta=8).to_dense()
    torch.testing.assert_close(sparse, dense.t())


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_walk_keeps_constants(mode):
    boundary = _boundary(7, 9, seed=2)
    scores = torch.full((2, 7, 9), 0.7)
    out = walk(scores, boundary, radius=5, beta=10, exp_times=5, mode=mode)
    torch.testing.assert_close(out, scores, rtol=1e-4, atol=0)  # 32 float32 steps


def test_sparse_walk_equals_dense_repeated_squaring():
    boundary = _boundary(9, 11, seed=3)
    scores = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(4))
    sparse = walk(scores, boundary, radius=3, beta=10, exp_times=4, mode="sparse")
    dense = walk(scores, boundary, radius=3, beta=10, exp_times=4, mode="dense")
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-4)
    # and the dense walk is 16 single steps of T
    matrix = transition_dense(boundary, radius=3, beta=10)
    stepped = scores.reshape(3, -1)
    for _ in range(16):
        stepped = stepped @ matrix
    torch.testing.assert_close(dense, stepped.reshape(3, 9, 11), atol=1e-5, rtol=1e-4)


def test_a_blob_never_crosses_a_full_boundary_line():
    boundary = torch.zeros(20, 20)
    scores = torch.zeros(1, 20, 20)
    scores[0, 5:15, 2:8] = 1.0
    open_field = walk(scores, boundary, radius=5, beta=10, exp_times=8)
    assert open_field[0, :, 11:].sum() > 1.0  # without the wall the score spreads to the right half
    boundary[:, 10] = 1.0
    walled = walk(scores, boundary, radius=5, beta=10, exp_times=8)
    assert walled[0, :, 10:].abs().max().item() == 0.0
    assert walled[0, :, :10].sum() > 0


def test_to_grid_takes_block_means_and_grid_size_rounds_up():
    assert grid_size((375, 500)) == (94, 125) and grid_size((8, 9)) == (2, 3)
    cam = torch.arange(8 * 9, dtype=torch.float32).view(1, 8, 9)
    grid = to_grid(cam, (2, 3))
    assert grid[0, 0, 0].item() == cam[0, :4, :4].mean().item()
    # the last column's block is edge-padded: columns 8, 8, 8, 8 of rows 0..3
    assert grid[0, 0, 2].item() == cam[0, :4, 8].mean().item()


def test_propagate_normalises_by_the_global_max_and_respects_the_wall():
    cam = torch.zeros(2, 40, 40)
    cam[0, 8:30, 4:14] = 1.0
    cam[1, 10:20, 28:36] = 0.5
    boundary = torch.zeros(10, 10)
    boundary[:, 5] = 1.0
    out = propagate(cam, boundary, radius=5, beta=10, exp_times=6)
    assert out.shape == (2, 40, 40) and out.max().item() == pytest.approx(1.0)
    # class 0 lives left of the wall (grid column 5 = pixels 20..23), class 1 right of it; bilinear upsampling
    # reaches at most 2 pixels into the wall's block
    assert out[0, :, 22:].max().item() == 0.0 and out[1, :, :22].max().item() == 0.0
    assert propagate(cam[:0], boundary).shape == (0, 40, 40)
    with pytest.raises(ValueError, match="stride 4"):
        propagate(cam, torch.zeros(9, 10))


def test_dense_mode_is_refused_without_the_memory(monkeypatch):
    monkeypatch.setattr(rw, "_available_bytes", lambda device: 1000)
    with pytest.raises(InputError, match="rw.mode=sparse"):
        walk(torch.ones(1, 6, 6), torch.zeros(6, 6), radius=3, beta=10, exp_times=2, mode="dense")
    with pytest.raises(ValueError, match="mode"):
        walk(torch.ones(1, 6, 6), torch.zeros(6, 6), radius=3, beta=10, exp_times=2, mode="fast")
