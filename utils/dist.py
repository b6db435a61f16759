"""Distributed helpers. Every function is a no-op (or the identity) in a single process, so callers never branch.

Processes are started by torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK; this module only reads them.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from utils.errors import UserError

logger = logging.getLogger(__name__)

# linux/prctl.h
PR_SET_PDEATHSIG = 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``).

    A rank whose torchrun launcher is killed (SIGKILL leaves it no time to stop its workers) would otherwise go on
    training as an orphan, holding GPUs and the run folder. The parent is read before and after arming the signal: a
    parent that died in between has already been replaced (by init or a subreaper), and no signal would ever come, so
    this process sends ``sig`` to itself at once. The kernel ties the signal to the parent *thread*; torchrun starts
    its workers from its main thread, which lives as long as the launcher.

    Returns:
        Whether the signal is armed (False off Linux or when prctl fails).
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: this rank will not stop by itself if its launcher dies")
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def init_distributed(device: str = "auto", num_threads: int = 0, timeout_minutes: int = 30) -> torch.device:
    """Join the process group when started by torchrun and return this process's device.

    ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``. NCCL is used with CUDA, gloo without,
    so multi-process runs work (and are tested) on CPU. ``num_threads`` > 0 sets torch's intra-op CPU threads (on a
    small shared CPU, 1 thread per process avoids OpenMP threads waiting on each other). A process started by torchrun
    ends (SIGTERM) when its launcher dies (:func:`exit_with_parent`).
    """
    if launched_by_torchrun():
        exit_with_parent()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if device not in ("cuda", "cpu"):
        raise UserError(f"run.device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda":
        torch.cuda.set_device(get_local_rank())
        target = torch.device("cuda", get_local_rank())
    else:
        target = torch.device("cpu")
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=target if device == "cuda" else None,
        )
    return target


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity in one process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (identity in one process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj: object) -> list[object]:
    """Gather a picklable object from every rank (a one-element list in one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average a dict of scalars over ranks (same keys on every rank)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_mean(stacked)
    return dict(zip(keys, stacked.tolist(), strict=True))


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of ``items``: ``items[rank::world]`` (SPEC §5.1)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(items[rank::world_size])


def state_fingerprint(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A hash of every parameter and buffer of ``module`` whose name contains none of ``skip``."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        if any(part in name for part in skip):
            continue
        digest.update(name.encode())
        # flattened first: a 0-dim tensor (BatchNorm's num_batches_tracked) has no byte view of its own
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ranks_identical(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    """Whether ``module``'s state is bit-identical on every rank (collective; True in one process)."""
    fingerprints = all_gather_object(state_fingerprint(module, skip))
    return len(set(fingerprints)) == 1
