"""Logging, configured once per process: rank-0 console + log file, ``metrics.jsonl`` and TensorBoard.

Modules log through ``logging.getLogger(__name__)``; only :func:`setup_logging` touches handlers. Other ranks log
warnings and errors to the console (prefixed with their rank) so a failure on any rank is visible.

Progress: :func:`progress_bar` is a tqdm bar on a terminal and periodic log lines (done/total, rate, ETA) elsewhere
(nohup, SLURM, a pipe), where a bar would print nothing or a wall of carriage returns. :class:`StepClock` gives a
training loop's seconds per step and ETA for its log lines; :func:`format_duration` writes seconds as h:mm:ss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

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

    def log_image(self, step: int, tag: str, image: np.ndarray, panels: Iterable[str] = ()) -> None:
        """Write an ``[H, W, 3]`` uint8 image to TensorBoard under :meth:`image_tag` ``(tag, panels)``.

        ``panels`` names the image's panels left to right (e.g. image, CAM, prediction), so the tag says what each
        panel of a strip is; without it the tag is ``tag`` itself.
        """
        if self._tb is not None:
            self._tb.add_image(self.image_tag(tag, panels), image, step, dataformats="HWC")

    @staticmethod
    def image_tag(tag: str, panels: Iterable[str] = ()) -> str:
        """``"tag (a | b | c)"`` for panels a, b, c; ``tag`` without panels."""
        names = [str(name) for name in panels]
        return f"{tag} ({' | '.join(names)})" if names else tag

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


# --------------------------------------------------------------------------------------------- progress and pace


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``seconds`` as h:mm:ss (hours unbounded, e.g. ``27:03:09``); negative values count as 0."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class StepClock:
    """Wall-clock pace of a step loop, for its log lines: seconds per step over the last window, and the ETA.

    Call :meth:`lap` at each log line. ``sec_per_it`` is the time since the previous lap (or since construction)
    divided by the steps since then. ``eta_s`` is the steps left to ``total`` times the mean seconds per step since
    the first lap: the first window, which holds the start-up costs (loader workers, compilation, the first CUDA
    kernels), is left out once a later window exists, while periodic checkpoints and validations stay in, so their
    share is in the estimate. Host clock only: nothing waits for the device.

    Args:
        start_step: the step the loop starts at (0, or the resumed step).
        total: the step the ETA counts down to (``train.max_iters``).
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, start_step: int, total: int, clock: Callable[[], float] = time.monotonic):
        self.total = int(total)
        self._clock = clock
        self._last = (clock(), int(start_step))
        self._first: tuple[float, int] | None = None

    def lap(self, done: int) -> dict[str, float]:
        """``{"sec_per_it", "eta_s"}`` after ``done`` completed steps."""
        now = self._clock()
        last_time, last_step = self._last
        sec_per_it = (now - last_time) / max(1, done - last_step)
        if self._first is None or done <= self._first[1]:
            self._first, mean = (now, done), sec_per_it
        else:
            mean = (now - self._first[0]) / (done - self._first[1])
        self._last = (now, done)
        return {"sec_per_it": sec_per_it, "eta_s": max(0, self.total - done) * mean}


class _NullStream:
    """Where a logging progress bar sends tqdm's own drawing: nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class LoggedProgress(tqdm):
    """A tqdm bar that, instead of drawing, logs a line when it starts, every ``log_every_s`` seconds, and at the end.

    Lines: ``DESC: started, total unit``; ``DESC: done/total (percent) | rate unit/s | elapsed h:mm:ss | ETA
    h:mm:ss``; ``DESC: done, n unit in h:mm:ss (rate unit/s)``; the rate is the mean since the bar started, and a
    postfix (``set_postfix``) is appended. Everything else (iteration, ``update``, ``with``) is tqdm's. Use
    :func:`progress_bar`, which picks this or a plain bar.

    Args:
        log_every_s: seconds between lines (0: a line at every update).
        logger: where lines go (default: the ``progress`` logger).
        clock: seconds, monotonic (injectable for tests); tqdm keeps its own clock for its bookkeeping.
    """

    def __init__(self, *args: Any, log_every_s: float = 30.0, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic, **kwargs: Any):  # fmt: skip
        self._log = logger or logging.getLogger("progress")
        self._clock = clock
        self._log_every_s = float(log_every_s)
        self._started = self._last_line = clock()
        self._closing = False
        # tqdm asks display() at every item (a clock read and a comparison here), which alone decides on a line
        kwargs.update(file=_NullStream(), disable=False, miniters=1, mininterval=0)
        super().__init__(*args, **kwargs)
        self._log.info("%s: started, %s %s", self._desc(), self.total if self.total is not None else "?", self.unit)

    def _desc(self) -> str:
        return self.desc or "progress"

    def _rate(self) -> tuple[float, float]:
        """(seconds since the start, mean items per second)."""
        elapsed = max(self._clock() - self._started, 1e-9)
        return elapsed, (self.n - self.initial) / elapsed

    def _postfix(self) -> str:
        return f" | {self.postfix}" if self.postfix else ""

    def _line(self) -> str:
        elapsed, rate = self._rate()
        done = f"{self.n}/{self.total} ({100.0 * self.n / self.total:.1f}%)" if self.total else f"{self.n} {self.unit}"
        parts = [f"{self._desc()}: {done}", f"{rate:.3g} {self.unit}/s", f"elapsed {format_duration(elapsed)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration(max(0, self.total - self.n) / rate)}")
        return " | ".join(parts) + self._postfix()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Log a line when ``log_every_s`` has passed since the last one (tqdm calls this instead of drawing)."""
        now = self._clock()
        if self._closing or self.n <= self.initial or now - self._last_line < self._log_every_s:
            return False
        self._last_line = now
        self._log.info("%s", self._line())
        return True

    def close(self) -> None:
        """Log the final line (count, time taken, mean rate), then close as tqdm does."""
        if not self.disable and not self._closing:
            self._closing = True
            elapsed, rate = self._rate()
            self._log.info("%s: done, %d %s in %s (%.3g %s/s)%s", self._desc(), self.n, self.unit,
                           format_duration(elapsed), rate, self.unit, self._postfix())  # fmt: skip
        super().close()


def progress_bar(iterable: Iterable[Any] | None = None, *, log_every_s: float = 30.0,
                 logger: logging.Logger | None = None, **kwargs: Any) -> tqdm:  # fmt: skip
    """``tqdm(iterable, **kwargs)`` on a terminal; a :class:`LoggedProgress` (periodic log lines) elsewhere.

    A drop-in for ``tqdm(...)`` in a tool's loop: on a terminal nothing changes; under nohup, SLURM or a pipe, where
    a bar stays silent until the end (``disable=None``) or floods the log with carriage returns, it logs a line
    every ``log_every_s`` seconds. ``disable=True`` (e.g. on ranks other than 0) disables both; ``disable=None`` is
    taken as False. The terminal test is on ``kwargs["file"]``, default stderr. The bar follows the terminal's width
    (``dynamic_ncols``) unless told otherwise.
    """
    kwargs.setdefault("dynamic_ncols", True)
    if kwargs.get("disable") is True:
        return tqdm(iterable, **kwargs)
    if is_terminal(kwargs.get("file")):
        return tqdm(iterable, **{**kwargs, "disable": False})
    return LoggedProgress(iterable, log_every_s=log_every_s, logger=logger, **kwargs)
