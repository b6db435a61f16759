"""Logging, configured once per process: rank-0 console + log file, ``metrics.jsonl`` and TensorBoard.

Modules log through ``logging.getLogger(__name__)``; only :func:`setup_logging` touches handlers. Other ranks log
warnings and errors to the console (prefixed with their rank) so a failure on any rank is visible.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from utils.io import atomic_write_text

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


def setup_logging(out_dir: str | Path | None, rank: int = 0, filename: str = "train.log") -> None:
    """Configure the root logger for this process (idempotent: previous handlers are replaced)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    if rank == 0:
        console.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        console.setLevel(logging.INFO)
    else:
        console.setFormatter(logging.Formatter(f"[rank {rank}] {_FORMAT}", _DATEFMT))
        console.setLevel(logging.WARNING)
    root.addHandler(console)
    if out_dir is not None and rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(out_dir) / filename)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    for noisy in ("PIL", "matplotlib", "timm", "urllib3", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:  # 0-dim / 1-element tensors
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Rank-0 scalar/image sink: ``metrics.jsonl`` (one JSON object per record) and TensorBoard under ``tb/``.

    Records are keyed by the number of completed steps. On resume, records after ``resume_step`` (written by the
    interrupted run after its last checkpoint) are dropped from ``metrics.jsonl`` and TensorBoard, so the files never
    hold two histories for the same step. On ranks other than 0 every method is a no-op.
    """

    def __init__(self, out_dir: str | Path, rank: int = 0, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = rank == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and rank 0 only

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"), purge_step=purge)

    def _truncate(self, resume_step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
            if record.get("step", -1) <= resume_step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: Mapping[str, Any], kind: str = "train") -> None:
        """Append one record ``{"step", "kind", **values}`` and write each number to TensorBoard as kind/name."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Write an ``[H, W, 3]`` uint8 image to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` records (optionally of one kind), skipping a torn last line."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
