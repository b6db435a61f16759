"""Measuring helpers for ``tools/benchmark.py``: phase clocks, profiler-label aggregation, memory and the machine
description. Generic over what is measured (this module imports nothing of ours). Host reads / device syncs are
counted by ``utils/syncs.py``.

* :class:`PhaseClock` times named phases without adding host-device synchronisations: ``time.perf_counter`` on the
  CPU, CUDA events on a GPU (read once, in :meth:`PhaseClock.seconds`, after one final synchronisation).
* :func:`label_times` sums the ``torch.profiler.record_function`` ranges of a profile by label.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{min, median, max, mean, n}`` of ``values`` (a repeated measurement)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread: no values")
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}  # fmt: skip


class PhaseClock:
    """Accumulates the duration of named phases; ``with clock.phase("backward"): ...``.

    On a CUDA device each phase is bracketed by two CUDA events on the current stream, so timing adds no
    synchronisation; :meth:`seconds` synchronises once and reads them. On the CPU, work is synchronous and
    ``perf_counter`` is exact. Durations of a name entered several times are summed.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._spans: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._spans.append((name, start, end))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self._spans.append((name, start, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Phase name -> total seconds (in first-entered order); clears the clock."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self._spans:
            elapsed = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            totals[name] = totals.get(name, 0.0) + elapsed
        self._spans = []
        return totals


def raw_events(prof: Any) -> list[Any]:
    """The raw Kineto events of a finished ``torch.profiler.profile``.

    ``prof.events()`` first builds a Python ``FunctionEvent`` tree of every op, which takes seconds per step of a
    model with ~10k small ops; the raw events are enough for :func:`label_times`.
    """
    results = prof.profiler.kineto_results
    return list(results.events()) if results is not None else []


def _on_host(event: Any) -> bool:
    return getattr(event.device_type(), "name", str(event.device_type())).upper() == "CPU"


def label_times(events: Iterable[Any], prefixes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Sum the ``record_function`` ranges whose label starts with one of ``prefixes``.

    Args:
        events: :func:`raw_events` of a profile (Kineto events: ``name()``, ``device_type()``, ``start_ns()``, ...).

    Returns:
        label -> ``{"calls", "host_seconds", "device_seconds"}`` in order of first appearance. ``host_seconds`` is
        the range's wall time on the thread that entered it (children included); on the CPU, where ops run
        synchronously, that is the phase's time. ``device_seconds`` is the time of the GPU kernels and copies
        launched inside the range from that thread (matched as torch's own profiler does, by correlation id; 0
        without CUDA activity; backward ops run on autograd's own threads, so a range around ``backward()`` gets
        none of them).
    """
    prefixes = tuple(prefixes)
    ranges: dict[int, list[tuple[int, int, str]]] = {}  # thread -> (start, end, label)
    launched: dict[int, tuple[int, int]] = {}  # correlation id -> (thread, start) of the host op
    device: list[tuple[int, int]] = []  # (linked correlation id, duration ns) of device activity
    totals: dict[str, dict[str, float]] = {}
    for event in events:
        name = str(event.name())
        if _on_host(event):
            if name.startswith(prefixes):
                entry = totals.setdefault(name, {"calls": 0, "host_seconds": 0.0, "device_seconds": 0.0})
                entry["calls"] += 1
                entry["host_seconds"] += event.duration_ns() / 1e9
                ranges.setdefault(event.start_thread_id(), []).append((event.start_ns(), event.end_ns(), name))
            if event.correlation_id() > 0:
                launched[event.correlation_id()] = (event.start_thread_id(), event.start_ns())
        elif not name.startswith(prefixes) and not event.is_user_annotation() and event.linked_correlation_id() > 0:
            device.append((event.linked_correlation_id(), event.duration_ns()))
    for correlation, duration in device:
        if correlation not in launched:
            continue
        thread, at = launched[correlation]
        for start, end, name in ranges.get(thread, ()):
            if start <= at <= end:
                totals[name]["device_seconds"] += duration / 1e9
    return totals


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; 0 where it is not available)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return 0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (JSON-ready)."""
    device = torch.device(device)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "memory_bytes": _total_memory(),
    }
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _total_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return None
