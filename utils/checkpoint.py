"""Checkpoints that resume a run exactly: model (unwrapped), optimiser, AMP scaler, step, config, RNG state per rank.

The memory bank and the teacher projection head live in the model's state dict (buffers / parameters), so they are
saved and restored with it. Files are written atomically (temporary file + rename): a run killed while writing keeps
its previous checkpoint, and ``find_latest`` only ever sees complete files.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils import dist
from utils.io import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NUMBERED = re.compile(r"^iter_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this model or run; the message names the file and the mismatch."""


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


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


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
    """Atomically write a checkpoint. ``step`` is the number of optimiser steps completed (= the next step index).

    Call on rank 0 only (gather per-rank RNG states first with :func:`gather_rng_states`).
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
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def gather_rng_states(device_generator: torch.Generator | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (collective: call on all ranks)."""
    return dist.all_gather_object(rng_state(device_generator))  # type: ignore[return-value]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(payload, dict) or "model" not in payload or "step" not in payload:
        raise CheckpointError(f"{path} is not an MSFC training checkpoint (no 'model'/'step' entries)")
    return payload


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly; a mismatch raises an error listing missing / unexpected / reshaped keys."""
    target = unwrap(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [f"{name}: {show(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", reshaped)) if keys]  # fmt: skip
        raise CheckpointError(
            f"checkpoint {source} does not match this {type(target).__name__} (a different backbone, number of "
            f"classes or head size?) — " + "; ".join(parts)
        )
    target.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device_generator: torch.Generator | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint into ``model`` (and optimiser / scaler / this rank's RNG state when given).

    Returns:
        ``(step, extra)``: the step to continue from and the checkpoint's ``extra`` mapping.
    """
    payload = read_checkpoint(path)
    load_model_state(model, payload["model"], str(path))
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path} holds no optimiser state, so it cannot resume training")
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    rng = payload.get("rng")
    if rng:
        rank = dist.get_rank()
        if len(rng) == dist.get_world_size():
            set_rng_state(rng[rank], device_generator)
        else:
            logger.warning(
                "checkpoint %s was written by %d processes, this run has %d: random streams restart from the seed",
                path, len(rng), dist.get_world_size(),
            )  # fmt: skip
    return int(payload["step"]), dict(payload.get("extra") or {})


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``last.pth`` if present, else the highest ``iter_N.pth``, else None."""
    folder = checkpoint_dir(run_dir)
    if (folder / "last.pth").is_file():
        return folder / "last.pth"
    numbered = sorted((int(m.group(1)), p) for p in folder.glob("iter_*.pth") if (m := _NUMBERED.match(p.name)))
    return numbered[-1][1] if numbered else None


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
