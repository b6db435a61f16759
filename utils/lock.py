"""One writer per run folder: an exclusive lock on ``<run.out_dir>/.lock``, held for the whole training run.

The lock is a POSIX record lock (``fcntl.lockf``) on the whole file. The kernel drops it when its process ends, however
it ends (SIGKILL included), so a lock left by a dead run is simply taken over; nothing has to be cleaned up by hand.
POSIX locks, unlike ``flock`` locks, are not inherited by forked children: the DataLoader workers of a killed run,
which outlive it by a few seconds, do not keep its folder locked.

The file holds the holder's host, pid and start time (JSON), so a second run can say who is in the way. A clean
release empties it; a run that finds it non-empty when it takes the lock knows the previous holder died holding it.

Caveat of POSIX locks: closing *any* descriptor of the lock file in the holding process releases the lock, so nothing
in the holder may open and close ``.lock`` (nothing in this project does; other processes may read it freely).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from utils.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLockedError(UserError):
    """Another live process holds the run folder's lock; the message names the folder and the holder."""


def describe_holder(info: dict[str, Any] | None) -> str:
    """``host H, pid P, started T`` from a lock file's contents (or that the holder is unknown)."""
    if not info:
        return "holder unknown (it has not written its details yet)"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')}"


class RunLock:
    """An exclusive, non-blocking lock on a run folder.

    Args:
        folder: the run folder (created if needed: taking the lock is the first thing a run writes).

    Attributes:
        path: the lock file, ``folder/.lock``.
        previous: the details a previous holder left in the file when it died holding the lock (it was taken over),
            else None. Set by :meth:`acquire`.
        unavailable: why the folder could not be locked at all (no ``fcntl``, or a file system without locks), else
            None; the run then goes on unlocked and the caller should say so.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.previous: dict[str, Any] | None = None
        self.unavailable: str | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 4096):
            raw += chunk
        if not raw.strip():
            return None
        try:
            info = json.loads(raw)
        except ValueError:
            return {"host": "?", "pid": "?", "started": f"? (unreadable lock file: {raw[:80]!r})"}
        return info if isinstance(info, dict) else None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` at once (never waits).

        Returns:
            self, holding the lock (or not, where :attr:`unavailable` says why the folder cannot be locked).
        """
        if self._fd is not None:
            return self
        if fcntl is None:
            self.unavailable = "this platform has no fcntl"
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a process that fails to get the lock must leave the holder's details intact.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: the file system has no locks
                os.close(fd)
                self.unavailable = f"{self.path.parent} cannot be locked ({err})"
                return self
            holder = self._read(fd)
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.folder} is in use by another training ({describe_holder(holder)}; lock file "
                f"{self.path}): wait for it to finish or stop it, or set another run.out_dir"
            ) from err
        self.previous = self._read(fd)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file (a clean exit) and unlock it; a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
