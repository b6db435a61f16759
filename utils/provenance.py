"""Where the code of a run came from: the git commit, branch and working-tree state of the checkout.

A run's log and ``metrics.jsonl`` start with this, so a number in a table can be traced back to the code that made
it, including whether that code had uncommitted changes. Finding it out never fails a run: without git, outside a
checkout, or when git errs, the answer says "not a git checkout" (with the reason) instead.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NOT_A_CHECKOUT = "not a git checkout"
# Seconds per git command: a status of a huge tree on a slow network disk must not hold up a training.
GIT_TIMEOUT_S = 10.0


class _GitUnavailable(Exception):
    """Why git could not answer (its message is the reason shown after "not a git checkout")."""


@dataclass(frozen=True)
class GitState:
    """The state of the checkout holding a folder.

    Attributes:
        commit: short hash of HEAD; "no commit yet" in a fresh repository; None outside a checkout.
        branch: the checked-out branch, "(detached HEAD)", or None outside a checkout.
        changed_files: entries of ``git status --porcelain`` (modified, staged, deleted and untracked files), or None.
        note: why there is no commit ("not a git checkout", perhaps with a reason); "" in a checkout.
    """

    commit: str | None
    branch: str | None
    changed_files: int | None
    note: str = ""

    @property
    def dirty(self) -> bool | None:
        """Whether the working tree differs from HEAD; None outside a checkout."""
        return None if self.changed_files is None else self.changed_files > 0

    def describe(self) -> str:
        """One phrase for a log line, e.g. ``git 1a2b3c4 on main, dirty (3 changed files)``."""
        if self.commit is None:
            return self.note
        if not self.changed_files:
            tree = "clean"
        else:
            tree = f"dirty ({self.changed_files} changed file{'s' if self.changed_files != 1 else ''})"
        return f"git {self.commit} on {self.branch}, {tree}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON record: ``commit``, ``branch``, ``dirty``, ``changed_files``, ``note``."""
        return {**asdict(self), "dirty": self.dirty}


def _git(folder: Path, *args: str) -> str:
    """The stdout of ``git -C folder ARGS`` (stripped); raises :class:`_GitUnavailable` with the reason."""
    # --no-optional-locks: a status must not take the index lock from someone committing in the same tree
    command = ["git", "--no-optional-locks", "-C", str(folder), *args]
    env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=GIT_TIMEOUT_S,
                                env=env, check=False)  # fmt: skip
    except FileNotFoundError as err:
        raise _GitUnavailable("git is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise _GitUnavailable(f"git {args[0]} took over {GIT_TIMEOUT_S:g} s") from err
    except OSError as err:
        raise _GitUnavailable(f"git cannot run: {err}") from err
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[0]
        raise _GitUnavailable(message)
    return result.stdout.strip()


def _inside_checkout(folder: Path) -> None:
    """Raise :class:`_GitUnavailable` unless ``folder`` is inside a git working tree."""
    try:
        inside = _git(folder, "rev-parse", "--is-inside-work-tree")
    except _GitUnavailable as err:
        if "not a git repository" in str(err):
            raise _GitUnavailable("") from err  # the plain case: nothing to add to "not a git checkout"
        raise
    if inside != "true":
        raise _GitUnavailable("inside a .git folder, not a working tree")


def _optional(folder: Path, otherwise: str, *args: str) -> str:
    """``git ARGS`` in a checkout where it may fail for a plain reason (no commit yet, a detached HEAD)."""
    try:
        return _git(folder, *args) or otherwise
    except _GitUnavailable:
        return otherwise


def git_state(folder: str | Path) -> GitState:
    """The commit, branch and working-tree state of the checkout holding ``folder``; never raises.

    Args:
        folder: any folder inside the checkout (e.g. the repository root of the code that runs).

    Returns:
        A :class:`GitState`; outside a checkout (or without git) its ``commit`` is None and ``note`` says why.
    """
    folder = Path(folder)
    try:
        _inside_checkout(folder)
        commit = _optional(folder, "no commit yet", "rev-parse", "--short", "HEAD")
        branch = _optional(folder, "(detached HEAD)", "symbolic-ref", "--short", "-q", "HEAD")
        status = _git(folder, "status", "--porcelain", "--untracked-files=normal")
    except _GitUnavailable as err:
        reason = str(err)
        return GitState(None, None, None, f"{NOT_A_CHECKOUT} ({reason})" if reason else NOT_A_CHECKOUT)
    changed = sum(1 for line in status.splitlines() if line.strip())
    return GitState(commit, branch, changed)
