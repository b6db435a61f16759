"""utils/lock.py: one holder per run folder across processes, the holder named, a dead holder's lock taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils.lock import RunLock, RunLockedError

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.name != "posix", reason="run folders are locked with POSIX record locks")

HOLD = """
import sys
from utils.lock import RunLock

lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
lock.release()
print("released", flush=True)
"""


def _holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_held_folder_is_refused_naming_the_holder_and_free_again_after_release(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        expected = rf"run folder {folder} is in use by another training \(host {socket.gethostname()}, pid {holder.pid}"
        with pytest.raises(RunLockedError, match=expected):
            RunLock(folder).acquire()
    finally:
        holder.stdin.close()
    assert holder.stdout.readline().strip() == "released"
    assert holder.wait() == 0
    assert (folder / ".lock").read_text() == ""  # a clean release leaves no holder behind
    with RunLock(folder) as lock:
        assert lock.held and lock.previous is None


def test_the_lock_of_a_killed_holder_is_taken_over_and_its_holder_reported(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder)
    holder.kill()  # SIGKILL: the kernel drops its lock, the file still names it
    holder.wait()
    lock = RunLock(folder).acquire()
    try:
        assert lock.previous is not None and lock.previous["pid"] == holder.pid
        assert f'"pid": {os.getpid()}' in (folder / ".lock").read_text()
    finally:
        lock.release()
