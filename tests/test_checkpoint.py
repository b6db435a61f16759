"""utils/checkpoint.py: exact round trip, atomicity, strict key checks, latest-file discovery, integrity (seal),
durability (fsync) and clear write failures."""

import errno
import logging
import os
import random
import stat
import struct
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from utils.checkpoint import (
    CheckpointError,
    find_latest,
    gather_rng_states,
    load_checkpoint,
    preserved_rng,
    prune_numbered,
    read_checkpoint,
    read_seal,
    save_checkpoint,
)
from utils.errors import UserError


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


def _tensor_data_offset(path, suffix: str = "data/0") -> int:
    """File offset of the first byte of a tensor's storage inside the zip archive torch.save writes."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_length + extra_length


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_bytes_are_detected_not_loaded(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=_model(), step=5)
    _flip_byte(path, _tensor_data_offset(path) + 3)  # one weight's bytes: torch.load alone would not notice
    with pytest.raises(CheckpointError, match=r"c.pth is corrupt: the SHA-256 of its content"):
        load_checkpoint(path, _model())


def test_a_damaged_seal_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=_model(), step=5)
    data = path.read_bytes()
    path.write_bytes(data[:-10] + b"Z" + data[-9:])  # a character of the recorded digest
    with pytest.raises(CheckpointError, match=r"c.pth is damaged: the seal at its end"):
        read_checkpoint(path)


def test_a_sealed_checkpoint_is_still_a_plain_zip_and_torch_file(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=_model(), step=5)
    with zipfile.ZipFile(path) as archive:
        assert archive.comment.startswith(b"MSFC-CHECKPOINT step=5 sha256=")
        assert archive.testzip() is None
    assert read_seal(path).step == 5
    assert torch.load(path, weights_only=False)["step"] == 5  # e.g. model.weights=<checkpoint> reads it directly


def test_unsealed_checkpoints_of_older_runs_load_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.pth"
    torch.save({"model": _model().state_dict(), "step": 3, "optimizer": None}, path)
    with caplog.at_level(logging.WARNING, logger="utils.checkpoint"):
        assert load_checkpoint(path, _model())[0] == 3
    assert "has no checksum" in caplog.text


def test_find_latest_ranks_by_step_not_by_name(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "last.pth", model=_model(), step=4)
    save_checkpoint(folder / "iter_000006.pth", model=_model(), step=6)  # e.g. killed between iter_6 and last
    assert find_latest(tmp_path).name == "iter_000006.pth"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_find_latest_falls_back_past_a_damaged_checkpoint_with_a_warning(tmp_path, caplog, damage):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "iter_000004.pth", model=_model(), step=4)
    last = save_checkpoint(folder / "last.pth", model=_model(), step=6)
    if damage == "flip":
        _flip_byte(last, _tensor_data_offset(last))
    else:
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="utils.checkpoint"):
        assert find_latest(tmp_path).name == "iter_000004.pth"
    assert "last.pth" in caplog.text and "skipping" in caplog.text
    (folder / "iter_000004.pth").write_bytes(b"")  # nothing usable is left: an error, never a silent fresh start
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoints: .*last.pth.*iter_000004.pth"):
        find_latest(tmp_path)


def test_save_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(tmp_path / "c.pth", model=_model(), step=1)
    assert synced == ["file", "folder"]  # the content before the rename, the rename itself after it


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1040"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["zip_writer", "enospc"],
)
def test_a_failed_write_names_the_file_the_free_space_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pth", model=_model(), step=1)
    before = path.read_bytes()

    def disk_full(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\0" * 100)  # what reached the disk before it filled up
        raise failure

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(path, model=_model(), step=2)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)  # tools print it as one line
    assert message.startswith(f"cannot write checkpoint {path}: ")
    assert "free on its file system" in message
    assert "the previous last.pth is intact (newest complete checkpoint: last.pth, step 1)" in message
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


def test_a_failure_that_is_not_a_write_keeps_its_own_error(tmp_path, monkeypatch):
    def broken(obj, target, *args, **kwargs):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug") as caught:
        save_checkpoint(tmp_path / "c.pth", model=_model(), step=1)
    assert not isinstance(caught.value, CheckpointError)


def test_preserved_rng_leaves_every_global_stream_where_it_was():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with preserved_rng():
        expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
