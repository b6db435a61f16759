"""Speed lives here, never in unit tests: the training step phase by phase, CAM export, segmentation inference and
DenseCRF, on random inputs (no dataset needed). docs/benchmarks.md has the measured figures and their machines.

python -m tools.benchmark --preset vit_b_224 --count-syncs                     # ViT-B/16, crop 224, batch 2: the step
python -m tools.benchmark --preset vit_b_224 --variants full "toco:loss.weight.smc=0,loss.weight.mem=0"
python -m tools.benchmark --config configs/demo.yaml                           # every stage at the demo settings
python -m tools.benchmark --config configs/voc.yaml --what train model.pretrained=false data.crop_size=224

Stages (``--what``; default every stage with ``--config``, ``train`` with ``--preset``):

* ``train``: the trainer's step (``engine.task.MSFCTask``): ``task.loss`` -> ``backward`` -> AdamW step + ``zero_grad``
  -> ``task.after_optimizer_step`` (EMA teacher; the memory bank on its cadence), at the first step index where every
  term with a weight > 0 is on, with the bank initialised so L_mem runs. After ``--warmup`` steps, ``--repeats``
  timed repeats of ``--steps`` steps each give the step time WITHOUT the profiler (min / median / max over repeats)
  and images/s = batch / step time; then ``--profile-steps`` steps run under ``torch.profiler`` for the per-phase
  table: every ``step/*`` label of ``engine/step.py`` (views, no-grad CAMs, each forward group, each loss term,
  combine) and the benchmark's own ``bench/*`` ranges (loss, backward, optimizer, after_optimizer_step, step).
  On the CPU a phase's time is its range's wall time (CPU total: ops run synchronously); on CUDA the table adds
  device time (kernel time of a ``step/*`` range; CUDA-event time of a ``bench/*`` range).
* ``cam``: multi-scale + flip CAM export of one image; ``seg``: multi-scale + flip segmentation inference; ``crf``:
  DenseCRF of one image; ``rw``: the random walk of one image's CAMs (``core.random_walk.propagate`` with ``rw.*``,
  2 classes, a random boundary map: the cost does not depend on its values), with the size of its sparse transition
  and of the dense matrix it avoids. Run ``--what rw`` alone for a peak-RSS figure of the walk alone:

      python -m tools.benchmark --config configs/voc.yaml --what rw --image-size 375 500 run.num_threads=1

``--variants NAME[:key=value,key=value] ...`` times several configurations of the train stage in one process,
interleaved (A B A B ...: a busy shared machine slows all of them alike), and reports each one's spread and, for every
variant after the first, the first one's paired per-repeat ratio over it. ``--count-syncs`` runs one more step per
variant (untimed: the counter patches tensor methods) under ``utils.syncs.count_syncs``: its host reads of tensor
values by phase, kind and call site. On the CPU these are the reads a CUDA run of the same code makes (each a
host-device synchronisation there), reads of host-only tensors kept apart; PyTorch's reads of its own host state (the
optimiser's CPU step counters) are counted too, and are no sync on CUDA. On CUDA, the synchronising calls that
``torch.cuda.set_sync_debug_mode`` reports are counted as well. ``--json FILE`` writes every figure with the machine
description.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile, record_function

from core import cam as camlib
from core import random_walk
from engine.inference import predict_seg_logits
from models import build_model
from tools.bench_step import setup
from utils.config import add_config_arguments, load_config
from utils.crf import crf_params, dense_crf
from utils.errors import UserError, exit_on_user_error
from utils.profiling import (
    PhaseClock,
    current_rss_bytes,
    label_times,
    machine_info,
    peak_rss_bytes,
    raw_events,
    spread,
)
from utils.syncs import SyncCounter, count_syncs

STAGES = ("train", "cam", "seg", "crf", "rw")
REPO = Path(__file__).resolve().parent.parent
VIT_B = "vit_base_patch16_224.orig_in21k_ft_in1k"
# name -> (config files, overrides): ViT-B/16 at full size with the VOC recipe, random weights (nothing to download).
PRESETS = {
    f"vit_b_{crop}": (
        [REPO / "configs" / "voc.yaml"],
        [f"model.backbone={VIT_B}", "model.pretrained=false", f"data.crop_size={crop}"],
    )
    for crop in (224, 448)
}
PRESET_BATCH = 2
# The benchmark's own ranges around the trainer's calls, in step order (bench/step encloses them).
OUTER_PHASES = ("loss", "backward", "optimizer", "after_optimizer_step")
# A variant's overrides are split at the commas that start a new `key=` (a value may hold commas: `[1.0,0.5]`).
_VARIANT_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.]*=)")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or "=" in name:
        raise UserError(f"--variants: {text!r} must be NAME or NAME:key=value[,key=value], e.g. "
                        "toco:loss.weight.smc=0,loss.weight.mem=0")  # fmt: skip
    overrides = [item.strip() for item in _VARIANT_SPLIT.split(rest) if item.strip()] if rest.strip() else []
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise UserError(f"--variants {name}: {bad} are not key=value overrides")
    return name, overrides


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], iters: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after one warm-up call."""
    fn()
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


class TrainBench:
    """One variant's model, optimiser and batch; :meth:`step` runs the trainer's step once, phase by phase."""

    def __init__(self, name: str, cfg: DictConfig, device: torch.device) -> None:
        self.name, self.cfg, self.device = name, cfg, device
        state = setup(cfg, device)  # the same seed: every variant starts from the same weights
        self.task, self.model, self.optimizer = state.task, state.model, state.optimizer
        self.batch, self.generator = state.batch, state.generator
        self.index = self.first_index = state.index
        self.active = self.task.step.active(self.index)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def step(self, clock: PhaseClock, syncs: dict[str, SyncCounter] | None = None) -> None:
        """One optimiser step, as ``engine.trainer.Trainer.fit`` runs it (one micro-batch, no clipping).

        With ``syncs`` (a dict), each phase's host reads are counted (``utils.syncs.count_syncs``) into it.
        """

        def phase(name: str) -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            stack.enter_context(clock.phase(name))
            stack.enter_context(record_function(f"bench/{name}"))
            if syncs is not None:
                syncs[name] = stack.enter_context(count_syncs())
            return stack

        with record_function("bench/step"):
            with phase("loss"):
                total, _ = self.task.loss(self.model, self.batch, self.index, self.generator)
            with phase("backward"):
                total.backward()
            with phase("optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            with phase("after_optimizer_step"):
                self.task.after_optimizer_step(self.model, self.index)
        self.index += 1

    def memory_update_seconds(self) -> float:
        """One memory-bank update on its own (it runs every ``memory.update_every`` steps, in after_optimizer_step)."""
        _sync(self.device)
        start = time.perf_counter()
        self.model.memory.update()
        _sync(self.device)
        return time.perf_counter() - start


def _timed_repeat(bench: TrainBench, steps: int) -> dict[str, float]:
    """Wall seconds per step over ``steps`` unprofiled steps, plus the outer phases per step."""
    device, clock = bench.device, PhaseClock(bench.device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        bench.step(clock)
    _sync(device)
    wall = (time.perf_counter() - start) / steps
    return {"step": wall, **{phase: seconds / steps for phase, seconds in clock.seconds().items()}}


def _profiled(bench: TrainBench, steps: int) -> dict[str, Any]:
    """``steps`` steps under torch.profiler: per-phase seconds per step."""
    device, clock = bench.device, PhaseClock(bench.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            bench.step(clock)
        _sync(device)
        wall = (time.perf_counter() - start) / steps
    labels = label_times(raw_events(prof), ("step/", "bench/"))
    device_clock = clock.seconds() if device.type == "cuda" else {}
    phases = []
    for name, entry in labels.items():
        outer = name.removeprefix("bench/")
        row = {"name": name, "calls_per_step": entry["calls"] / steps, "seconds": entry["host_seconds"] / steps}
        if device.type == "cuda":
            row["device_seconds"] = (device_clock[outer] if outer in device_clock else entry["device_seconds"]) / steps
        phases.append(row)
    return {"steps": steps, "wall_seconds_per_step": wall, "phases": phases}


def _counted(bench: TrainBench, top: int = 15) -> dict[str, Any]:
    """One step with its host reads counted (``utils.syncs``), by phase, kind and call site; not timed."""
    device, phases = bench.device, {}
    cuda_syncs: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught, count_syncs(cpu_reads=False) as device_syncs:
        warnings.simplefilter("always")
        if device.type == "cuda":  # PyTorch's own detector: every synchronising CUDA call warns
            torch.cuda.set_sync_debug_mode("warn")
        try:
            bench.step(PhaseClock(device), phases)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        cuda_syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    _sync(device)
    kinds: dict[str, int] = {}
    sites = []
    for phase, counter in phases.items():
        for kind, calls in counter.by_kind.items():
            kinds[kind] = kinds.get(kind, 0) + calls
        sites += [{"phase": phase, "kind": kind, "site": site, "count": calls}
                  for (site, kind), calls in counter.by_site_kind.items()]  # fmt: skip
    sites.sort(key=lambda site: -site["count"])
    result = {
        "counter": "utils.syncs.count_syncs",
        "steps": 1,
        "host_reads": sum(counter.total for counter in phases.values()),
        "device_syncs": device_syncs.total,
        "host_tensor_reads": sum(counter.host for counter in phases.values()),
        "by_phase": {phase: counter.total for phase, counter in phases.items()},
        "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "sites": sites[:top],
    }
    if device.type == "cuda":
        result["cuda_sync_debug_warnings"] = len(cuda_syncs)
    return result


def bench_train(
    variants: list[tuple[str, DictConfig, list[str]]],
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    repeats: int,
    profile_steps: int,
    syncs: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every variant interleaved: warm-up, ``repeats`` x (each variant ``steps`` steps), then the profiled steps."""
    benches = []
    for name, cfg, _ in variants:
        log(f"building {name} ...")
        benches.append(TrainBench(name, cfg, device))
    for bench in benches:
        clock = PhaseClock(device)
        for _ in range(warmup):
            bench.step(clock)
        clock.seconds()
    times: dict[str, list[dict[str, float]]] = {bench.name: [] for bench in benches}
    cuda_peak = dict.fromkeys(times, 0)
    for repeat in range(repeats):
        for bench in benches:  # interleaved: A B A B ...
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[bench.name].append(_timed_repeat(bench, steps))
            if device.type == "cuda":
                cuda_peak[bench.name] = max(cuda_peak[bench.name], torch.cuda.max_memory_allocated(device))
            log(f"repeat {repeat + 1}/{repeats} {bench.name}: {times[bench.name][-1]['step']:.3f} s/step")
    out: dict[str, Any] = {"order": [bench.name for bench in benches], "variants": {}}
    for bench, (_, _, overrides) in zip(benches, variants, strict=True):
        runs = times[bench.name]
        batch = int(bench.cfg.train.batch_size)
        step = spread([run["step"] for run in runs])
        entry: dict[str, Any] = {
            "overrides": overrides,
            "batch": batch,
            "crop": int(bench.cfg.data.crop_size),
            "first_step_index": bench.first_index,
            "active_terms": bench.active,
            "parameters": bench.parameters,
            "step_seconds": step,
            "step_seconds_repeats": [run["step"] for run in runs],
            "images_per_second": {
                "min": batch / step["max"],
                "median": batch / step["median"],
                "max": batch / step["min"],
            },
            "phase_seconds": {phase: spread([run[phase] for run in runs]) for phase in OUTER_PHASES},
        }
        if float(bench.cfg.loss.weight.mem) > 0:
            entry["memory_update"] = {"seconds": bench.memory_update_seconds(),
                                      "every_steps": int(bench.cfg.memory.update_every)}  # fmt: skip
        if profile_steps > 0:
            entry["profile"] = _profiled(bench, profile_steps)
        if syncs:
            entry["syncs"] = _counted(bench)
        entry["memory"] = {"peak_rss_bytes_so_far": peak_rss_bytes()}
        if device.type == "cuda":
            entry["memory"]["cuda_max_allocated_bytes"] = cuda_peak[bench.name]
        out["variants"][bench.name] = entry
    first = benches[0].name
    out["comparisons"] = []
    for bench in benches[1:]:
        paired = [a["step"] / b["step"] for a, b in zip(times[first], times[bench.name], strict=True)]
        a, b = out["variants"][first]["step_seconds"], out["variants"][bench.name]["step_seconds"]
        out["comparisons"].append({
            "variant": first, "over": bench.name, "paired_ratio": spread(paired),
            "median_ratio": a["median"] / b["median"], "median_difference_seconds": a["median"] - b["median"],
        })  # fmt: skip
    return out


class TreeWorker:
    """A ``tools/bench_step.py`` worker process running the code of one checkout (see :func:`bench_trees`)."""

    def __init__(self, spec: str, path: Path, configs: list[str], overrides: list[str], warmup: int) -> None:
        self.spec, self.path = spec, path
        command = [
            sys.executable,
            str(Path(__file__).with_name("bench_step.py")),
            "--tree",
            str(path),
            *[arg for config in configs for arg in ("--config", config)],
            "--warmup",
            str(warmup),
            *overrides,
        ]
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSAFEPATH")}
        self.process = subprocess.Popen(command, cwd=path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**env, "PYTHONSAFEPATH": "1"})  # fmt: skip
        self.ready = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            code = self.process.wait()
            raise UserError(f"--trees {self.spec}: the benchmark worker in {self.path} exited with code {code} "
                            "(its error is printed above)")  # fmt: skip
        return json.loads(line)

    def run(self, steps: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            self.process.wait(timeout=60)


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def checkouts(specs: list[str]) -> Any:
    """Each spec as a folder: an existing checkout, or a git revision of this repository checked out (detached) into
    a temporary worktree, removed afterwards. Yields ``[(spec, path, commit), ...]``."""
    twice = sorted({spec for spec in specs if specs.count(spec) > 1})
    if twice:
        raise UserError(f"--trees: {', '.join(twice)} given twice")
    with contextlib.ExitStack() as stack:
        resolved = []
        for spec in specs:
            path = Path(spec)
            if not path.is_dir():
                try:
                    commit = _git(REPO, "rev-parse", "--verify", f"{spec}^{{commit}}")
                except (subprocess.CalledProcessError, FileNotFoundError):
                    raise UserError(f"--trees {spec}: neither a folder nor a git revision of {REPO}") from None
                path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tree-"))) / "tree"
                _git(REPO, "worktree", "add", "--detach", str(path), commit)
                stack.callback(_git, REPO, "worktree", "remove", "--force", str(path))
            try:
                commit = _git(path, "rev-parse", "--short", "HEAD") + (" (dirty)" if _git(path, "status", "--porcelain")
                                                                       else "")  # fmt: skip
            except (subprocess.CalledProcessError, FileNotFoundError):
                commit = "not a git checkout"
            resolved.append((spec, path.resolve(), commit))
        yield resolved


def bench_trees(
    trees: list[tuple[str, Path, str]],
    configs: list[str],
    overrides: list[str],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The same train step in several checkouts (e.g. before/after a change), timed interleaved.

    One worker process per checkout builds the model from the same seed and runs ``warmup`` steps; then each repeat
    runs ``steps`` steps in every worker in turn (A B A B ...; the idle worker waits on stdin). Step time is the
    worker's per-step median of a repeat; the first tree is compared with each other one (median ratio and paired
    ratio per repeat). The first step's loss of each tree is recorded: equal losses show that the versions compute
    the same step.
    """
    workers: list[TreeWorker] = []
    try:
        for spec, path, commit in trees:
            log(f"starting the worker for {spec} ({commit}) ...")
            workers.append(TreeWorker(spec, path, configs, overrides, warmup))
        runs: dict[str, list[dict[str, Any]]] = {worker.spec: [] for worker in workers}
        for repeat in range(repeats):
            for worker in workers:
                runs[worker.spec].append(worker.run(steps))
                log(f"repeat {repeat + 1}/{repeats} {worker.spec}: "
                    f"{statistics.median(runs[worker.spec][-1]['seconds']):.3f} s/step")  # fmt: skip
    finally:
        for worker in workers:
            worker.close()
    out: dict[str, Any] = {"order": [spec for spec, _, _ in trees], "configs": configs, "overrides": overrides,
                           "trees": {}, "comparisons": []}  # fmt: skip
    medians = {}
    for (spec, path, commit), worker in zip(trees, workers, strict=True):
        medians[spec] = [statistics.median(run["seconds"]) for run in runs[spec]]
        out["trees"][spec] = {
            "path": str(path), "commit": commit, "parameters": worker.ready["parameters"],
            "first_step_index": worker.ready["first_step_index"], "torch_threads": worker.ready["torch_threads"],
            "step_seconds": spread(medians[spec]),
            "step_seconds_repeats": medians[spec], "losses": [loss for run in runs[spec] for loss in run["losses"]],
        }  # fmt: skip
    first = trees[0][0]
    for spec, _, _ in trees[1:]:
        a, b = out["trees"][first], out["trees"][spec]
        out["comparisons"].append({
            "tree": first, "over": spec,
            "paired_ratio": spread([x / y for x, y in zip(medians[first], medians[spec], strict=True)]),
            "median_ratio": a["step_seconds"]["median"] / b["step_seconds"]["median"],
            "same_losses": a["losses"] == b["losses"],
            "max_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)),
        })  # fmt: skip
    return out


def format_trees(result: dict[str, Any]) -> str:
    """The before/after table of :func:`bench_trees`."""
    lines = [f"{'tree':24s} {'commit':18s} {'step s: median [min, max]':28s} first loss"]
    for spec, tree in result["trees"].items():
        step = tree["step_seconds"]
        lines.append(f"{spec:24s} {tree['commit']:18s} {step['median']:8.3f} [{step['min']:.3f}, {step['max']:.3f}]"
                     f"{'':6s} {tree['losses'][0]:.6f}")  # fmt: skip
    for comp in result["comparisons"]:
        paired = comp["paired_ratio"]
        lines.append(f"{comp['tree']} / {comp['over']}: {comp['median_ratio']:.3f}x the median step; paired per "
                     f"repeat min {paired['min']:.3f}, median {paired['median']:.3f}, max {paired['max']:.3f}; "
                     f"losses {'identical' if comp['same_losses'] else 'differ'} "
                     f"(max |difference| {comp['max_loss_difference']:.3g})")  # fmt: skip
    return "\n".join(lines)


def _image(size: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).to(
        device
    )


def bench_cam(cfg: DictConfig, device: torch.device, iters: int, size: tuple[int, int]) -> dict:
    model = build_model(cfg).to(device).eval()
    x = model.normalize(_image(size, device))
    scales = tuple(cfg.cam.scales)
    with torch.no_grad():
        wall, cpu = _time(lambda: camlib.multiscale_cam(model, x, scales, int(cfg.cam.max_batch)), iters, device)
    return {"images_per_second": 1 / wall, "cpu_seconds_per_image": cpu, "image": list(size), "scales": list(scales)}


def bench_seg(cfg: DictConfig, device: torch.device, iters: int, size: tuple[int, int]) -> dict:
    model = build_model(cfg).to(device).eval()
    image, ev = _image(size, device), cfg.eval
    wall, cpu = _time(
        lambda: predict_seg_logits(
            model,
            image,
            tuple(ev.scales),
            bool(ev.flip),
            ev.flip_fusion,
            ev.scale_fusion,
            ev.resize,
            resize_mode=str(ev.resize_mode),
        ),
        iters,
        device,
    )
    return {"images_per_second": 1 / wall, "cpu_seconds_per_image": cpu, "image": list(size), "scales": list(ev.scales)}


def bench_crf(cfg: DictConfig, iters: int, size: tuple[int, int]) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    prob = rng.random((int(cfg.data.num_classes), *size)).astype(np.float32)
    prob /= prob.sum(axis=0, keepdims=True)
    params = crf_params(cfg)
    wall, cpu = _time(lambda: dense_crf(image, prob, **params), iters, torch.device("cpu"))
    return {"images_per_second": 1 / wall, "cpu_seconds_per_image": cpu, "image": list(size), "workers": 1}


def bench_rw(cfg: DictConfig, device: torch.device, iters: int, size: tuple[int, int]) -> dict:
    r = cfg.rw
    grid = random_walk.grid_size(size)
    generator = torch.Generator().manual_seed(0)
    boundary = torch.rand(grid, generator=generator).to(device)
    cam = torch.rand((2, *size), generator=generator).to(device)
    rss_before = current_rss_bytes()

    def run() -> torch.Tensor:
        return random_walk.propagate(cam, boundary, radius=int(r.radius), beta=float(r.beta),
                                     exp_times=int(r.exp_times), mode=str(r.mode))  # fmt: skip

    wall, cpu = _time(run, iters, device)
    nodes = grid[0] * grid[1]
    nnz = random_walk.transition_sparse_t(boundary, int(r.radius), float(r.beta)).values().numel()
    return {
        "seconds_per_image": wall, "cpu_seconds_per_image": cpu, "image": list(size), "grid": list(grid),
        "nodes": nodes, "transition_nnz": nnz, "transition_mb": nnz * (4 + 8) / 2**20,
        "dense_matrix_mb": nodes * nodes * 4 / 2**20, "rss_before_mb": rss_before / 2**20,
        "peak_rss_mb": peak_rss_bytes() / 2**20, "mode": str(r.mode), "steps": 2 ** int(r.exp_times),
    }  # fmt: skip


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.1f}"


def format_train(train: dict[str, Any], device: torch.device) -> str:
    """The per-phase table of every variant, then the comparisons (plain text)."""
    lines = []
    cuda = device.type == "cuda"
    for name, entry in train["variants"].items():
        step = entry["step_seconds"]
        lines.append(f"\n== {name} ({', '.join(entry['overrides']) or 'as configured'}): batch {entry['batch']}, "
                     f"crop {entry['crop']}, terms {'+'.join(entry['active_terms'])}")  # fmt: skip
        profiled = entry.get("profile")
        if profiled:
            rows = {row["name"]: row for row in profiled["phases"]}
            total = rows["bench/step"]["seconds"]
            head = f"{'phase':34s} {'calls':>5s} {'ms/step':>10s} {'% step':>7s}" + ("  device ms" if cuda else "")
            lines += [head, "-" * len(head)]

            def row_line(label: str, row: dict | None, seconds: float | None = None, total: float = total) -> str:
                value = row["seconds"] if row is not None else seconds
                calls = f"{row['calls_per_step']:5.3g}" if row is not None else " " * 5
                text = f"{label:34s} {calls} {_ms(value)} {100 * value / total:6.1f}%"
                if cuda and row is not None and "device_seconds" in row:
                    text += f" {_ms(row['device_seconds'])}"
                return text

            labelled = [row for key, row in rows.items() if key.startswith("step/")]
            lines += [row_line(row["name"], row) for row in labelled]
            rest = rows["bench/loss"]["seconds"] - sum(row["seconds"] for row in labelled)
            lines.append(row_line("(rest of task.loss, unlabelled)", None, rest))
            lines += [row_line(phase, rows[f"bench/{phase}"]) for phase in OUTER_PHASES[1:]]
            lines.append(row_line("step (profiled)", rows["bench/step"]))
        lines.append(f"step without profiler: median {step['median']:.4g} s  [min {step['min']:.4g}, max "
                     f"{step['max']:.4g}] over {step['n']} repeats; "
                     f"{entry['images_per_second']['median']:.4g} images/s")  # fmt: skip
        phases = entry["phase_seconds"]
        lines.append("  without profiler (median s): " + "  ".join(f"{p} {phases[p]['median']:.4g}"
                                                                    for p in OUTER_PHASES))  # fmt: skip
        if "memory_update" in entry:
            update = entry["memory_update"]
            lines.append(f"  memory-bank update: {update['seconds'] * 1e3:.2f} ms every {update['every_steps']} steps")
        memory = entry["memory"]
        text = f"  peak RSS so far {memory['peak_rss_bytes_so_far'] / 2**30:.2f} GiB"
        if "cuda_max_allocated_bytes" in memory:
            text += f", CUDA max allocated {memory['cuda_max_allocated_bytes'] / 2**30:.2f} GiB"
        lines.append(text)
        syncs = entry.get("syncs")
        if syncs:
            by_phase = ", ".join(f"{phase} {n}" for phase, n in syncs["by_phase"].items() if n)
            lines.append(f"  host reads in one step: {syncs['host_reads']} ({by_phase or 'none'}); of device tensors "
                         f"(syncs on this device): {syncs['device_syncs']}; of host-only tensors (never a sync): "
                         f"{syncs['host_tensor_reads']}")  # fmt: skip
            if "cuda_sync_debug_warnings" in syncs:
                lines.append(f"  synchronising CUDA calls (torch.cuda.set_sync_debug_mode): "
                             f"{syncs['cuda_sync_debug_warnings']}")  # fmt: skip
            lines += [f"    {site['count']:5d} x {site['kind']:12s} {site['phase']:20s} {site['site']}"
                      for site in syncs["sites"]]  # fmt: skip
    for comp in train["comparisons"]:
        paired = comp["paired_ratio"]
        lines.append(f"\n{comp['variant']} / {comp['over']}: {comp['median_ratio']:.3f}x the median step "
                     f"({comp['median_difference_seconds']:+.4g} s); paired per repeat min {paired['min']:.3f}, "
                     f"median {paired['median']:.3f}, max {paired['max']:.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="ViT-B/16 at full size (random weights) with configs/voc.yaml at crop 224 or 448; "
                             "instead of --config")  # fmt: skip
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"train.batch_size (default: {PRESET_BATCH} with --preset, else the config's)",
    )
    parser.add_argument("--what", default=None, help=f"comma-separated stages from {STAGES}")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME[:key=value,...]",
                        help="train-stage variants timed interleaved in one process; the first is compared with "
                             "the others, e.g. full 'toco:loss.weight.smc=0,loss.weight.mem=0'")  # fmt: skip
    parser.add_argument("--trees", nargs="+", default=None, metavar="DIR|REV",
                        help="time the train step of several versions of the code interleaved, e.g. before/after a "
                             "change: each a checkout folder or a git revision of this repository (checked out into "
                             "a temporary worktree); the first is compared with the others")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps per variant first")
    parser.add_argument("--steps", type=int, default=1, help="train steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (interleaved)")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=1,
        help="train steps under torch.profiler for the per-phase table (0 = none)",
    )
    parser.add_argument(
        "--count-syncs",
        action="store_true",
        help="one more (untimed) step per variant with its host reads counted by utils/syncs.py",
    )
    parser.add_argument("--iters", type=int, default=3, help="timed repetitions of cam/seg/crf (after one warm-up)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="image size for cam/seg/crf; default: the crop size")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.preset and (args.config or args.run):
        parser.error("--preset replaces --config / --run-dir; add key=value overrides instead")
    for flag in ("warmup", "steps", "repeats", "profile_steps", "iters"):
        if getattr(args, flag) < (1 if flag in ("steps", "repeats", "iters") else 0):
            parser.error(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    stages = [
        s.strip()
        for s in (args.what or ("train" if args.preset or args.trees else ",".join(STAGES))).split(",")
        if s.strip()
    ]
    if args.trees and (args.variants or stages != ["train"] or args.run):
        parser.error("--trees times the train stage of each checkout; it takes no --variants, --what or --run-dir")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {STAGES}")

    def body() -> int:
        files, overrides = PRESETS[args.preset] if args.preset else (args.config, [])
        overrides = ["data.root=unused", "run.out_dir=unused", *overrides]
        batch = args.batch if args.batch is not None else (PRESET_BATCH if args.preset else None)
        if batch is not None:
            overrides.append(f"train.batch_size={batch}")
        overrides += args.overrides
        source = files if args.run is None else args.run / "config.yaml"
        if args.trees:
            return _trees_main(args, [str(f) for f in files], overrides)
        variants = []
        for text in args.variants or ["default"]:
            name, extra = parse_variant(text)
            if name in {v[0] for v in variants}:
                raise UserError(f"--variants: the name {name!r} is given twice")
            variants.append((name, load_config(source, [*overrides, *extra]), extra))
        cfg = variants[0][1]
        if int(cfg.run.num_threads) > 0:
            torch.set_num_threads(int(cfg.run.num_threads))
        device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
        size = tuple(args.image_size) if args.image_size else (int(cfg.data.crop_size),) * 2
        results: dict[str, Any] = {
            "schema": "msfc-benchmark/2",
            "machine": machine_info(device),
            "command": ["python", "-m", "tools.benchmark", *(sys.argv[1:] if argv is None else argv)],
            "preset": args.preset,
            "backbone": str(cfg.model.backbone),
            "device": device.type,
            "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                         "profile_steps": args.profile_steps, "count_syncs": args.count_syncs, "iters": args.iters},
        }  # fmt: skip
        m = results["machine"]
        print(f"{m['cpu_model']}, {m['usable_cpus']} usable CPUs, {m['torch_threads']} torch threads, torch "
              f"{m['torch_version']}, {m['device_name']} | {cfg.model.backbone} on {device.type}",
              flush=True)  # fmt: skip
        for stage in stages:
            if stage == "train":
                results["train"] = bench_train(
                    variants, device, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                    profile_steps=args.profile_steps, syncs=args.count_syncs,
                    log=lambda text: print(text, flush=True),
                )  # fmt: skip
                results["parameters"] = next(iter(results["train"]["variants"].values()))["parameters"]
                print(format_train(results["train"], device), flush=True)
                continue
            runners = {
                "cam": lambda: bench_cam(cfg, device, args.iters, size),
                "seg": lambda: bench_seg(cfg, device, args.iters, size),
                "crf": lambda: bench_crf(cfg, args.iters, size),
                "rw": lambda: bench_rw(cfg, device, args.iters, size),
            }
            results[stage] = runners[stage]()
            figures = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in results[stage].items())  # fmt: skip
            print(f"{stage:6s} {figures}", flush=True)
        if {"train", "cam", "seg"} & set(stages):  # the stages that time the model (crf / rw do not build it)
            results.setdefault("parameters", sum(p.numel() for p in build_model(cfg).parameters()))
        results["memory"] = {"peak_rss_bytes": peak_rss_bytes()}
        if device.type == "cuda":
            results["memory"]["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        results["machine"]["load_average_end"] = machine_info(device).get("load_average")
        print(f"peak RSS {results['memory']['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0

    return exit_on_user_error(body)


def _trees_main(args: argparse.Namespace, files: list[str], overrides: list[str]) -> int:
    """``--trees``: the before/after comparison; config files are taken from each checkout at the same path."""
    configs = []
    for file in files:
        path = Path(file).resolve()
        if not path.is_relative_to(REPO):
            raise UserError(f"--trees: the config {file} is outside the repository; each checkout reads the config at "
                            "the same path inside it")  # fmt: skip
        configs.append(str(path.relative_to(REPO)))
    # a killed run (SIGTERM) still stops its workers and removes its temporary worktrees, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    machine = machine_info(torch.device("cpu"))  # the load average at the start
    with checkouts(args.trees) as trees:
        result = bench_trees(trees, configs, overrides, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                             log=lambda text: print(text, flush=True))  # fmt: skip
    print(format_trees(result), flush=True)
    if args.json:
        results = {"schema": "msfc-benchmark/2", "machine": machine,
                   "command": ["python", "-m", "tools.benchmark", *sys.argv[1:]], "preset": args.preset,
                   "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
                   "trees": result}  # fmt: skip
        results["machine"]["load_average_end"] = machine_info(torch.device("cpu")).get("load_average")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
