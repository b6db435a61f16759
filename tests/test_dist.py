"""utils/dist.py: a rank started by torchrun ends when its launcher dies (PR_SET_PDEATHSIG), through real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The "rank": what torchrun starts, with the variables torchrun sets; init_distributed arms the parent-death signal.
RANK = """
import os, sys, time
from pathlib import Path
from utils import dist

dist.init_distributed("cpu")
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(3600)
"""
# The "launcher": starts the rank and waits, as torchrun does, until the test SIGKILLs it.
LAUNCHER = """
import os, subprocess, sys, time

env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env)
time.sleep(3600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody has reaped yet counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_torchrun_rank_exits_when_its_launcher_is_killed(tmp_path):
    ready = tmp_path / "rank.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(ready)], cwd=REPO, env=env)
    rank = None
    try:
        deadline = time.monotonic() + 300  # a cap for a slow machine, not a timing assertion
        while not ready.exists() or not ready.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, "the rank never started"
            time.sleep(0.1)
        rank = int(ready.read_text())
        assert _alive(rank)
        launcher.send_signal(signal.SIGKILL)  # the launcher gets no chance to stop its workers
        launcher.wait()
        deadline = time.monotonic() + 120
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(rank), "the rank outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if rank is not None and _alive(rank):
            os.kill(rank, signal.SIGKILL)


def test_state_fingerprint_hashes_zero_dim_buffers_and_sees_their_changes() -> None:
    import torch

    from utils.dist import state_fingerprint

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)  # num_batches_tracked is a 0-dim int64 buffer
    before = state_fingerprint(bn)
    assert before == state_fingerprint(bn)
    bn.num_batches_tracked += 1
    assert state_fingerprint(bn) != before
    assert state_fingerprint(bn, skip=("num_batches_tracked",)) == state_fingerprint(
        torch.nn.BatchNorm2d(3), skip=("num_batches_tracked",)
    )
