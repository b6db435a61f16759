"""utils/optim.py (schedule as a pure function of the step) and utils/sampler.py (sharded, resumable)."""

import itertools

import pytest
import torch

from utils.optim import build_optimizer, lr_factor, set_lr
from utils.sampler import InfiniteSampler


def test_lr_schedule_known_values():
    kwargs = {"max_iters": 100, "warmup_iters": 10, "warmup_ratio": 1e-6, "power": 0.9}
    assert lr_factor(0, **kwargs) == pytest.approx(1e-6)
    assert lr_factor(5, **kwargs) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_factor(10, **kwargs) == pytest.approx(0.9**0.9)  # (1 - 10/100) ** 0.9
    assert lr_factor(100, **kwargs) == 0.0
    assert lr_factor(7, max_iters=10, warmup_iters=0, warmup_ratio=0.1, power=1.0) == pytest.approx(0.3)


def test_named_groups_scale_together():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(
        [{"name": "backbone", "params": [a], "lr": 1.0}, {"name": "heads", "params": [b], "lr": 10.0}],
        (0.9, 0.999),
        0.01,
    )
    assert set_lr(optimizer, 0.5) == {"backbone": 0.5, "heads": 5.0}
    assert optimizer.param_groups[1]["weight_decay"] == 0.01


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_are_disjoint_and_cover_each_epoch():
    ranks = [_take(InfiniteSampler(10, rank=r, world_size=3, seed=4), 4) for r in range(3)]
    indices = [i for draws in ranks for i, _ in draws]
    assert len(indices) == 12 and set(indices) == set(range(10))  # 10 images padded to 12 by wrapping
    assert all(isinstance(seed, int) for draws in ranks for _, seed in draws)


def test_resume_continues_the_same_stream_across_epochs():
    full = _take(InfiniteSampler(7, rank=1, world_size=2, seed=3), 11)  # crosses two epoch boundaries
    resumed = _take(InfiniteSampler(7, rank=1, world_size=2, seed=3, start=5), 6)
    assert resumed == full[5:]
    assert _take(InfiniteSampler(7, seed=3), 7) != _take(InfiniteSampler(7, seed=4), 7)


def test_sgd_first_step_is_the_gradient_plus_weight_decay_and_later_steps_use_momentum():
    # first step: the momentum buffer is d = g + wd * p, so p <- p - lr * d; second: d' = 0.9 d + g' + wd * p'
    decayed = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    plain = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer = build_optimizer(
        [{"name": "branch", "params": [decayed], "lr": 0.1},
         {"name": "branch_no_decay", "params": [plain], "lr": 0.1, "weight_decay": 0.0}],
        (0.9, 0.999), 0.5, name="sgd", momentum=0.9,
    )  # fmt: skip
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["nesterov"] is False
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.1]
    decayed.grad, plain.grad = torch.tensor([0.5, 1.0]), torch.tensor([2.0])
    optimizer.step()
    # [1, -2] - 0.1 * ([0.5, 1] + 0.5 * [1, -2]) = [1 - 0.1, -2 - 0.0]; 3 - 0.1 * 2
    assert decayed.tolist() == pytest.approx([0.9, -2.0], abs=1e-7)
    assert plain.tolist() == pytest.approx([2.8], abs=1e-7)
    plain.grad = torch.tensor([1.0])
    optimizer.step()
    assert plain.tolist() == pytest.approx([2.8 - 0.1 * (0.9 * 2.0 + 1.0)], abs=1e-6)
    assert set_lr(optimizer, 0.5) == {"branch": 0.05, "branch_no_decay": 0.05}


def test_an_unknown_optimizer_name_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"train\.optimizer must be one of \('adamw', 'sgd'\), got 'adam'"):
        build_optimizer([{"name": "a", "params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], (0.9, 0.999),
                        0.0, name="adam")  # fmt: skip
