"""utils/outputs.py: the temporary-file sweep, settings.json (record, refuse, re-claim) and shards of a split."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from utils import dist, outputs
from utils.config import ConfigError
from utils.errors import UserError
from utils.io import atomic_path, save_label_png
from utils.outputs import (
    TEMP_FILE,
    Shard,
    check_settings,
    create_json_exclusively,
    pending_indices,
    prepare_outputs,
    sweep_temp_files,
)


class _Interrupted(Exception):
    pass


def _leftover(folder: Path, target: str, age: float) -> Path:
    """A temporary file named by the real atomic writer for ``folder/target``, as a killed writer leaves it,
    last modified ``age`` seconds ago."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(folder / target) as tmp:
            name = tmp.name
            raise _Interrupted  # the writer removes its file; a SIGKILL would not have
    except _Interrupted:
        pass
    path = folder / name
    path.write_bytes(b"half a file")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_the_sweep_removes_only_the_writers_stale_temporary_files(tmp_path: Path) -> None:
    started = time.time()
    old = _leftover(tmp_path, "a.npz", age=60)
    nested = _leftover(tmp_path / "logits", "b.npz", age=60)  # subfolders are output folders too (seg/<split>/logits)
    fresh = _leftover(tmp_path, "c.npz", age=-60)  # changed after this run started: maybe a live writer's
    assert TEMP_FILE.match(old.name) and old.name.startswith(".a.npz.")
    foreign = tmp_path / ".notes.tmp"  # a hidden .tmp file that is not the writer's: never touched
    foreign.write_text("mine")
    os.utime(foreign, (started - 60, started - 60))
    output = tmp_path / "a.npz"
    output.write_bytes(b"done")
    assert sorted(sweep_temp_files(tmp_path, started)) == sorted([old, nested])
    assert not old.exists() and not nested.exists()
    assert fresh.is_file() and foreign.is_file() and output.is_file()
    assert sweep_temp_files(tmp_path / "missing", started) == []


def test_settings_are_recorded_then_refused_once_outputs_exist(tmp_path: Path) -> None:
    check_settings(tmp_path, {"scales": (1.0, 0.5)}, write=True)
    assert json.loads((tmp_path / "settings.json").read_text()) == {"scales": [1.0, 0.5]}
    save_label_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    check_settings(tmp_path, {"scales": [1.0, 0.5]}, write=True)  # the same settings resume
    with pytest.raises(ValueError, match=r"holds outputs made with other settings \(scales: \[1.0, 0.5\] -> \[1.0\]\)"):
        check_settings(tmp_path, {"scales": [1.0]}, write=True)
    with pytest.raises(UserError):  # one line from the tools, no traceback
        check_settings(tmp_path, {"scales": [1.0]}, write=False)
    assert json.loads((tmp_path / "settings.json").read_text()) == {"scales": [1.0, 0.5]}


def test_a_folder_without_outputs_is_re_claimed_with_a_log_line(tmp_path: Path, caplog) -> None:
    check_settings(tmp_path, {"checkpoint": "missing.pth"}, write=True)  # that run failed before its first output
    _leftover(tmp_path, "a.png", age=60)  # temporary and settings files are no outputs
    (tmp_path / "soft").mkdir()
    (tmp_path / "soft" / "settings.json").write_text("{}")
    check_settings(tmp_path, {"checkpoint": "last.pth"}, write=False)  # other ranks: accept, leave it to rank 0
    assert json.loads((tmp_path / "settings.json").read_text()) == {"checkpoint": "missing.pth"}
    with caplog.at_level(logging.WARNING, logger="utils.checkpoint"):
        check_settings(tmp_path, {"checkpoint": "last.pth"}, write=True)
    assert json.loads((tmp_path / "settings.json").read_text()) == {"checkpoint": "last.pth"}
    assert "re-claimed with the current settings (checkpoint: 'missing.pth' -> 'last.pth')" in caplog.text


def test_unreadable_settings_are_re_claimed_when_empty_and_refused_with_outputs(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text("{torn")
    check_settings(tmp_path, {"scales": [1.0]}, write=True)
    assert json.loads((tmp_path / "settings.json").read_text()) == {"scales": [1.0]}
    (tmp_path / "settings.json").write_text("[1, 2]")
    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"cannot read .*settings.json: expected a JSON object, got list; delete it"):
        check_settings(tmp_path, {"scales": [1.0]}, write=True)


def test_prepare_outputs_sweeps_claims_and_refuses(tmp_path: Path) -> None:
    seg, overlays = tmp_path / "seg" / "val", tmp_path / "seg" / "val_overlays"
    stale = _leftover(overlays, "x.png", age=60)
    prepare_outputs([(seg, {"scales": [1.0]}), (overlays, None)], time.time())
    assert json.loads((seg / "settings.json").read_text()) == {"scales": [1.0]}
    assert not stale.exists() and not (overlays / "settings.json").exists()
    (seg / "a.png").write_bytes(b"png")
    with pytest.raises(UserError, match="holds outputs made with other settings"):
        prepare_outputs([(seg, {"scales": [0.5]})], time.time())


# ----------------------------------------------------------------------------------------------------------------------
# Several machines (run.shard_index / run.num_shards)
# ----------------------------------------------------------------------------------------------------------------------


def test_shards_split_a_split_into_disjoint_parts_that_cover_it(tmp_path: Path) -> None:
    ids = [f"im{i}" for i in range(11)]
    shards = [Shard(i, 3) for i in range(3)]
    parts = [shard.indices(len(ids)) for shard in shards]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]  # ids[i::3]
    assert sorted(i for part in parts for i in part) == list(range(len(ids)))
    assert shards[1].ids(ids) == ["im1", "im4", "im7", "im10"] and str(shards[1]) == "1/3"
    # one process: a shard's rank share is the whole shard; the default is the whole split
    assert shards[2].rank_indices(len(ids)) == [2, 5, 8] and Shard().indices(3) == [0, 1, 2]
    assert not Shard().sharded and shards[0].sharded
    (tmp_path / "im4.png").write_bytes(b"done")  # resumable per shard: only the shard's own outputs count
    assert pending_indices(ids, tmp_path, ".png", shards[1]) == ([1, 7, 10], 1)
    assert pending_indices(ids, tmp_path, ".png", shards[0]) == ([0, 3, 6, 9], 0)
    assert pending_indices(ids, tmp_path, ".png") == ([i for i in range(11) if i != 4], 1)
    for index, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ConfigError, match=r"run.shard_index must be in 0..run.num_shards-1"):
            Shard(index, count)


def test_shard_ranks_split_the_machines_share_again() -> None:
    """Machine i takes ids[i::N]; its ranks split that: global rank i + N*rank of N*world, whatever world is."""
    n, shards, world = 17, 3, 2
    covered = []
    for index in range(shards):
        machine = Shard(index, shards).indices(n)
        for rank in range(world):
            mine = dist.shard(machine, rank, world)
            assert mine == list(range(n))[index + shards * rank :: shards * world]
            covered += mine
    assert sorted(covered) == list(range(n))


def test_settings_json_is_created_exclusively(tmp_path: Path, monkeypatch) -> None:
    assert create_json_exclusively(tmp_path / "settings.json", {"a": 1})
    assert not create_json_exclusively(tmp_path / "settings.json", {"a": 2})  # the first record wins
    assert json.loads((tmp_path / "settings.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file is gone either way
    # a machine that finds no record, but loses the race to create it, compares with the winner's record
    real = create_json_exclusively

    def another_machine_wins(path: Path, obj: object) -> bool:
        real(path, {"scales": [0.5]})
        return real(path, obj)

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setattr(outputs, "create_json_exclusively", another_machine_wins)
    with pytest.raises(UserError, match=r"claimed with other settings \(scales: \[0.5\] -> \[1.0\]\); every shard"):
        check_settings(other, {"scales": [1.0]}, write=True, shared=True)
    check_settings(other, {"scales": [0.5]}, write=True, shared=True)  # agreeing settings pass


def test_a_sharded_run_never_re_claims_a_folder(tmp_path: Path) -> None:
    check_settings(tmp_path, {"scales": [1.0]}, write=True, shared=True)
    check_settings(tmp_path, {"scales": [1.0]}, write=True, shared=True)  # a second shard with the same settings
    # no output yet, but the record may belong to a shard that is starting: refused, the record kept
    with pytest.raises(UserError, match=r"every shard \(run.num_shards\) must run with the same settings.*delete "):
        check_settings(tmp_path, {"scales": [0.5]}, write=True, shared=True)
    assert json.loads((tmp_path / "settings.json").read_text()) == {"scales": [1.0]}
    check_settings(tmp_path, {"scales": [0.5]}, write=True)  # unsharded, the empty folder is re-claimed as before
    assert json.loads((tmp_path / "settings.json").read_text()) == {"scales": [0.5]}


def test_a_checkpoint_copied_without_its_time_is_named_in_the_refusal(tmp_path: Path) -> None:
    checkpoint = {"path": "checkpoints/last.pth", "bytes": 10, "mtime_ns": 1}
    check_settings(tmp_path, {"checkpoint": checkpoint}, write=True)
    (tmp_path / "a.png").write_bytes(b"png")
    with pytest.raises(UserError, match=r"differs in its modification time only.*rsync -a"):
        check_settings(tmp_path, {"checkpoint": {**checkpoint, "mtime_ns": 2}}, write=True)
    with pytest.raises(UserError, match=r"other settings \(checkpoint: [^—]*\); delete the folder"):  # no hint
        check_settings(tmp_path, {"checkpoint": {**checkpoint, "bytes": 11}}, write=True)


def test_a_sharded_sweep_touches_only_its_own_ids_temporary_files(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    stale = {name: _leftover(tmp_path, f"{name}.png", age=60) for name in ids}
    settings_tmp = _leftover(tmp_path, "settings.json", age=60)
    prepare_outputs([(tmp_path, {"scales": [1.0]})], time.time(), Shard(1, 2), ids)  # this machine: b, d
    assert sorted(name for name, path in stale.items() if path.exists()) == ["a", "c"]
    assert settings_tmp.exists()  # not an id's: left to an unsharded run
    prepare_outputs([(tmp_path, {"scales": [1.0]})], time.time())
    assert not list(tmp_path.glob(".*.tmp"))
