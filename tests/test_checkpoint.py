"""utils/checkpoint.py: exact round trip, atomicity, strict key checks, latest-file discovery."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from utils.checkpoint import (
    CheckpointError,
    find_latest,
    gather_rng_states,
    load_checkpoint,
    prune_numbered,
    save_checkpoint,
)


def _model(width: int = 4) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))
    model.register_buffer("bank", torch.zeros(2, 3))
    return model


def test_round_trip_restores_model_optimizer_step_and_rng(tmp_path):
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    model.bank.fill_(3.0)
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, step=7, rng=gather_rng_states(),
                           extra={"phase": 1})  # fmt: skip
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    clone = _model()
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=0.1)
    step, extra = load_checkpoint(path, clone, clone_opt)
    assert step == 7 and extra == {"phase": 1}
    for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert clone_opt.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    # the RNG streams continue exactly where they were when the checkpoint was written
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws


def test_mismatched_model_names_the_keys(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=_model(4), step=1)
    with pytest.raises(CheckpointError, match=r"shape differs: 0.bias, 0.weight, 2.weight"):
        load_checkpoint(path, _model(5))
    with pytest.raises(CheckpointError, match=r"missing: extra"):
        other = _model(4)
        other.extra = nn.Linear(1, 1)
        load_checkpoint(path, other)


def test_foreign_and_missing_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not an MSFC training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth", _model())
    (tmp_path / "torn.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="torn.pth"):
        load_checkpoint(tmp_path / "torn.pth", _model())
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_checkpoint(tmp_path / "absent.pth", _model())


def test_weights_only_checkpoint_cannot_resume_optimizer(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=_model(), step=3)
    model = _model()
    with pytest.raises(CheckpointError, match="no optimiser state"):
        load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=1.0))


def test_find_latest_prefers_last_then_highest_number(tmp_path):
    folder = tmp_path / "checkpoints"
    assert find_latest(tmp_path) is None
    for step in (2, 10, 4):
        save_checkpoint(folder / f"iter_{step:06d}.pth", model=_model(), step=step)
    (folder / ".iter_000012.pth.abc.tmp").write_bytes(b"partial")  # what a killed writer leaves behind
    assert find_latest(tmp_path).name == "iter_000010.pth"
    save_checkpoint(folder / "last.pth", model=_model(), step=10)
    assert find_latest(tmp_path).name == "last.pth"
    prune_numbered(tmp_path, keep=1)
    assert sorted(p.name for p in folder.glob("iter_*.pth")) == ["iter_000010.pth"]
