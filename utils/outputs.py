"""Output folders of the inference tools: resumable sharded work, settings records, swept temporary files.

Every inference tool reads a trained run folder (``--run-dir RUN`` reloads ``RUN/config.yaml``), shards its images over
torchrun ranks (``ids[rank::world]``), skips images whose outputs exist (so an interrupted tool resumes), writes each
output atomically, and shows progress on rank 0.

Several machines (:class:`Shard`): ``run.num_shards=N run.shard_index=i`` gives machine ``i`` the ids ``ids[i::N]``,
which its torchrun ranks split again (``ids[i::N][rank::world]``, i.e. global rank ``i + N·rank`` of ``N·world``).
A machine's share does not depend on any machine's GPU count, so the machines may differ and each may resume with
another one. The outputs have the folder layout of an unsharded run: the shards' folders are merged by copying
(``cp -r`` / ``rsync``), or the shards write one folder on a shared filesystem. Rules for a shared folder:
``settings.json`` is created exclusively (the first machine's record wins; every other machine compares its settings
with it and is refused when they differ), a sharded run never re-claims a folder (another shard may be starting with
the recorded settings), and a sharded run sweeps only the temporary files of its own ids.

Before any rank writes, :func:`prepare_outputs` (rank 0, then a collective) sweeps the temporary files a killed run left
in the output folders and checks each folder's ``settings.json``: a folder whose outputs were made with other settings
is refused, while a folder that holds no output yet (an earlier run failed before its first one) is re-claimed.
User mistakes (a missing run folder or checkpoint, a refused folder, a bad config value) end a tool with one
``error: ...`` line and exit code 2 (:func:`run_tool`, ``utils.errors``).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from utils import dist
from utils.config import ConfigError, add_config_arguments, config_from_args
from utils.errors import InputError, UserError, exit_on_user_error
from utils.io import atomic_write_json

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"

# The temporary files of utils.io.atomic_path: ".<name>.<16 hex digits>.tmp", and ".<name>.<8 of [a-z0-9_]>.tmp"
# from the tempfile.mkstemp names it used before (left behind by runs of that code). Nothing else is ever swept.
TEMP_FILE = re.compile(r"^\.(?P<target>.+)\.(?:[0-9a-f]{16}|[a-z0-9_]{8})\.tmp$")


def split_name(cfg: DictConfig) -> str:
    """The split the inference tools work on: ``eval.split``, else ``data.val_split``."""
    return str(cfg.eval.split if cfg.eval.split is not None else cfg.data.val_split)


def output_dir(cfg: DictConfig, kind: str, split: str | None = None) -> Path:
    """``<run.out_dir>/<kind>/<split>`` (e.g. ``cams/val``), created."""
    folder = Path(cfg.run.out_dir) / kind / (split or split_name(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Shard:
    """One machine's part of a split when several machines share the work (``run.shard_index`` of ``run.num_shards``).

    Machine ``index`` owns the dataset indices ``range(n)[index::count]``; its torchrun ranks split them again
    (``[rank::world]``). ``Shard()`` (0 of 1) is the whole split.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(
                f"run.shard_index must be in 0..run.num_shards-1 and run.num_shards >= 1, got shard_index "
                f"{self.index} of num_shards {self.count}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Shard:
        return cls(int(cfg.run.shard_index), int(cfg.run.num_shards))

    @property
    def sharded(self) -> bool:
        """Whether other machines work on the same split."""
        return self.count > 1

    def indices(self, n: int) -> list[int]:
        """This machine's indices of a split of ``n`` ids: ``[index::count]``."""
        return list(range(n))[self.index :: self.count]

    def rank_indices(self, n: int) -> list[int]:
        """This process's indices: the machine's share over its torchrun ranks (``[rank::world]``)."""
        return dist.shard(self.indices(n))

    def ids(self, ids: Sequence[str]) -> list[str]:
        """This machine's ids of ``ids``."""
        return [ids[i] for i in self.indices(len(ids))]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def pending_indices(ids: Sequence[str], folder: Path, suffix: str, shard: Shard | None = None) -> tuple[list[int], int]:
    """This rank's share of ``ids`` whose output ``folder/<id><suffix>`` does not exist yet.

    The share is ``ids[rank::world]``, or with ``shard`` (several machines) ``ids[shard.index::shard.count]`` split over
    this machine's ranks (:meth:`Shard.rank_indices`).

    Returns:
        (indices to process, number of this rank's ids already done).
    """
    mine = (shard or Shard()).rank_indices(len(ids))
    todo = [i for i in mine if not (folder / f"{ids[i]}{suffix}").is_file()]
    return todo, len(mine) - len(todo)


def run_tool(description: str, work: Callable[[DictConfig], object], argv: Sequence[str] | None = None) -> int:
    """The ``main`` of an inference tool: the shared command line (``--run-dir RUN`` | ``--config FILE`` +
    ``key=value``), then ``work(cfg)``; the process group is torn down however ``work`` ends.

    Returns:
        0, or 2 after one ``error: ...`` line on stderr for a user error (``utils.errors.exit_on_user_error``);
        ``-h`` / ``--help`` and malformed arguments exit through argparse (0 / 2).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = config_from_args(args)
        try:
            work(cfg)
            return 0
        finally:
            dist.cleanup()

    return exit_on_user_error(body)


def sweep_temp_files(folder: Path, started: float, owned: Collection[str] | None = None) -> list[Path]:
    """Delete the temporary files that killed writers left under ``folder`` (recursively); returns what was removed.

    Only names of ``utils.io.atomic_path``'s pattern (:data:`TEMP_FILE`) are touched, and only files last modified
    before ``started``: a writer of this run has not started when the sweep runs (:func:`prepare_outputs`), and a
    file that changed since this run began may belong to a writer that is still alive. A file that vanishes meanwhile
    (renamed into place by its writer) is skipped.

    Args:
        folder: an output folder; a missing one holds nothing.
        started: ``time.time()`` at the start of this run.
        owned: when given (a sharded run, :class:`Shard`), only the temporary files of these ids' outputs
            (``.<id>.<ext>.<random>.tmp``) are touched: another machine's writers may be alive, and its clock (or
            the file server's) need not agree with ``started``.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.rglob(".*.tmp")):
        match = TEMP_FILE.match(path.name)
        if not match or (owned is not None and Path(match.group("target")).stem not in owned):
            continue
        try:
            info = path.lstat()
            if not path.is_file() or path.is_symlink() or info.st_mtime >= started:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def holds_outputs(folder: Path) -> bool:
    """Whether ``folder`` (recursively) holds an output file: anything but ``settings.json`` files and hidden files
    (the writer's temporary files)."""
    if not folder.is_dir():
        return False
    return any(
        path.name != SETTINGS_FILE and not path.name.startswith(".") and path.is_file() for path in folder.rglob("*")
    )


def create_json_exclusively(path: Path, obj: Any) -> bool:
    """Write ``obj`` to ``path`` only if no file is there, atomically; returns whether this call created it.

    The content goes to a temporary file first, which is then hard-linked to ``path``: ``link(2)`` fails when
    ``path`` exists, also between machines on a shared (NFS) filesystem, so of several writers racing exactly one
    wins, and a reader sees either no file or a complete one. Where the filesystem has no hard links it falls back
    to an atomic replace (last writer wins).
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            logger.warning("%s: the filesystem has no hard links (%s); recording the settings by an atomic replace, "
                           "which is not exclusive between machines", path, err)  # fmt: skip
            os.replace(tmp, path)
        return True
    finally:
        if tmp.exists():
            tmp.unlink()


def _copy_hint(recorded: Any, current: Any) -> str:
    """A hint when two checkpoint identities differ in modification time only: the same file, copied without it."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)) or recorded == current:
        return ""
    if {k: v for k, v in recorded.items() if k != "mtime_ns"} != {k: v for k, v in current.items() if k != "mtime_ns"}:
        return ""
    return (
        " — the checkpoint differs in its modification time only: a copy that did not keep it (copy run folders "
        "between machines with `rsync -a` or `cp -p`, or give the copy the original's time with `touch -r`)"
    )


def check_settings(folder: Path, settings: Mapping[str, Any], write: bool, shared: bool = False) -> None:
    """Refuse to resume into ``folder`` when its outputs were made with other settings.

    The tools skip ids whose output exists; without this check, changing e.g. ``pseudo.refine`` and re-running would
    silently mix old and new outputs. ``folder/settings.json`` records the settings of the run that claimed the
    folder, created exclusively (:func:`create_json_exclusively`: of machines racing to claim a shared folder, one
    wins and the others compare with its record). A folder whose recorded settings differ (or cannot be read) but
    that holds no output file yet is re-claimed with ``settings`` and a log line: the run that recorded them failed
    before its first output (a missing or corrupt checkpoint, a typo), and refusing would block the corrected rerun
    for nothing. A sharded run (``shared``) never re-claims: the record may be another machine's that has not written
    its first output yet, so differing settings are refused even in an empty folder.

    Args:
        folder: the output folder.
        settings: JSON-serialisable values that determine the outputs.
        write: record ``settings`` when the folder has none yet, or re-claim it (rank 0 only).
        shared: other machines write into ``folder`` too (``run.num_shards`` > 1).

    Raises:
        InputError: the recorded settings differ and the folder holds outputs (or ``shared``); the message lists the
            keys and how to proceed (also when ``settings.json`` is unreadable).
    """
    path = folder / SETTINGS_FILE
    plain = json.loads(json.dumps(dict(settings)))  # tuples -> lists, so a re-read compares equal
    # no record yet: claim the folder; if another machine claimed it in the meantime, compare with its record
    if not path.is_file() and (not write or create_json_exclusively(path, plain)):
        return
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict):
            raise ValueError(f"expected a JSON object, got {type(recorded).__name__}")
    except (OSError, ValueError) as err:
        unreadable, recorded = f"cannot read {path}: {err}", None
    else:
        changed = sorted(k for k in set(plain) | set(recorded) if plain.get(k) != recorded.get(k))
        if not changed:
            return
        diff = "; ".join(f"{k}: {recorded.get(k)!r} -> {plain.get(k)!r}" for k in changed) + _copy_hint(
            recorded.get("checkpoint"), plain.get("checkpoint")
        )
    if shared:
        problem = unreadable if recorded is None else f"{folder} was claimed with other settings ({diff})"
        raise InputError(
            f"{problem}; every shard (run.num_shards) must run with the same settings. A sharded run never replaces "
            f"the record, since another shard may be working with it: if the run that wrote it failed before its "
            f"first output, delete {path} and rerun"
        )
    if not holds_outputs(folder):
        if write:
            logger.warning(
                "%s: re-claimed with the current settings (%s); it holds no output, so the run that recorded the old "
                "ones failed before its first", folder, unreadable if recorded is None else diff,
            )  # fmt: skip
            atomic_write_json(path, plain)
        return
    if recorded is None:
        raise InputError(f"{unreadable}; delete it if the folder's outputs are stale")
    raise InputError(
        f"{folder} holds outputs made with other settings ({diff}); delete the folder to redo them, or run with the "
        "recorded settings to resume"
    )


def prepare_outputs(
    claims: Sequence[tuple[Path, Mapping[str, Any] | None]],
    started: float,
    shard: Shard | None = None,
    ids: Sequence[str] = (),
) -> None:
    """Make the output folders ready before any rank writes into them (collective: every rank calls it).

    Rank 0 sweeps the temporary files killed runs left there (:func:`sweep_temp_files`) and, where settings are
    given, creates the folder and checks / records / re-claims its ``settings.json`` (:func:`check_settings`). The
    other ranks wait for its verdict, so no rank writes before the sweep is over, and all of them fail with the same
    message when a folder is refused. A sharded run (``shard.count`` > 1: other machines may write the same folders)
    sweeps only the temporary files of its own ids and never re-claims a folder.

    Args:
        claims: ``(folder, settings)`` pairs; ``settings`` None = sweep only (e.g. overlay folders).
        started: ``time.time()`` at the start of this run (temporary files from after it are left alone).
        shard: this machine's part of the split (None = all of it).
        ids: the split's ids (needed when ``shard`` is sharded).

    Raises:
        InputError: a folder was refused (on every rank).
    """
    shard = shard or Shard()
    owned = set(shard.ids(ids)) if shard.sharded else None
    verdict: tuple[bool, str] | None = None
    failure: BaseException | None = None
    if dist.is_main_process():
        try:
            for folder, settings in claims:
                removed = sweep_temp_files(folder, started, owned)
                if removed:
                    logger.info("removed %d temporary file(s) left by a killed run in %s", len(removed), folder)
                if settings is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    check_settings(folder, settings, write=True, shared=shard.sharded)
        except Exception as err:  # every rank must hear of it, or the others would wait for rank 0 forever
            failure, verdict = err, (isinstance(err, UserError), str(err))
    verdict = dist.all_gather_object(verdict)[0]  # also the barrier: nobody writes before rank 0 is done
    if failure is not None:
        raise failure
    if verdict is not None:
        user, message = verdict
        if user:
            raise InputError(message)
        raise RuntimeError(f"rank 0 could not prepare the output folders: {message}")
