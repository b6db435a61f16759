"""Process-tree helpers for the tests that SIGKILL a tool and check nothing it started survives (Linux /proc)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

HAS_PROC = Path("/proc/self/stat").is_file()


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces): state, ppid, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[list[int]]:
    """``pid``'s children, grandchildren, ... one list per generation."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(_stat_fields(int(entry))[1])
    levels = [[pid]]
    while levels[-1]:
        levels.append([child for child, parent in parents.items() if parent in levels[-1]])
    return levels[1:-1]


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` in clock ticks."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def still_running_after(pids: list[int], bound_seconds: float) -> list[int]:
    """Poll until every pid is gone or ``bound_seconds`` have passed (a generous bound, not a timing check); returns
    the ones still running, after SIGKILLing them so that a failing test leaves no orphans behind."""
    deadline = time.monotonic() + bound_seconds
    alive = [pid for pid in pids if running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if running(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive
