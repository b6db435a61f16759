"""IRN's inter-pixel relations (core/affinity.py) and affinity loss (losses/affinity.py), on hand-built maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.affinity import pair_index, pair_labels, path_max_affinity, segment, valid_pairs
from losses.affinity import AffinityLoss


def test_pair_index_counts_offsets_once_within_the_radius():
    index = pair_index(5)
    # lattice points with dy² + dx² < 25: 69, less the origin, halved: 34 unordered offsets
    assert len(index) == 34 and index.margin == 4
    offsets = {tuple(o) for o in index.offsets.tolist()}
    assert (0, 1) in offsets and (0, -1) not in offsets and (3, 4) not in offsets and (4, -2) in offsets
    assert all((dy > 0 or dx > 0) and dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert not any((-dy, -dx) in offsets for dy, dx in offsets)
    with pytest.raises(ValueError, match="radius"):
        pair_index(1)


def test_segments_run_from_start_to_end_in_single_steps():
    for dy, dx in pair_index(10).offsets.tolist():
        path = segment(dy, dx)
        assert path[0].tolist() == [0, 0] and path[-1].tolist() == [dy, dx]
        assert np.abs(np.diff(path, axis=0)).max() == 1  # 8-connected, no pixel skipped or repeated
    assert segment(1, 2).tolist() == [[0, 0], [1, 1], [1, 2]]  # half rounds up


def test_pair_labels_count_the_pairs_of_a_hand_built_map():
    # radius 2: the 8-neighbour pairs. The centre is unknown (255), so 12 of the map's 20 pairs have a relation:
    #   background pairs (0, 0): (0,0)-(0,1), (0,0)-(1,0), (0,1)-(1,0)                       -> 3
    #   same-class pairs: class 2 (2,0)-(2,1); class 1 (0,2)-(1,2), (1,2)-(2,2)               -> 3
    #   different labels: (0,1)-(0,2), (2,1)-(2,2), (1,0)-(2,0), (0,1)-(1,2), (1,0)-(2,1), (1,2)-(2,1) -> 6
    label = torch.tensor([[[0, 0, 1], [0, 255, 1], [2, 2, 1]]])
    bg, fg, neg = pair_labels(label, pair_index(2))
    assert bg.shape == (1, 4, 3, 3)
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (3, 3, 6)
    assert not (bg & fg).any() and not (bg & neg).any() and not (fg & neg).any()
    # the pair (0,1)-(1,0) is offset (1, -1) from (0, 1)
    p = pair_index(2).offsets.tolist().index([1, -1])
    assert bg[0, p, 0, 1] and not bg[0, p, 0, 0]


@pytest.mark.parametrize("radius", [3, 5])
def test_pair_labels_agree_with_brute_force(radius):
    rng = np.random.default_rng(radius)
    label = rng.choice([0, 1, 2, 255], size=(2, 7, 8), p=[0.4, 0.25, 0.25, 0.1])
    counts = np.zeros(3, dtype=int)  # bg_pos, fg_pos, neg over every unordered pair
    for b in range(2):
        cells = [(y, x) for y in range(7) for x in range(8)]
        for i, (y0, x0) in enumerate(cells):
            for y1, x1 in cells[i + 1 :]:
                if (y1 - y0) ** 2 + (x1 - x0) ** 2 >= radius**2:
                    continue
                u, v = label[b, y0, x0], label[b, y1, x1]
                if u == 255 or v == 255:
                    continue
                counts[0 if u == v == 0 else 1 if u == v else 2] += 1
    bg, fg, neg = pair_labels(torch.from_numpy(label), pair_index(radius))
    assert [int(bg.sum()), int(fg.sum()), int(neg.sum())] == counts.tolist()


def test_path_max_affinity_on_a_hand_built_boundary():
    boundary = torch.tensor([[[0.0, 0.2, 0.9, 0.1, 0.0, 0.3]]])
    index = pair_index(3)
    affinity, valid = path_max_affinity(boundary, index)
    offsets = index.offsets.tolist()
    one, two = offsets.index([0, 1]), offsets.index([0, 2])
    torch.testing.assert_close(affinity[0, one, 0], torch.tensor([0.8, 0.1, 0.1, 0.9, 0.7, 0.0]))
    torch.testing.assert_close(affinity[0, two, 0], torch.tensor([0.1, 0.1, 0.1, 0.7, 0.0, 0.0]))
    assert valid[one, 0].tolist() == [True] * 5 + [False]
    assert not valid[offsets.index([1, 0])].any()  # a one-row map has no vertical pair
    # a single boundary pixel in the middle of a 3x3 map cuts the diagonal and the knight's move through it
    wall = torch.zeros(1, 3, 3)
    wall[0, 1, 1] = 1.0
    affinity, _ = path_max_affinity(wall, index)
    assert affinity[0, offsets.index([2, 2]), 0, 0] == 0 and affinity[0, offsets.index([1, 2]), 0, 0] == 0
    assert affinity[0, offsets.index([0, 2]), 0, 0] == 1 and affinity[0, offsets.index([2, 0]), 0, 2] == 1


def test_path_max_affinity_is_differentiable_through_the_path_maximum():
    boundary = torch.tensor([[[0.1, 0.6, 0.2]]], requires_grad=True)
    affinity, _ = path_max_affinity(boundary, pair_index(3))
    p = pair_index(3).offsets.tolist().index([0, 2])
    affinity[0, p, 0, 0].backward()
    assert boundary.grad.tolist() == [[[0.0, -1.0, 0.0]]]  # only the path's maximum moves the affinity


def test_valid_pairs_match_the_map_bounds():
    valid = valid_pairs(pair_index(2), (2, 3))
    assert int(valid.sum()) == 2 * 2 + 3 + 2 * 2  # horizontal 4, vertical 3, the two diagonals 2 each


def test_affinity_loss_known_answer_and_gradient_signs():
    affinity = torch.tensor([[[[0.5, 0.5, 0.9]]]], requires_grad=True)
    bg = torch.tensor([[[[True, False, False]]]])
    fg = torch.zeros_like(bg)
    neg = torch.tensor([[[[False, True, False]]]])
    loss, parts = AffinityLoss()(affinity, bg, fg, neg)
    expected = 0.5 * (0.5 * -math.log(0.5 + 1e-5) + -math.log(0.5 + 1e-5))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["fg_pos"].item() == 0.0
    loss.backward()
    grad = affinity.grad.flatten().tolist()
    assert grad[0] < 0 < grad[1] and grad[2] == 0.0  # positives pulled up, negatives down, unlabelled pairs untouched


def test_affinity_loss_weighs_each_kind_by_its_own_mean():
    affinity = torch.full((1, 1, 1, 4), 0.5)
    fg = torch.tensor([[[[True, True, True, False]]]])
    bg = ~fg
    neg = torch.zeros_like(fg)
    _, parts = AffinityLoss()(affinity, bg, fg, neg)
    assert parts["bg_pos"].item() == pytest.approx(parts["fg_pos"].item())  # 1 pair vs 3, same mean
    with pytest.raises(ValueError, match="one shape"):
        AffinityLoss()(affinity, bg[..., :2], fg, neg)
