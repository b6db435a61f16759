"""Output folders of the inference tools: resumable sharded work, settings records, swept temporary files.

Every inference tool reads a trained run folder (``--run-dir RUN`` reloads ``RUN/config.yaml``), shards its images over
torchrun ranks (``ids[rank::world]``), skips images whose outputs exist (so an interrupted tool resumes), writes each
output atomically, and shows progress on rank 0.

Before any rank writes, :func:`prepare_outputs` (rank 0, then a collective) sweeps the temporary files a killed run left
in the output folders and checks each folder's ``settings.json``: a folder whose outputs were made with other settings
is refused, while a folder that holds no output yet (an earlier run failed before its first one) is re-claimed.
User mistakes (a missing run folder or checkpoint, a refused folder, a bad config value) end a tool with one
``error: ...`` line and exit code 2 (:func:`run_tool`, ``utils.errors``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from utils import dist
from utils.config import add_config_arguments, config_from_args
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


def pending_indices(ids: Sequence[str], folder: Path, suffix: str) -> tuple[list[int], int]:
    """This rank's share of ``ids`` (``[rank::world]``) whose output ``folder/<id><suffix>`` does not exist yet.

    Returns:
        (indices to process, number of this rank's ids already done).
    """
    mine = dist.shard(range(len(ids)))
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


def sweep_temp_files(folder: Path, started: float) -> list[Path]:
    """Delete the temporary files that killed writers left under ``folder`` (recursively); returns what was removed.

    Only names of ``utils.io.atomic_path``'s pattern (:data:`TEMP_FILE`) are touched, and only files last modified
    before ``started``: a writer of this run has not started when the sweep runs (:func:`prepare_outputs`), and a
    file that changed since this run began may belong to a writer that is still alive. A file that vanishes meanwhile
    (renamed into place by its writer) is skipped.

    Args:
        folder: an output folder; a missing one holds nothing.
        started: ``time.time()`` at the start of this run.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.rglob(".*.tmp")):
        if not TEMP_FILE.match(path.name):
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


def check_settings(folder: Path, settings: Mapping[str, Any], write: bool) -> None:
    """Refuse to resume into ``folder`` when its outputs were made with other settings.

    The tools skip ids whose output exists; without this check, changing e.g. ``pseudo.par`` and re-running would
    silently mix old and new outputs. ``folder/settings.json`` records the settings of the run that claimed the
    folder. A folder whose recorded settings differ (or cannot be read) but that holds no output file yet is
    re-claimed with ``settings`` and a log line: the run that recorded them failed before its first output (a missing
    or corrupt checkpoint, a typo), and refusing would block the corrected rerun for nothing.

    Args:
        folder: the output folder.
        settings: JSON-serialisable values that determine the outputs.
        write: record ``settings`` when the folder has none yet, or re-claim it (rank 0 only).

    Raises:
        InputError: the recorded settings differ and the folder holds outputs; the message lists the keys and how to
            proceed (also when ``settings.json`` is unreadable).
    """
    path = folder / SETTINGS_FILE
    plain = json.loads(json.dumps(dict(settings)))  # tuples -> lists, so a re-read compares equal
    if not path.is_file():
        if write:
            atomic_write_json(path, plain)
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
        diff = "; ".join(f"{k}: {recorded.get(k)!r} -> {plain.get(k)!r}" for k in changed)
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


def prepare_outputs(claims: Sequence[tuple[Path, Mapping[str, Any] | None]], started: float) -> None:
    """Make the output folders ready before any rank writes into them (collective: every rank calls it).

    Rank 0 sweeps the temporary files killed runs left there (:func:`sweep_temp_files`) and, where settings are
    given, creates the folder and checks / records / re-claims its ``settings.json`` (:func:`check_settings`). The
    other ranks wait for its verdict, so no rank writes before the sweep is over, and all of them fail with the same
    message when a folder is refused.

    Args:
        claims: ``(folder, settings)`` pairs; ``settings`` None = sweep only (e.g. overlay folders).
        started: ``time.time()`` at the start of this run (temporary files from after it are left alone).

    Raises:
        InputError: a folder was refused (on every rank).
    """
    verdict: tuple[bool, str] | None = None
    failure: BaseException | None = None
    if dist.is_main_process():
        try:
            for folder, settings in claims:
                removed = sweep_temp_files(folder, started)
                if removed:
                    logger.info("removed %d temporary file(s) left by a killed run in %s", len(removed), folder)
                if settings is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    check_settings(folder, settings, write=True)
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
