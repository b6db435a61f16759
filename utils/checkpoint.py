"""Checkpoints that resume a run exactly: model (unwrapped), optimiser, AMP scaler, step, config, RNG state per rank.

The memory bank and the teacher projection head live in the model's state dict (buffers / parameters), so they are
saved and restored with it.

Integrity: a checkpoint is the zip archive ``torch.save`` writes, sealed with a zip comment
``MSFC-CHECKPOINT step=<N> sha256=<hex>``: the SHA-256 of every byte before the comment's length field. The file
stays a valid zip that ``torch.load`` (and any zip tool) reads unchanged. Reading a sealed file verifies it first, so
a damaged one is a :class:`CheckpointError` naming the file instead of silently wrong weights; files written before
seals existed load with a warning. The seal also records the step, so :func:`find_latest` ranks checkpoints by step
without loading them, and skips (with a warning) one that is damaged.

Durability: a file is written under a temporary name, sealed, fsynced, renamed over its final name, and the folder is
fsynced. A run killed while writing keeps the previous file and leaves at most a ``.<name>.<random>.tmp`` file; once
:func:`save_checkpoint` returns, the checkpoint survives a power cut. A failed write (a full disk) raises a
:class:`CheckpointError` naming the file and the free space; the file it would have replaced is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from utils import dist
from utils.errors import UserError
from utils.io import atomic_path
from utils.text import preview

logger = logging.getLogger(__name__)

# 2: the file is sealed (content checksum and step in the zip comment); 1 = unsealed.
FORMAT_VERSION = 2
LAST = "last.pth"
_NUMBERED = re.compile(r"^iter_(\d+)\.pth$")
SEAL_PREFIX = b"MSFC-CHECKPOINT "
_SEAL = re.compile(rb"MSFC-CHECKPOINT step=(\d+) sha256=([0-9a-f]{64})")
# The zip end-of-central-directory record: 22 bytes starting with this signature, the last 2 the comment length.
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
# How much of a file's end is read to find its seal (the comment is under 100 bytes).
_TAIL = 512
_CHUNK = 1 << 24
# torch.save reports a failed write (a full disk among others) as a RuntimeError from its zip writer.
_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written, read or used for this model or run; the message names the file."""


@dataclass(frozen=True)
class Seal:
    """What a sealed checkpoint records about itself: its step and the SHA-256 of its first ``covered`` bytes."""

    step: int
    sha256: str
    covered: int


def rng_state(device_generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's random state: Python, NumPy, torch CPU (+ CUDA) and an optional device generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if device_generator is not None:
        state["device_generator"] = device_generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], device_generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if device_generator is not None and "device_generator" in state:
        device_generator.set_state(state["device_generator"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave the global random streams (Python, NumPy, torch CPU and CUDA) as they were before the block.

    Validation runs inside it: whatever it draws (a DataLoader's worker seed, say) must not shift the training
    streams, or a run resumed from the checkpoint written just before it would diverge from one that never stopped.
    """
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _sha256(f: IO[bytes], length: int) -> str:
    """SHA-256 of the first ``length`` bytes of the open binary file ``f``."""
    f.seek(0)
    digest, left = hashlib.sha256(), length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _seal_file(path: Path, step: int) -> None:
    """Append the seal comment to the zip archive ``path`` that torch.save just wrote, and fsync it."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _EOCD_SIZE))
        record = f.read()
        if len(record) != _EOCD_SIZE or not record.startswith(_EOCD) or record[-2:] != b"\0\0":
            raise CheckpointError(f"cannot seal {path}: torch.save did not end it with a zip end record")
        comment = SEAL_PREFIX + f"step={int(step)} sha256={_sha256(f, size - 2)}".encode()
        f.seek(size - 2)
        f.write(len(comment).to_bytes(2, "little") + comment)
        f.flush()
        os.fsync(f.fileno())


def read_seal(path: str | Path) -> Seal | None:
    """The seal of a checkpoint, read from the file's last bytes (its content is not checked here).

    Returns:
        The seal, or None when the file has none (written before checkpoints were sealed, or not a checkpoint).

    Raises:
        CheckpointError: the file ends with a seal that is damaged.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL))
        tail = f.read()
    start = tail.rfind(SEAL_PREFIX)
    if start < 0:
        return None
    comment = tail[start:]
    match = _SEAL.fullmatch(comment)
    length = int.from_bytes(tail[start - 2 : start], "little") if start >= 2 else -1
    record = start - _EOCD_SIZE
    if match is None or length != len(comment) or record < 0 or tail[record : record + 4] != _EOCD:
        raise CheckpointError(f"checkpoint {path} is damaged: the seal at its end (step and checksum) is unreadable")
    return Seal(step=int(match[1]), sha256=match[2].decode(), covered=size - len(comment) - 2)


def verify_checkpoint(path: str | Path) -> Seal | None:
    """Check a checkpoint's content against its seal (reads the whole file once).

    Returns:
        The seal, or None for an unsealed file (nothing to check it against).

    Raises:
        CheckpointError: the content differs from what was written (or the seal is damaged).
    """
    path = Path(path)
    seal = read_seal(path)
    if seal is None:
        return None
    with open(path, "rb") as f:
        actual = _sha256(f, seal.covered)
    if actual != seal.sha256:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: the SHA-256 of its content ({actual[:16]}...) is not the one recorded "
            f"when it was written ({seal.sha256[:16]}...)"
        )
    return seal


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform and file system allow it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _write_failure(path: Path, err: BaseException) -> CheckpointError:
    """One message for a checkpoint that could not be written: the file, the cause, the free space, what survives."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    try:
        free = f"{_human(shutil.disk_usage(path.parent).free)} free on its file system"
    except OSError:
        free = "free space unknown"
    newest = []
    for candidate in sorted(path.parent.glob("*.pth")):
        with contextlib.suppress(OSError, CheckpointError):
            seal = read_seal(candidate)
            if seal is not None:
                newest.append((seal.step, candidate.name))
    kept = (
        f"the previous {path.name} is intact"
        if path.exists()
        else f"there was no previous {path.name} and nothing was left in its place"
    )
    if newest:
        step, name = max(newest)
        kept += f" (newest complete checkpoint: {name}, step {step})"
    return CheckpointError(
        f"cannot write checkpoint {path}: {reason}; {free}; {kept}. Free some space, then continue with "
        "train.resume=auto"
    )


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    config: Mapping[str, Any] | None = None,
    rng: list[dict[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically and durably write a sealed checkpoint. ``step`` = optimiser steps completed (= the next step index).

    Call on rank 0 only (gather per-rank RNG states first with :func:`gather_rng_states`).

    Raises:
        CheckpointError: the file could not be written (e.g. the disk is full); the message names the file and the
            free space, and the file it would have replaced is untouched.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "model_class": type(unwrap(model)).__name__,
        "model": unwrap(model).state_dict(),
        "step": int(step),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "config": None if config is None else dict(config),
        "rng": rng,
        "extra": dict(extra or {}),
    }
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
            _seal_file(tmp, int(step))
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(mark in str(err) for mark in _WRITE_FAILURES):
            raise  # not a failed write (e.g. an object that cannot be pickled): a bug, keep its traceback
        raise _write_failure(path, err) from err
    _fsync_dir(path.parent)
    return path


def gather_rng_states(device_generator: torch.Generator | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (collective: call on all ranks)."""
    return dist.all_gather_object(rng_state(device_generator))  # type: ignore[return-value]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify (see the module docstring) and load a checkpoint's payload on the CPU.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is damaged, unreadable or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        seal = verify_checkpoint(path)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if seal is None:
        logger.warning("checkpoint %s has no checksum (written before checkpoints were sealed, or not by this "
                       "project): loading it unverified", path)  # fmt: skip
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or "model" not in payload or "step" not in payload:
        raise CheckpointError(f"{path} is not an MSFC training checkpoint (no 'model'/'step' entries)")
    if seal is not None and int(payload["step"]) != seal.step:
        raise CheckpointError(f"checkpoint {path} holds step {payload['step']} but its seal says {seal.step}")
    return payload


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly; a mismatch raises an error listing missing / unexpected / reshaped keys."""
    target = unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{name}: {preview(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", reshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"checkpoint {source} does not match this {type(target).__name__} (a different backbone, number of "
            f"classes or head size?) — " + "; ".join(parts)
        )
    target.load_state_dict(state, strict=True)


def rank_rng_state(payload: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """This rank's RNG state in a checkpoint, or None (none saved, or saved by another number of processes)."""
    rng = payload.get("rng")
    if not rng:
        return None
    if len(rng) != dist.get_world_size():
        logger.warning(
            "checkpoint %s was written by %d processes, this run has %d: random streams restart from the seed",
            source, len(rng), dist.get_world_size(),
        )  # fmt: skip
        return None
    return rng[dist.get_rank()]


def restore_checkpoint(
    payload: Mapping[str, Any],
    source: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device_generator: torch.Generator | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Restore a payload from :func:`read_checkpoint` into ``model`` (and optimiser / scaler / RNG state when given).

    ``restore_rng=False`` leaves the random streams to the caller (:func:`rank_rng_state`), who may have to restore
    them later, right before the first step.

    Returns:
        ``(step, extra)``: the step to continue from and the checkpoint's ``extra`` mapping.
    """
    load_model_state(model, payload["model"], source)
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {source} holds no optimiser state, so it cannot resume training")
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        state = rank_rng_state(payload, source)
        if state is not None:
            set_rng_state(state, device_generator)
    return int(payload["step"]), dict(payload.get("extra") or {})


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device_generator: torch.Generator | None = None,
) -> tuple[int, dict[str, Any]]:
    """Verify, read and restore a checkpoint into ``model`` (and optimiser / scaler / this rank's RNG state).

    Returns:
        ``(step, extra)``: the step to continue from and the checkpoint's ``extra`` mapping.
    """
    return restore_checkpoint(read_checkpoint(path), str(path), model, optimizer, scaler, device_generator)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """The files a run can resume from: ``last.pth`` and every ``iter_N.pth`` (best_* are never newer than them)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    names = [LAST, *sorted(p.name for p in folder.glob("iter_*.pth") if _NUMBERED.match(p.name))]
    return [folder / name for name in names if (folder / name).is_file()]


def checkpoint_step(path: str | Path) -> int:
    """A checkpoint's step: from its seal (a few bytes), else from its name (``iter_N``), else by loading it."""
    path = Path(path)
    seal = read_seal(path)
    if seal is not None:
        return seal.step
    if match := _NUMBERED.match(path.name):
        return int(match.group(1))
    return int(read_checkpoint(path)["step"])


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the highest step among ``last.pth`` and ``iter_N.pth`` that passes its check.

    Checkpoints are ranked by the step they hold, not by name (``last.pth`` wins a tie). One that is damaged or
    unreadable is skipped with a warning naming it, and the next newest is tried.

    Returns:
        The path, or None when the run has no checkpoint.

    Raises:
        CheckpointError: there are checkpoints but none is usable (the message lists each one's problem).
    """
    problems: list[str] = []
    ranked: list[tuple[int, bool, Path]] = []
    for path in resume_candidates(run_dir):
        try:
            ranked.append((checkpoint_step(path), path.name == LAST, path))
        except (OSError, CheckpointError) as err:
            problems.append(str(err))
            logger.warning("skipping %s: %s", path, err)
    for _, _, path in sorted(ranked, key=lambda entry: entry[:2], reverse=True):
        try:
            if verify_checkpoint(path) is None:
                read_checkpoint(path)  # unsealed: loading it is the only check there is
        except (OSError, CheckpointError) as err:
            problems.append(str(err))
            logger.warning("skipping %s, trying the next newest checkpoint: %s", path, err)
            continue
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(problems))
    return None


def prune_numbered(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``iter_N.pth`` files (``last`` and ``best`` are never touched)."""
    folder = checkpoint_dir(run_dir)
    numbered = sorted((int(m.group(1)), p) for p in folder.glob("iter_*.pth") if (m := _NUMBERED.match(p.name)))
    for _, path in numbered[: max(0, len(numbered) - keep)]:
        path.unlink(missing_ok=True)


def remove_partial_files(run_dir: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in the checkpoint folder; returns what was removed."""
    removed = []
    for path in checkpoint_dir(run_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# eval.checkpoint names -> file in RUN/checkpoints/. best_cam / best_seg are chosen on the validation split during
# training (tools/train.py), so a number reported on that split from them is tuned on it; `last` is the protocol.
CHECKPOINT_FILES = {"last": LAST, "best_cam": "best_cam.pth", "best_seg": "best_seg.pth"}

# The deprecated alias `best`, in order of preference; best.pth is what run folders trained before the split wrote.
BEST_ALIAS_FILES = ("best_seg.pth", "best_cam.pth", "best.pth", "last.pth")

_warned_alias: set[Path] = set()


def best_file(metric: str) -> str:
    """The checkpoint holding the best score of validation metric ``metric`` so far: ``cam_miou`` -> ``best_cam.pth``.

    Each metric keeps its own best: a CAM mIoU and a segmentation mIoU are not comparable numbers.
    """
    return f"best_{metric.removesuffix('_miou')}.pth"


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """The checkpoint named by ``eval.checkpoint``.

    ``last`` (the final checkpoint; the protocol of SPEC §8), ``best_cam`` / ``best_seg`` (the best validation CAM /
    segmentation mIoU seen in training), or a path to a checkpoint file. ``best`` is a deprecated alias kept for old
    run folders: ``best_seg.pth``, else ``best_cam.pth``, else the old ``best.pth``, else ``last.pth``, with a
    warning naming the file it picked.

    Raises:
        FileNotFoundError: the named checkpoint does not exist; the message names ``eval.checkpoint``.
    """
    choice = str(cfg.eval.checkpoint)
    folder = checkpoint_dir(cfg.run.out_dir)
    if choice in CHECKPOINT_FILES:
        path = folder / CHECKPOINT_FILES[choice]
        if path.is_file():
            return path
        why = {"last": "train first", "best_cam": "written only when training validates (train.eval_every > 0)",
               "best_seg": "written only by validations after the decoder started training (train.eval_every > 0, "
                           "loss.weight.seg > 0)"}[choice]  # fmt: skip
        present = sorted(p.name for p in folder.glob("*.pth")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"eval.checkpoint={choice}: no {path.name} in {folder} ({why}); present: {present or 'none'}. Set "
            f"eval.checkpoint to one of {' | '.join(CHECKPOINT_FILES)} or a checkpoint path"
        )
    if choice == "best":
        for name in BEST_ALIAS_FILES:
            if (folder / name).is_file():
                if folder / name not in _warned_alias:  # every tool resolves several times; say it once
                    _warned_alias.add(folder / name)
                    logger.warning(
                        "eval.checkpoint=best is deprecated (best_cam | best_seg | last); using %s. Reported numbers "
                        "follow SPEC §8 with eval.checkpoint=last", folder / name,
                    )  # fmt: skip
                return folder / name
        raise FileNotFoundError(
            f"eval.checkpoint=best (deprecated): none of {', '.join(BEST_ALIAS_FILES)} in {folder}; train first, or "
            f"set eval.checkpoint to one of {' | '.join(CHECKPOINT_FILES)} or a checkpoint path"
        )
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.checkpoint={choice}: file not found (the choices are {' | '.join(CHECKPOINT_FILES)} or a path to a "
            "checkpoint file)"
        )
    return path


def checkpoint_identity(cfg: DictConfig) -> dict[str, object]:
    """The resolved ``eval.checkpoint`` with its size and modification time, for the tools' ``settings.json``.

    A path alone would let outputs of an earlier training run (same run folder, same ``last.pth`` name) pass as
    current; size and mtime change whenever a checkpoint is rewritten.
    """
    path = resolve_checkpoint(cfg).resolve()
    stat = path.stat()
    run_dir = Path(cfg.run.out_dir).resolve()
    # relative to the run folder when inside it, so a run folder moved to another disk still resumes
    shown = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
    return {"path": str(shown), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
