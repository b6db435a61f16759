"""utils/outputs.py's output-folder helpers: the temporary-file sweep and settings.json (record, refuse, re-claim)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from utils.errors import UserError
from utils.io import atomic_path, save_label_png
from utils.outputs import TEMP_FILE, check_settings, prepare_outputs, sweep_temp_files


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
