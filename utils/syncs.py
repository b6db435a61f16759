"""Counting host↔device synchronisations: every host read of a tensor's values while a block runs.

::

    with count_syncs() as counter:
        step(model, batch, 0, generator)
    counter.total        # number of host reads
    counter.by_site      # Counter of "losses/combine.py:123", the caller inside our packages
    counter.by_kind      # Counter of "tolist", "__bool__", "h2d", ...
    print(counter.report())

On CUDA, each of these makes the host wait until the GPU has finished everything queued before it, so the hot path
of a training step should have as few as possible. What is counted (``KINDS``):

- value reads: ``Tensor.item``, ``tolist``, ``__bool__`` (``if t:``), ``__float__``, ``__int__``, ``__index__``,
  ``numpy`` (and ``np.asarray(t)``), ``torch.equal`` / ``allclose`` / ``is_nonzero``;
- operations whose output shape (or validity check) depends on values, computed on the host: ``nonzero`` /
  ``argwhere`` / one-argument ``torch.where``, ``unique``, ``unique_consecutive``, ``masked_select``,
  ``repeat_interleave`` without ``output_size``, ``multinomial``, and indexing (``t[mask]``, ``t[mask] = v``) with a
  bool or uint8 tensor;
- blocking copies between devices (``non_blocking=False``): ``.cpu()``, ``.to(...)``, ``.cuda()``, ``copy_`` across
  devices, and ``torch.tensor`` / ``torch.as_tensor`` of host data onto a non-CPU device (PyTorch synchronises the
  stream after a blocking host-to-device copy). A non-blocking copy is not counted.

**On CPU** tensors there is no device to wait for, but a CPU run should show what a CUDA run would pay. So by default
(``cpu_reads=True``) the value reads and the value-dependent operations count whatever the tensor's device: a CPU test
sees exactly the reads that a CUDA run of the same code makes. Copies are counted only when they really cross
devices, so on a CPU-only machine none appears (a ``.to(device)`` is then a no-op); code that moves host data onto
the device should use :func:`to_device`, which never blocks. Reads of tensors that live on the host in *every* run
(draws of a CPU ``torch.Generator``, the loader's CPU batch) are not syncs anywhere: read them with :func:`host_item`
/ :func:`host_list`, which the counter keeps apart in ``counter.host``. Reads inside PyTorch of its own host state
(e.g. an optimiser's CPU step counters) cannot be told apart on CPU and are counted; ``cpu_reads=False`` counts only
reads of non-CPU tensors and copies, i.e. what actually synchronises a CUDA run.

Only calls from the thread that entered the block are counted (the loader's and logging threads are not), and a
counted call that calls another counted function inside PyTorch (``Tensor.unique`` → ``torch.unique``,
``np.asarray`` → ``numpy``) counts once. The patched methods are restored when the outermost block exits, also on an
exception. Patching slows every tensor method call a little: measure speed outside the block. Count eager code, or
compiled code after its first call (a first ``torch.compile`` inside the block would trace the patched methods).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# The repository root and the packages whose lines a site names (tests and scripts are named only as a fallback).
_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("core", "datasets", "engine", "losses", "models", "tools", "utils")
_OWN_FILE = str(Path(__file__).resolve())
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)

# Counting kinds: value reads, value-dependent operations, blocking copies.
VALUE_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "equal", "allclose",
               "is_nonzero")  # fmt: skip
VALUE_DEPENDENT = ("nonzero", "argwhere", "where", "unique", "unique_consecutive", "masked_select",
                   "repeat_interleave", "multinomial", "bool_index")  # fmt: skip
COPIES = ("d2h", "h2d", "d2d")
KINDS = VALUE_READS + VALUE_DEPENDENT + COPIES

# The unpatched readers, for host_item / host_list (also while a block is active).
_ITEM = torch.Tensor.item
_TOLIST = torch.Tensor.tolist

_lock = threading.RLock()
_active: list[SyncCounter] = []
_saved: list[tuple[Any, str, bool, Any]] = []  # (owner, name, was in owner.__dict__, original)
_state = threading.local()  # depth of patched calls on this thread (only the outermost counts)


class SyncCounter:
    """What :func:`count_syncs` counted.

    Attributes:
        by_site: ``"path/to/file.py:line"`` -> count; the line is the innermost caller inside our packages (core,
            datasets, engine, losses, models, tools, utils), else the innermost caller outside PyTorch.
        by_kind: kind (one of :data:`KINDS`) -> count.
        by_site_kind: ``(site, kind)`` -> count.
        host: reads made through :func:`host_item` / :func:`host_list` (host tensors: never a sync).
        cpu_reads: whether value reads of CPU tensors count (see the module docstring).
    """

    def __init__(self, cpu_reads: bool = True) -> None:
        self.cpu_reads = bool(cpu_reads)
        self.by_site: collections.Counter[str] = collections.Counter()
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.by_site_kind: collections.Counter[tuple[str, str]] = collections.Counter()
        self.host = 0
        self.thread = threading.get_ident()

    @property
    def total(self) -> int:
        """Number of counted host reads."""
        return sum(self.by_kind.values())

    def add(self, kind: str, site: str) -> None:
        self.by_site[site] += 1
        self.by_kind[kind] += 1
        self.by_site_kind[(site, kind)] += 1

    def report(self) -> str:
        """One line per site and kind, most frequent first, e.g. ``losses/combine.py:130 tolist x1``."""
        lines = [f"{self.total} host read(s)" + (f" (+{self.host} of host tensors)" if self.host else "")]
        lines += [f"  {site} {kind} x{n}" for (site, kind), n in self.by_site_kind.most_common()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SyncCounter(total={self.total}, by_site={dict(self.by_site)})"


@contextlib.contextmanager
def count_syncs(cpu_reads: bool = True) -> Iterator[SyncCounter]:
    """Count the host reads of tensor values made by this thread inside the block (see the module docstring).

    Blocks may nest; each counter sees the reads inside its own block. The original methods are back once the
    outermost block exits, whatever happened inside.

    Args:
        cpu_reads: count value reads and value-dependent operations of CPU tensors too (default: a CPU run then
            shows the reads a CUDA run makes); False counts only those of non-CPU tensors and cross-device copies.
    """
    counter = SyncCounter(cpu_reads)
    with _lock:
        if not _active:
            _patch()
        _active.append(counter)
    try:
        yield counter
    finally:
        with _lock:
            _active.remove(counter)
            if not _active:
                _restore()


def host_item(tensor: torch.Tensor) -> Any:
    """``tensor.item()`` of a tensor that lives on the host in every run (e.g. a CPU-generator draw): never a sync.

    Counted apart (``counter.host``), not as a sync. Raises for a non-CPU tensor: that read would be a sync.
    """
    _check_host(tensor)
    _count_host()
    return _ITEM(tensor)


def host_list(tensor: torch.Tensor) -> Any:
    """``tensor.tolist()`` of a tensor that lives on the host in every run; see :func:`host_item`."""
    _check_host(tensor)
    _count_host()
    return _TOLIST(tensor)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a host tensor to ``device`` without blocking the host.

    To CUDA the tensor is staged in pinned memory and copied with ``non_blocking=True`` (PyTorch's caching host
    allocator keeps the staging buffer alive until the copy has run); a plain ``.to(device)`` would synchronise the
    stream. On the tensor's own device this returns ``tensor`` itself.
    """
    device = torch.device(device)
    if tensor.device == device or (device.type == tensor.device.type and device.index is None):
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------------------------------


def _check_host(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"host_item / host_list: expected a CPU tensor, got one on {tensor.device} (a device sync)")


def _count_host() -> None:
    for counter in _active:
        if counter.thread == threading.get_ident():
            counter.host += 1


def _site() -> str:
    """The innermost caller inside our packages, as "package/file.py:line" (else the innermost outside torch)."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        label, ours = _classify(frame.f_code.co_filename)
        if ours:
            return f"{label}:{frame.f_lineno}"
        if fallback is None and label is not None:
            fallback = f"{label}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "<unknown>"


@functools.lru_cache(maxsize=4096)
def _classify(filename: str) -> tuple[str | None, bool]:
    """(label for a site or None to skip the file, whether it belongs to our packages)."""
    if filename == _OWN_FILE or filename.startswith(_TORCH_DIR) or filename.startswith("<"):
        return None, False
    path = Path(filename)
    try:
        relative = path.resolve().relative_to(_ROOT)
    except (ValueError, OSError):
        relative = None
    if relative is not None and relative.parts and relative.parts[0] in _PACKAGES:
        return relative.as_posix(), True
    if "site-packages" in filename:
        return None, False
    return (relative.as_posix() if relative is not None else path.name), False


def _record(kind: str, on_cpu: bool) -> None:
    ident = threading.get_ident()
    site = None
    for counter in _active:
        if counter.thread == ident and (counter.cpu_reads or not on_cpu):
            site = site or _site()
            counter.add(kind, site)


def _is_cpu(value: Any) -> bool:
    return not (isinstance(value, torch.Tensor) and value.device.type != "cpu")


def _outermost(call: Callable[[], Any], count: Callable[[Any], None]) -> Any:
    """Run ``call``; unless inside another patched call, ``count(result)`` after it."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        result = call()
    finally:
        _state.depth = depth
    if depth == 0:
        count(result)
    return result


def _reader(kind: str, original: Callable) -> Callable:
    """A value read: counted on every call (``cpu_reads``) or for non-CPU tensors."""

    def wrapper(self, *args, **kwargs):
        return _outermost(lambda: original(self, *args, **kwargs), lambda _: _record(kind, _is_cpu(self)))

    wrapper.__name__ = getattr(original, "__name__", kind)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    return wrapper


def _function_reader(kind: str, original: Callable, when: Callable[..., bool] | None = None) -> Callable:
    """A torch function reading values of its tensor arguments (counted when ``when(*args, **kwargs)``)."""

    def wrapper(*args, **kwargs):
        def count(_):
            if when is None or when(*args, **kwargs):
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                _record(kind, all(t.device.type == "cpu" for t in tensors))

        return _outermost(lambda: original(*args, **kwargs), count)

    wrapper.__name__ = getattr(original, "__name__", kind)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    return wrapper


def _has_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _indexer(original: Callable) -> Callable:
    def wrapper(self, index, *rest):
        def count(_):
            if _has_mask(index):
                _record("bool_index", _is_cpu(self))

        return _outermost(lambda: original(self, index, *rest), count)

    wrapper.__name__ = getattr(original, "__name__", "indexing")
    return wrapper


def _non_blocking(args: tuple, kwargs: dict) -> bool:
    if "non_blocking" in kwargs:
        return bool(kwargs["non_blocking"])
    return any(isinstance(a, bool) and a for a in args)


def _copy_kind(source: torch.device, target: torch.device) -> str | None:
    if source.type == target.type and (source.type == "cpu" or source == target):
        return None
    if target.type == "cpu":
        return "d2h"
    return "h2d" if source.type == "cpu" else "d2d"


def _mover(original: Callable) -> Callable:
    """``Tensor.to`` / ``cuda`` / ``cpu``: a blocking copy to another device counts."""

    def wrapper(self, *args, **kwargs):
        def count(result):
            if isinstance(result, torch.Tensor) and not _non_blocking(args, kwargs):
                kind = _copy_kind(self.device, result.device)
                if kind is not None:
                    _record(kind, on_cpu=False)

        return _outermost(lambda: original(self, *args, **kwargs), count)

    wrapper.__name__ = getattr(original, "__name__", "to")
    return wrapper


def _copier(original: Callable) -> Callable:
    """``Tensor.copy_(src, non_blocking=False)`` across devices."""

    def wrapper(self, src, *args, **kwargs):
        def count(_):
            if isinstance(src, torch.Tensor) and not _non_blocking(args, kwargs):
                kind = _copy_kind(src.device, self.device)
                if kind is not None:
                    _record(kind, on_cpu=False)

        return _outermost(lambda: original(self, src, *args, **kwargs), count)

    wrapper.__name__ = "copy_"
    return wrapper


def _factory(original: Callable) -> Callable:
    """``torch.tensor`` / ``torch.as_tensor``: host data onto a non-CPU device is a blocking copy."""

    def wrapper(data, *args, **kwargs):
        def count(result):
            source = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
            if isinstance(result, torch.Tensor):
                kind = _copy_kind(source, result.device)
                if kind is not None:
                    _record(kind, on_cpu=False)

        return _outermost(lambda: original(data, *args, **kwargs), count)

    wrapper.__name__ = getattr(original, "__name__", "tensor")
    return wrapper


def _set(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, name in vars(owner), getattr(owner, name)))
    setattr(owner, name, value)


def _patch() -> None:
    tensor = torch.Tensor
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "equal", "allclose"):
        _set(tensor, name, _reader(name, getattr(tensor, name)))
    for name in ("nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "multinomial"):
        _set(tensor, name, _reader(name, getattr(tensor, name)))
    _set(tensor, "repeat_interleave", _reader_if("repeat_interleave", tensor.repeat_interleave, _tensor_repeats))
    for name in ("equal", "allclose", "is_nonzero", "nonzero", "argwhere", "unique", "unique_consecutive",
                 "masked_select", "multinomial"):  # fmt: skip
        _set(torch, name, _function_reader(name, getattr(torch, name)))
    _set(torch, "repeat_interleave",
         _function_reader("repeat_interleave", torch.repeat_interleave, _tensor_repeats_function))  # fmt: skip
    _set(torch, "where", _function_reader("where", torch.where, lambda *a, **k: len(a) + len(k) == 1))
    _set(tensor, "__getitem__", _indexer(tensor.__getitem__))
    _set(tensor, "__setitem__", _indexer(tensor.__setitem__))
    for name in ("to", "cuda", "cpu"):
        _set(tensor, name, _mover(getattr(tensor, name)))
    _set(tensor, "copy_", _copier(tensor.copy_))
    for name in ("tensor", "as_tensor"):
        _set(torch, name, _factory(getattr(torch, name)))


def _tensor_repeats(*args, **kwargs) -> bool:
    """``Tensor.repeat_interleave(repeats, ...)``: the output size comes from the values of a tensor ``repeats``."""
    repeats = args[0] if args else kwargs.get("repeats")
    return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None


def _tensor_repeats_function(*args, **kwargs) -> bool:
    """``torch.repeat_interleave(input, repeats, ...)`` or ``torch.repeat_interleave(repeats)``."""
    if len(args) + len(kwargs) == 1:
        return True
    return _tensor_repeats(*args[1:], **kwargs)


def _reader_if(kind: str, original: Callable, when: Callable[..., bool]) -> Callable:
    def wrapper(self, *args, **kwargs):
        def count(_):
            if when(*args, **kwargs):
                _record(kind, _is_cpu(self))

        return _outermost(lambda: original(self, *args, **kwargs), count)

    wrapper.__name__ = kind
    return wrapper


def _restore() -> None:
    while _saved:
        owner, name, owned, original = _saved.pop()
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
