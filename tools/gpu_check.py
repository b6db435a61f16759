"""One short, time-limited GPU check that writes one JSON (run by ``scripts/gpu_check.sh`` on a GPU machine).

    python -m tools.gpu_check --out gpu_check.json [--time-limit 480] [--parts cuda_tests,bench,...]
    python -m tools.gpu_check --device cpu --tiny --out /tmp/check.json      # every part's CPU path, tiny settings

Parts, run in this order (``--parts`` picks some; the others are recorded as not selected):

  cuda_tests     ``python -m pytest -q -m cuda``: pass / fail / skip counts (on CPU every CUDA test skips)
  bench          ``python -m tools.benchmark --what train --json`` for ViT-B at crop 448, batch 2 and 4, fp32 and
                 bf16: s/iteration, images/s, peak GPU memory, projected wall time of a 20k-iteration VOC run
  train          a 300-iteration ViT-B training run (``scripts/launch.sh tools.train``, bf16, crop 448, batch 2,
                 eval off) on synthetic data: first-50 vs last-50 mean loss_total, which must go down
  cam_agreement  ``core.cam.multiscale_cam`` in fp32 and under bf16 autocast on synthetic images, thresholded at
                 ``cam.bkg_thre`` by ``core.labels.cam_label``: pixel agreement of the labels (the trained model of
                 ``train`` when that ran, else a random-init ViT-B)
  bench_compile  ``bench`` with ``train.compile=true`` (bf16, batch 2 and 4); last, since compiling is slow;
                 "unavailable" while the config has no ``train.compile`` key

Time: ``--time-limit`` bounds the whole check. Each part has its own budget (a cap), shortened so that the parts after
it keep their minimum; a part whose minimum no longer fits is skipped. A part still running at the end of its budget
is stopped (its child processes are killed as a group; in-process work is interrupted by SIGALRM) and recorded as
``timeout`` with the figures it had. The JSON is rewritten atomically at the start, after each part and after each
benchmark run, so a check killed from outside still leaves valid JSON with every part finished so far; SIGTERM stops
the running part the same way and writes the JSON before exiting (code 124).

Budgets on a GPU (cap / minimum, seconds): cuda_tests 120 / 30, bench 150 / 45 (75 per run), train 170 / 60,
cam_agreement 60 / 15, bench_compile 240 / 60 (150 per run). Within the default 480 s a part gets its cap unless the
parts before it used most of theirs; bench_compile, last, takes what is left.

JSON: ``schema`` (msfc-gpu-check/1), ``command``, ``started`` / ``finished`` (UTC), ``device``, ``tiny``,
``time_limit_s``, ``elapsed_s``, ``complete`` (false while running or after SIGTERM), ``status`` (ok | failed: PARTS),
``machine`` (gpu: name, count, memory_gib, capability, driver, cudnn; torch, torch_cuda, timm, numpy, python, cpu,
cpu_count, host_memory_gib, git_commit, ...), ``projection`` (iterations, batch, accum_steps, crop and gpus of the VOC
run, the assumption, and ``hours`` per measurement), ``parts`` (one object per part, in the order above: ``status``,
``budget_s``, ``wall_s`` and its figures: bench ``runs`` [name, batch, crop, precision, compile, status,
seconds_per_iter, images_per_second, peak_gpu_allocated_gib, peak_gpu_reserved_gib, peak_rss_gib,
projected_voc_hours, phase_seconds_median, ...] and ``bf16_speedup_over_fp32``; train loss_first_mean,
loss_last_mean, window, loss_decreased, terms, curve, seconds_per_iter, projected_voc_hours; cam_agreement
pixel_agreement, cam_aux_pixel_agreement, min_image_agreement, max_abs_cam_diff, ...; cuda_tests passed, failed,
skipped, errors, skip_reasons, failures) and ``summary`` (one line per part). Non-finite numbers are written as the
strings "nan" / "inf", so the file is strict JSON.

Statuses: ``ok``, ``failed: REASON``, ``skipped: REASON``, ``unavailable: REASON`` (a tool, flag or config key this
check asks for does not exist), ``timeout``; ``pending`` / ``running`` only in a JSON written before the end. Exit
code 0 when no part failed or timed out, 1 otherwise, 2 for a bad command line or --device cuda without CUDA.

``--tiny`` uses configs/smoke.yaml sizes, a few iterations and fewer configurations: it exists to test this tool on a
CPU (``--device cpu``), and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "msfc-gpu-check/1"
VIT_B = "vit_base_patch16_224.orig_in21k_ft_in1k"
GIB = 2**30
# The ViT-B model of every GPU part: random init (no download on an offline machine), VOC recipe otherwise.
VIT_B_OVERRIDES = (f"model.backbone={VIT_B}", "model.pretrained=false", "model.weights=null", "data.crop_size=448")
GPU_CONFIG, TINY_CONFIG = "configs/voc.yaml", "configs/smoke.yaml"
PROJECTION_CONFIG = "configs/voc.yaml"  # the run whose wall time is projected
# Seconds a killed child group gets between SIGTERM and SIGKILL.
KILL_GRACE = 5.0
# Agreement of the fp32 and bf16 CAM labels below which the summary flags the result.
AGREEMENT_THRESHOLD = 0.99
CHILD_BENCHMARK = "_benchmark_child"  # hidden first argument: run tools.benchmark and record its peak memory


class PartTimeout(Exception):
    """The running part reached the end of its budget."""


class Interrupted(Exception):
    """SIGTERM / SIGINT arrived: stop the running part, write the JSON, exit."""


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers: JSON, reasons, child processes, deadlines
# ----------------------------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "nan" / "inf" / "-inf" (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` atomically (a reader never sees half a file), keys in insertion order."""
    from utils.io import atomic_path

    text = json.dumps(_clean(report), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _reason(text: str, limit: int = 300) -> str:
    """One short line for a status."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _log_reason(log: str) -> str:
    """The most telling line of a child's output: its ``error:`` line, else its last exception line, else the last."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^\S*(Error|Exception)\b.*:", line):
            return _reason(line)
    return _reason(lines[-1]) if lines else "no output"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


@dataclass
class Child:
    """Outcome of one child process."""

    returncode: int | None  # None when it was killed at the deadline
    timed_out: bool
    wall_s: float
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def tail(self, lines: int = 15) -> list[str]:
        return [line[:300] for line in self.text().splitlines()[-lines:]]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after KILL_GRACE seconds."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
            return


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (no-op elsewhere: no signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"part budget of {seconds:.0f} s used up")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------------------------
# The run context
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: str  # cuda | cpu
    tiny: bool
    work: Path  # scratch folder: synthetic data, run folders, child logs
    save: Callable[[], None]  # rewrite the JSON now
    bench_iters: int
    train_iters: int
    deadline: float = 0.0  # time.monotonic() at which the running part must end
    state: dict[str, Any] = field(default_factory=dict)  # shared between parts (synthetic root, trained run)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def env(self) -> dict[str, str]:
        """Environment of the child processes: the repository importable, as scripts/launch.sh sets it up."""
        env = dict(os.environ)
        # scripts/launch.sh runs `python`: make that this interpreter (PYTHON=... of scripts/gpu_check.sh)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONSAFEPATH", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")  # an offline machine: never wait on a download
        if self.tiny:
            env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads cost more than they give (tests/conftest)
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def run(self, name: str, cmd: list[str], cap: float, env: dict[str, str] | None = None) -> Child:
        """Run ``cmd`` in the repository root with output to ``work/NAME.log``, for at most ``cap`` seconds and never
        past the part's deadline (less a second to record the outcome). The child gets its own process group, which
        is killed on a timeout and on any exception here (a SIGALRM or SIGTERM of this process)."""
        timeout = min(cap, self.remaining() - 1.0)
        if timeout < 1.0:
            raise PartTimeout(f"no time left to start {name}")
        log = self.work / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            process = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            try:
                returncode: int | None = process.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                if process.poll() is None:
                    _kill_group(process)
        return Child(returncode, timed_out, time.monotonic() - start, log)

    def synthetic(self) -> Path:
        """The synthetic VOC-layout dataset of this check, made on first use.

        Full size: ``python -m tools.make_synthetic`` in a child (its rendering workers fork from a process that has
        not touched CUDA and has no signal handlers of ours). ``--tiny``: the same generator in this process, with
        no workers (a child would cost an import of torch).
        """
        if "synthetic" not in self.state:
            root = self.work / "synthetic"
            if self.tiny:
                from datasets.synthetic import generate

                generate(root, num_train=16, num_val=4, seed=0, min_size=64, max_size=96)
            else:  # VOC-like sides; 200 images are 3 epochs of the 300-iteration run at batch 2
                workers = str(min(8, os.cpu_count() or 1))
                cmd = [sys.executable, "-m", "tools.make_synthetic", str(root), "--num-train", "200", "--num-val", "8",
                       "--min-size", "256", "--max-size", "480", "--workers", workers]  # fmt: skip
                child = self.run("make_synthetic", cmd, cap=120)
                if child.timed_out or child.returncode != 0:
                    how = "timed out" if child.timed_out else f"exit {child.returncode}"
                    raise RuntimeError(f"tools.make_synthetic {how}: {_log_reason(child.text())}")
            self.state["synthetic"] = root
        return self.state["synthetic"]

    def model_args(self) -> tuple[str, list[str]]:
        """(config file, overrides) of the model every part uses: ViT-B at crop 448, or the smoke config with --tiny."""
        if self.tiny:
            return TINY_CONFIG, [f"run.device={self.device}"]
        return GPU_CONFIG, [*VIT_B_OVERRIDES, f"run.device={self.device}"]


# ----------------------------------------------------------------------------------------------------------------------
# Machine and projection
# ----------------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _host_memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _command_output(cmd: list[str]) -> str | None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=15, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (timm takes seconds to import)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    """What the figures were measured on: GPU, driver / CUDA, torch and friends, CPU."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "host_memory_gib": _host_memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": _version("timm"),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _command_output(["git", "rev-parse", "HEAD"]),
        "gpu": None,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "driver": driver.splitlines()[0] if driver else None,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return info


def projection_recipe() -> dict[str, Any]:
    """The VOC run whose wall time is projected: its optimiser steps, batch and accumulation from configs/voc.yaml."""
    from utils.config import load_config

    cfg = load_config(PROJECTION_CONFIG, ["data.root=unused", "run.out_dir=unused"])
    return {"config": PROJECTION_CONFIG, "iterations": int(cfg.train.max_iters), "batch": int(cfg.train.batch_size),
            "accum_steps": int(cfg.train.accum_steps), "crop": int(cfg.data.crop_size)}  # fmt: skip


def projected_hours(seconds_per_iter: float | None, recipe: dict[str, Any]) -> float | None:
    """Wall hours of ``recipe['iterations']`` optimiser steps of ``accum_steps`` micro-steps at this s/iteration."""
    if seconds_per_iter is None or not math.isfinite(seconds_per_iter):
        return None
    return _round(seconds_per_iter * recipe["iterations"] * recipe["accum_steps"] / 3600, 3)


# ----------------------------------------------------------------------------------------------------------------------
# Part: cuda_tests
# ----------------------------------------------------------------------------------------------------------------------

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")
_SUMMARY = re.compile(r"\b\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b.* in [\d.]+s")


def _cuda_test_files() -> list[str]:
    """Test files that mention the cuda marker (--tiny: collecting only those keeps the CPU run short)."""
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name != "test_gpu_check.py" and re.search(r"\bmark\.cuda\b", path.read_text(errors="replace")):
            files.append(str(path.relative_to(ROOT)))
    return files


def parse_pytest(text: str) -> dict[str, Any]:
    """Counts of pytest's final summary line, the skip reasons and the failed test ids."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0, "xfailed": 0, "xpassed": 0}
    summary = [line for line in text.splitlines() if _SUMMARY.search(line)]
    if summary:
        for number, what in _COUNT.findall(summary[-1]):
            counts["errors" if what.startswith("error") else what] = int(number)
    skips = [line.strip()[:300] for line in text.splitlines() if line.startswith("SKIPPED [")]
    failures = [line.strip()[:300] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {**counts, "summary_line": summary[-1].strip("= ") if summary else None, "skip_reasons": skips,
            "failures": failures}  # fmt: skip


def part_cuda_tests(ctx: Context, result: dict[str, Any]) -> str:
    # On a GPU the whole suite is collected (no marked test can hide); --tiny collects the marked files only.
    selection = _cuda_test_files() if ctx.tiny else ["tests"]
    if not selection:
        return "failed: no test file uses the cuda marker"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "--basetemp", str(ctx.work / "pytest"), *selection]  # fmt: skip
    result["command"] = "python -m pytest -q -m cuda " + " ".join(selection)
    child = ctx.run("cuda_tests", cmd, cap=ctx.remaining())
    result.update(parse_pytest(child.text()))
    result["returncode"] = child.returncode
    if child.timed_out:
        result["tail"] = child.tail()
        return "timeout"
    ran = result["passed"] + result["failed"] + result["errors"] + result["skipped"]
    if child.returncode == 5 or ran == 0:
        return "failed: no cuda-marked test was collected"
    if child.returncode != 0 or result["failed"] or result["errors"]:
        result["tail"] = child.tail()
        return f"failed: {result['failed']} failed, {result['errors']} errors ({_reason(result['summary_line'] or '')})"
    if ctx.device == "cpu":
        result["note"] = "no CUDA device: every cuda test skips; this checks they are collected and skip cleanly"
    elif result["skipped"]:
        result["note"] = f"{result['skipped']} cuda test(s) skipped on a CUDA machine: see skip_reasons"
    return "ok"


# ----------------------------------------------------------------------------------------------------------------------
# Parts: bench, bench_compile
# ----------------------------------------------------------------------------------------------------------------------

# Names a seconds-per-step figure has had in tools.benchmark's JSON (a number, or a {min, median, ...} spread).
_SECONDS_KEYS = ("step_seconds", "seconds_per_step", "seconds_per_iter", "seconds_per_iteration", "s_per_iter")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _figure(value: Any) -> float | None:
    """A number, or the median (else mean) of a spread ``{"min", "median", "max", ...}``."""
    if isinstance(value, dict):
        return next((_number(value[k]) for k in ("median", "mean") if _number(value.get(k)) is not None), None)
    return _number(value)


def _medians(table: Any) -> dict[str, float] | None:
    """``{phase: spread}`` -> ``{phase: median seconds}``."""
    if not isinstance(table, dict):
        return None
    found = {str(k): _round(_figure(v)) for k, v in table.items() if _figure(v) is not None}
    return found or None


def parse_benchmark(data: Any) -> dict[str, Any]:
    """s/iteration, images/s, peak CUDA memory and phase times from ``tools.benchmark --json``, read defensively.

    Knows the layouts the benchmark has had: ``train.variants.<first of train.order>`` holding spreads
    (``step_seconds.median``, ...; msfc-benchmark/2), or the figures straight under ``train`` (or at the top level) as
    numbers (``seconds_per_step``). Raises ValueError when no seconds-per-step figure is found.
    """
    if not isinstance(data, dict):
        raise ValueError(f"benchmark JSON is a {type(data).__name__}, not an object")
    train = data.get("train") if isinstance(data.get("train"), dict) else data
    variants = train.get("variants")
    if isinstance(variants, dict) and variants:
        order = [name for name in train.get("order") or [] if name in variants] or list(variants)
        entry = variants[order[0]]
    else:
        entry = train
    if not isinstance(entry, dict):
        raise ValueError("benchmark JSON: the train figures are not an object")
    seconds = next((_figure(entry[k]) for k in _SECONDS_KEYS if _figure(entry.get(k)) is not None), None)
    if seconds is None or seconds <= 0:
        raise ValueError(f"no seconds-per-step figure (one of {', '.join(_SECONDS_KEYS)}) in the train figures")
    batch = _number(entry.get("batch"))
    images = _figure(entry.get("images_per_second"))
    if images is None and batch:
        images = batch / seconds
    parsed: dict[str, Any] = {"seconds_per_iter": seconds, "images_per_second": images}
    for key in ("batch", "crop", "parameters", "active_terms"):
        if key in entry:
            parsed[f"benchmark_{key}"] = entry[key]
    memory = entry.get("memory") if isinstance(entry.get("memory"), dict) else {}
    cuda = _number(memory.get("cuda_max_allocated_bytes"))
    if cuda is not None:
        parsed["benchmark_cuda_max_allocated_gib"] = cuda / GIB
    spread = entry.get("step_seconds") if isinstance(entry.get("step_seconds"), dict) else None
    if spread:
        parsed["step_seconds_spread"] = {k: _round(v) for k, v in spread.items() if _number(v) is not None}
    phases = _medians(entry.get("phase_seconds"))
    if phases:
        parsed["phase_seconds_median"] = phases
    profile = entry.get("profile") if isinstance(entry.get("profile"), dict) else {}
    if isinstance(profile.get("phases"), list):
        parsed["profile_seconds_per_step"] = {
            str(row["name"]): _round(_number(row.get("seconds")))
            for row in profile["phases"]
            if isinstance(row, dict) and "name" in row and _number(row.get("seconds")) is not None
        }
    return parsed


def benchmark_timing_args(total_steps: int, tiny: bool, warmup: int) -> list[str]:
    """How many train steps the benchmark times, in the flags this version of tools/benchmark.py has.

    Read from its source rather than from ``--help`` (which would cost an import of torch): ``--warmup/--steps/
    --repeats`` (and ``--profile-steps``) where it has them, else ``--iters``. A wrong guess is no crash: the
    benchmark then rejects the flag, and the run is recorded as unavailable with its message.
    """
    try:
        source = (ROOT / "tools" / "benchmark.py").read_text()
    except OSError:
        return ["--iters", str(total_steps)]
    if not all(f'"--{flag}"' in source for flag in ("warmup", "steps", "repeats")):
        return ["--iters", str(total_steps)]
    repeats = max(1, min(3, total_steps))
    args = ["--warmup", str(warmup), "--steps", str(math.ceil(total_steps / repeats)), "--repeats", str(repeats)]
    if '"--profile-steps"' in source:
        args += ["--profile-steps", "0" if tiny else "1"]
    return args


def _benchmark_child(argv: list[str]) -> int:
    """``python -m tools.gpu_check _benchmark_child MEMORY_JSON BENCHMARK_ARGS...``: run ``python -m tools.benchmark
    BENCHMARK_ARGS`` in this process, then write its peak GPU memory and peak host RSS to MEMORY_JSON."""
    import runpy

    memory_json, args = Path(argv[0]), argv[1:]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    code = 0
    sys.argv = ["python -m tools.benchmark", *args]
    try:
        runpy.run_module("tools.benchmark", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        memory = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            memory["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            memory["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        write_json(memory_json, memory)
    return code


def _bench_runs(ctx: Context, compile_: bool) -> list[dict[str, Any]]:
    """The configurations to measure, most important first (bf16 is the recipe's precision, batch 2 its batch)."""
    runs = []
    precisions = ("bf16",) if compile_ else ("bf16", "fp32")
    for batch in (2, 4):
        for precision in precisions:
            name = f"batch{batch}_{precision}" + ("_compile" if compile_ else "")
            run = {"name": name, "batch": batch, "precision": precision, "compile": compile_, "status": "pending"}
            if ctx.tiny and (name != "batch2_fp32" or compile_):
                run["status"] = ("skipped: --tiny does not compile (inductor on a CPU takes minutes)" if compile_
                                 else "skipped: --tiny measures one configuration")  # fmt: skip
            runs.append(run)
    return runs


def _run_benchmark(ctx: Context, run: dict[str, Any], cap: float, recipe: dict[str, Any]) -> None:
    """Measure one configuration in a child process; fills ``run`` (status and figures)."""
    config, overrides = ctx.model_args()
    crop = 64 if ctx.tiny else 448
    overrides = [*overrides, f"train.batch_size={run['batch']}", f"train.precision={run['precision']}"]
    if run["compile"]:
        overrides.append("train.compile=true")
    out, memory = ctx.work / f"{run['name']}.json", ctx.work / f"{run['name']}.memory.json"
    for stale in (out, memory):
        stale.unlink(missing_ok=True)
    warmup = 0 if ctx.tiny else (3 if run["compile"] else 2)  # compiling happens in the warm-up steps
    timing = benchmark_timing_args(ctx.bench_iters, ctx.tiny, warmup)
    args = ["--config", config, "--what", "train", *timing, "--json", str(out), *overrides]
    run["command"] = "python -m tools.benchmark " + " ".join(args)
    run["crop"] = crop
    child = ctx.run(run["name"], [sys.executable, "-m", "tools.gpu_check", CHILD_BENCHMARK, str(memory), *args], cap)
    run["wall_s"] = round(child.wall_s, 1)
    if child.timed_out:
        run["status"] = f"timeout: stopped after {child.wall_s:.0f} s"
        return
    if child.returncode == 2:  # a user error of the benchmark: a flag, stage or key it does not have (yet)
        run["status"] = f"unavailable: {_log_reason(child.text())}"
        return
    if child.returncode != 0:
        run["status"] = f"failed: exit {child.returncode}: {_log_reason(child.text())}"
        run["tail"] = child.tail()
        return
    try:
        run.update(parse_benchmark(json.loads(out.read_text())))
    except (OSError, ValueError) as err:
        run["status"] = f"unavailable: benchmark JSON unreadable: {_reason(str(err))}"
        return
    with contextlib.suppress(OSError, ValueError):
        run.update({k: _round(v) for k, v in json.loads(memory.read_text()).items()})
    run["seconds_per_iter"] = _round(run["seconds_per_iter"])
    run["images_per_second"] = _round(run["images_per_second"])
    if "benchmark_cuda_max_allocated_gib" in run:
        run["benchmark_cuda_max_allocated_gib"] = _round(run["benchmark_cuda_max_allocated_gib"])
    run["projected_voc_hours"] = projected_hours(run["seconds_per_iter"], recipe)
    run["status"] = "ok"


def _bench_part(ctx: Context, result: dict[str, Any], compile_: bool, run_cap: float) -> str:
    recipe = ctx.state["recipe"]
    runs = result["runs"] = _bench_runs(ctx, compile_)
    result["assumption"] = (
        f"projected_voc_hours = {recipe['iterations']} optimiser steps ({recipe['config']} train.max_iters) x "
        f"train.accum_steps {recipe['accum_steps']} x the measured s/iteration, on 1 GPU, at the run's own batch "
        f"(the recipe's is {recipe['batch']}, crop {recipe['crop']}); one benchmark step has every loss term active "
        "(the recipe starts seg and reg at iteration 2000, so slightly high) on random inputs, without data loading, "
        "validation (every 2000 iterations) or checkpoints"
    )
    result["timed_steps"] = ctx.bench_iters
    for run in runs:
        if run["status"] != "pending":
            continue
        if ctx.remaining() < 5:
            run["status"] = "skipped: the part's budget is used up"
            continue
        run["status"] = "running"
        ctx.save()
        try:
            _run_benchmark(ctx, run, run_cap, recipe)
        except PartTimeout:
            run["status"] = "timeout"
            raise
        ctx.save()
    speedups = {}
    for batch in (2, 4):
        by = {r["precision"]: r for r in runs if r["batch"] == batch and r["status"] == "ok"}
        if "fp32" in by and "bf16" in by:
            speedups[f"batch{batch}"] = _round(by["fp32"]["seconds_per_iter"] / by["bf16"]["seconds_per_iter"])
    if speedups:
        result["bf16_speedup_over_fp32"] = speedups
    statuses = [r["status"] for r in runs]
    if any(s.startswith("timeout") for s in statuses):
        return "timeout"
    failed = [r for r in runs if r["status"].startswith("failed")]
    if failed:
        return f"failed: {len(failed)} of {len(runs)} runs failed ({failed[0]['name']}: {failed[0]['status']})"
    if not any(s == "ok" for s in statuses):
        first = next((r for r in runs if r["status"].startswith("unavailable")), runs[0])
        return first["status"] if first["status"].startswith(("unavailable", "skipped")) else "failed: nothing ran"
    return "ok"


def part_bench(ctx: Context, result: dict[str, Any]) -> str:
    return _bench_part(ctx, result, compile_=False, run_cap=90 if ctx.tiny else 75)


def part_bench_compile(ctx: Context, result: dict[str, Any]) -> str:
    from utils.config import ConfigError, load_config

    config, overrides = ctx.model_args()
    try:
        load_config(config, [*overrides, "data.root=unused", "run.out_dir=unused", "train.compile=true"])
    except ConfigError as err:
        return f"unavailable: train.compile is not accepted by the config yet ({_reason(str(err), 200)})"
    return _bench_part(ctx, result, compile_=True, run_cap=60 if ctx.tiny else 150)


# ----------------------------------------------------------------------------------------------------------------------
# Part: train
# ----------------------------------------------------------------------------------------------------------------------


def loss_summary(records: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """First-``window`` vs last-``window`` mean of loss_total (and of every loss term present in both windows)."""
    first, last = records[:window], records[-window:]
    summary: dict[str, Any] = {"window": window, "records": len(records)}
    terms = sorted({k for r in records for k in r if k.startswith("loss_")})
    per_term = {}
    for term in terms:
        a = [r[term] for r in first if _number(r.get(term)) is not None]
        b = [r[term] for r in last if _number(r.get(term)) is not None]
        if a and b:
            per_term[term] = {"first": _round(float(np.mean(a))), "last": _round(float(np.mean(b)))}
    summary["terms"] = per_term
    total = per_term.get("loss_total")
    summary["loss_first_mean"] = total["first"] if total else None
    summary["loss_last_mean"] = total["last"] if total else None
    summary["loss_decreased"] = bool(total and total["last"] < total["first"])
    return summary


def steady_seconds_per_iter(records: list[dict[str, Any]]) -> float | None:
    """s/iteration from the trainer's elapsed ``seconds`` over the last two thirds of the records (warm-up left out)."""
    timed = [(int(r["step"]), float(r["seconds"])) for r in records if _number(r.get("seconds")) is not None]
    if len(timed) < 3:
        return None
    (s0, t0), (s1, t1) = timed[len(timed) // 3], timed[-1]
    return (t1 - t0) / (s1 - s0) if s1 > s0 else None


def part_train(ctx: Context, result: dict[str, Any]) -> str:
    from utils.logging import read_metrics

    root = ctx.synthetic()
    iters = ctx.train_iters
    window = max(1, min(50, iters // 3))
    run_dir = ctx.work / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config, overrides = ctx.model_args()
    settings = [f"data.root={root}", f"run.out_dir={run_dir}", f"train.max_iters={iters}",
                f"train.warmup_iters={max(1, iters // 10)}", "train.log_every=1", "train.eval_every=0",
                f"train.ckpt_every={iters}"]  # fmt: skip
    if not ctx.tiny:
        settings += ["train.batch_size=2", "train.precision=bf16", "data.num_workers=4"]
    args = ["--config", config, *overrides, *settings]
    result["command"] = "scripts/launch.sh tools.train " + " ".join(args)
    precision = "bf16" if ctx.device == "cuda" and not ctx.tiny else "fp32"  # the smoke config trains in fp32
    result.update({"iterations": iters, "batch": 2, "crop": 64 if ctx.tiny else 448, "precision": precision})
    env = {**ctx.env(), "NGPUS": "1", "NNODES": "1"}
    child = ctx.run("train", ["bash", "scripts/launch.sh", "tools.train", *args], cap=ctx.remaining(), env=env)
    result["returncode"] = child.returncode
    result["wall_s_child"] = round(child.wall_s, 1)
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics, kind="train") if metrics.is_file() else []
    if records:
        result.update(loss_summary(records, window))
        step = max(1, len(records) // 30)
        result["curve"] = [[int(r["step"]), _round(r.get("loss_total"))] for r in records[::step]]
        seconds = steady_seconds_per_iter(records)
        result["seconds_per_iter"] = _round(seconds)
        result["projected_voc_hours"] = projected_hours(seconds, ctx.state["recipe"])
        result["projection_assumption"] = (
            "the steady s/iteration of this run (data loading with its workers and per-step logging included; "
            "seg and reg inactive before iteration 2000) x the VOC run's iterations; no validation or checkpoints"
        )
    if (run_dir / "checkpoints" / "last.pth").is_file():
        ctx.state["trained_run"] = run_dir
    if child.timed_out:
        result["tail"] = child.tail()
        return "timeout"
    if child.returncode != 0:
        result["tail"] = child.tail()
        return f"failed: train exited {child.returncode}: {_log_reason(child.text())}"
    if len(records) < 2 * window:
        return f"failed: {len(records)} train records in metrics.jsonl, expected {iters}"
    if not result["loss_decreased"]:
        return (f"failed: loss_total did not go down (first {window}: {result['loss_first_mean']}, "
                f"last {window}: {result['loss_last_mean']})")  # fmt: skip
    return "ok"


# ----------------------------------------------------------------------------------------------------------------------
# Part: cam_agreement
# ----------------------------------------------------------------------------------------------------------------------


def _bf16_autocast(device: torch.device) -> tuple[contextlib.AbstractContextManager, str]:
    """bf16 autocast as the code uses it (engine.inference.autocast) on CUDA; on a CPU that one is fp32, so torch's
    CPU bf16 autocast is used instead, to exercise a real bf16 path."""
    from engine.inference import autocast

    if device.type == "cuda":
        return autocast(device, "bf16"), "engine.inference.autocast(cuda, bf16)"
    return torch.autocast("cpu", dtype=torch.bfloat16), "torch.autocast(cpu, bfloat16) (the engine's is fp32 on CPU)"


def part_cam_agreement(ctx: Context, result: dict[str, Any]) -> str:
    from core.cam import multiscale_cam
    from core.labels import cam_label
    from models import build_model, load_trained_model
    from utils.config import load_config, load_run_config
    from utils.io import read_image, read_label_png

    root = ctx.synthetic()
    device = torch.device(ctx.device)
    trained = ctx.state.get("trained_run")
    if trained is not None:
        cfg = load_run_config(trained, ["eval.checkpoint=last", f"run.device={ctx.device}"])
        model = load_trained_model(cfg, device)
        result["model"] = f"the train part's checkpoint ({cfg.train.max_iters} iterations)"
    else:
        config, overrides = ctx.model_args()
        cfg = load_config(config, [*overrides, f"data.root={root}", f"run.out_dir={ctx.work / 'unused'}"])
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        result["model"] = "random init (seed 0)"
    result["backbone"] = str(cfg.model.backbone)
    scales, bkg, max_batch = tuple(float(s) for s in cfg.cam.scales), float(cfg.cam.bkg_thre), int(cfg.cam.max_batch)
    result.update({"scales": list(scales), "bkg_thre": bkg})
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[: 4 if ctx.tiny else 8]
    agree = {"cam": 0, "cam_aux": 0}
    pixels, per_image, max_diff, diff_sum, diff_count, fg_pixels = 0, [], 0.0, 0.0, 0, 0
    result["autocast"] = _bf16_autocast(device)[1]
    try:
        for image_id in ids:
            image = torch.from_numpy(read_image(root / "JPEGImages" / f"{image_id}.jpg")).permute(2, 0, 1)[None]
            x = model.normalize(image.to(device))
            gt = read_label_png(root / "SegmentationClass" / f"{image_id}.png")
            classes = np.array(sorted(set(np.unique(gt).tolist()) - {0, int(cfg.data.ignore_index)}), dtype=np.int64)
            with torch.no_grad():
                full = multiscale_cam(model, x, scales, max_batch)
                with _bf16_autocast(device)[0]:
                    half = multiscale_cam(model, x, scales, max_batch)
            index = torch.as_tensor(classes - 1, device=device)
            image_agree = []
            for branch, a, b in (("cam", full[0], half[0]), ("cam_aux", full[1], half[1])):
                a, b = a[0, index].float().cpu(), b[0, index].float().cpu()
                la, lb = cam_label(a, classes, bkg), cam_label(b, classes, bkg)
                agree[branch] += int((la == lb).sum())
                image_agree.append(float((la == lb).mean()))
                if branch == "cam":
                    fg_pixels += int((la > 0).sum())
                    if a.numel():
                        diff = (a - b).abs()
                        max_diff, diff_sum = max(max_diff, float(diff.max())), diff_sum + float(diff.sum())
                        diff_count += diff.numel()
            pixels += int(gt.size)
            per_image.append(round(image_agree[0], 6))
            result.update({"images": len(per_image), "pixels": pixels})
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["pixel_agreement"] = _round(agree["cam"] / pixels, 6)
    result["cam_aux_pixel_agreement"] = _round(agree["cam_aux"] / pixels, 6)
    result["min_image_agreement"] = min(per_image)
    result["per_image_agreement"] = per_image
    result["foreground_fraction_fp32"] = _round(fg_pixels / pixels)
    result["max_abs_cam_diff"] = _round(max_diff)
    result["mean_abs_cam_diff"] = _round(diff_sum / diff_count) if diff_count else None
    result["threshold"] = AGREEMENT_THRESHOLD
    result["meets_threshold"] = bool(result["pixel_agreement"] >= AGREEMENT_THRESHOLD)
    return "ok"


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context, dict[str, Any]], str]
    budget: float  # seconds, at most (GPU)
    minimum: float  # seconds it needs to be worth starting (GPU)
    tiny_budget: float
    tiny_minimum: float


PARTS = {
    part.name: part
    for part in (
        Part("cuda_tests", part_cuda_tests, 120, 30, 90, 3),
        Part("bench", part_bench, 150, 45, 120, 3),
        Part("train", part_train, 170, 60, 90, 3),
        Part("cam_agreement", part_cam_agreement, 60, 15, 60, 3),
        Part("bench_compile", part_bench_compile, 240, 60, 60, 3),
    )
}


def _summary_line(name: str, result: dict[str, Any]) -> str:
    status, bits = result.get("status", "?"), []
    if name == "cuda_tests" and "passed" in result:
        bits.append(f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped, "
                    f"{result['errors']} errors")  # fmt: skip
    if name in ("bench", "bench_compile"):
        for run in result.get("runs", []):
            if run.get("status") == "ok":
                memory = run.get("peak_gpu_allocated_gib")
                bits.append(f"{run['name']} {run['seconds_per_iter']:.4g} s/it {run['images_per_second']:.4g} img/s"
                            + (f" {memory:.3g} GiB" if memory is not None else "")
                            + f" -> {run['projected_voc_hours']} h")  # fmt: skip
    if name == "train" and result.get("loss_first_mean") is not None:
        bits.append(f"loss {result['loss_first_mean']} -> {result['loss_last_mean']} (first/last {result['window']}), "
                    f"{result.get('seconds_per_iter')} s/it -> {result.get('projected_voc_hours')} h")  # fmt: skip
    if name == "cam_agreement" and "pixel_agreement" in result:
        flag = "" if result["meets_threshold"] else f" (below {AGREEMENT_THRESHOLD})"
        bits.append(f"labels agree on {result['pixel_agreement']:.4%} of pixels{flag}, {result['model']}")
    wall = f" [{result['wall_s']:.0f} s]" if "wall_s" in result else ""
    return f"{name}: {status}{wall}" + (": " + "; ".join(bits) if bits else "")


def _budget(part: Part, tiny: bool, remaining: float, later_minimum: float) -> float:
    """The part's cap, shortened so the selected parts after it keep their minimum; never below its own minimum."""
    cap, minimum = (part.tiny_budget, part.tiny_minimum) if tiny else (part.budget, part.minimum)
    return min(remaining, max(minimum, min(cap, remaining - later_minimum)))


def _run_part(ctx: Context, part: Part, report: dict[str, Any], remaining: float, later: float) -> str | None:
    """Run one part within its budget and record its status and wall time; returns the signal name on SIGTERM."""
    result = report["parts"][part.name]
    minimum = part.tiny_minimum if ctx.tiny else part.minimum
    if remaining < minimum:
        result["status"] = f"skipped: {max(remaining, 0):.0f} s of the time limit left, the part needs {minimum:.0f} s"
        return None
    budget = _budget(part, ctx.tiny, remaining, later)
    result.update(status="running", budget_s=round(budget, 1))
    ctx.save()
    ctx.deadline = time.monotonic() + budget
    start, interrupted = time.monotonic(), None
    try:
        with _alarm(budget):  # children are stopped a second before the deadline; the alarm stops in-process work
            status = part.run(ctx, result) or "ok"
    except PartTimeout as err:
        status, result["timeout_reason"] = "timeout", str(err)
    except Interrupted as err:
        interrupted = str(err)
        status = f"timeout: interrupted by {interrupted}"
    except Exception as err:
        status = f"failed: {type(err).__name__}: {_reason(str(err))}"
        result["traceback"] = [line[:300] for line in traceback.format_exc().splitlines()[-8:]]
    result["status"] = status
    result["wall_s"] = round(time.monotonic() - start, 1)
    return interrupted


def _update_projection(report: dict[str, Any], name: str) -> None:
    """Collect the parts' projected VOC wall hours under ``report['projection']['hours']``."""
    result, hours = report["parts"][name], report["projection"]["hours"]
    if name == "train" and result.get("projected_voc_hours") is not None:
        hours["train_run_" + result.get("precision", "") + "_batch2"] = result["projected_voc_hours"]
    for run in result.get("runs", []):
        if run.get("projected_voc_hours") is not None:
            hours["benchmark_" + run["name"]] = run["projected_voc_hours"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (rewritten as it goes)"
    )
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)} (default all)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="smoke-config sizes and few iterations (tests on a CPU)")
    parser.add_argument("--bench-iters", type=int, default=None, help="timed steps per benchmark run (15; --tiny 1)")
    parser.add_argument("--train-iters", type=int, default=None, help="iterations of the train part (300; --tiny 12)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (logs, run folder, data)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown or not args.parts:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.time_limit <= 0:
        parser.error("--time-limit must be positive")
    args.bench_iters = args.bench_iters or (1 if args.tiny else 15)
    args.train_iters = args.train_iters or (12 if args.tiny else 300)
    if args.train_iters < 3:
        parser.error("--train-iters must be at least 3 (first and last windows)")
    return args


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD_BENCHMARK]:
        return _benchmark_child(argv[1:])
    args = _parse_args(argv)
    start = time.monotonic()
    end = start + args.time_limit
    report: dict[str, Any] = {
        "schema": SCHEMA, "command": ["python", "-m", "tools.gpu_check", *argv], "started": _now(), "finished": None,
        "device": args.device, "tiny": args.tiny, "time_limit_s": args.time_limit, "elapsed_s": 0.0,
        "complete": False, "status": "running", "machine": None, "projection": None,
        "parts": {name: {"status": "pending" if name in args.parts else "skipped: not selected (--parts)"}
                  for name in PARTS},
    }  # fmt: skip

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write_json(args.out, report)

    if args.device == "cuda" and not torch.cuda.is_available():
        report.update(status="failed: --device cuda but torch.cuda.is_available() is False", finished=_now())
        save()
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; use a GPU machine (or --device cpu --tiny)",
              file=sys.stderr)  # fmt: skip
        return 2
    save()
    try:
        report["machine"] = machine_info(args.device)
    except Exception as err:  # a report without machine details beats no report
        report["machine"] = {"error": f"{type(err).__name__}: {_reason(str(err))}", "gpu": None}
    try:
        recipe = projection_recipe()
    except Exception as err:  # the base.yaml defaults, said so
        recipe = {"config": f"unreadable ({type(err).__name__}: {_reason(str(err), 200)}); base.yaml defaults",
                  "iterations": 20000, "batch": 2, "accum_steps": 1, "crop": 448}  # fmt: skip
    report["projection"] = {
        **recipe, "gpus": 1, "hours": {},
        "assumption": (
            f"hours = {recipe['iterations']} iterations x accum_steps {recipe['accum_steps']} x the measured "
            "s/iteration on 1 GPU, at each measurement's batch and crop; benchmark_*: random-input steps with every "
            "loss term active, no data loading; train_run_*: the train part's steady s/iteration, data loading "
            "included, seg/reg not yet active; neither counts validation or checkpoints"
        ),
    }  # fmt: skip
    save()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.device, args.tiny, work, save, args.bench_iters, args.train_iters, state={"recipe": recipe})
    print(
        f"gpu_check: {report['machine']['gpu']['name'] if report['machine']['gpu'] else 'CPU'}, torch "
        f"{torch.__version__}; parts {', '.join(args.parts)}; {args.time_limit:.0f} s; JSON {args.out}",
        flush=True,
    )

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    interrupted = None
    try:
        selected = [PARTS[name] for name in PARTS if name in args.parts]
        for i, part in enumerate(selected):
            later = sum(p.tiny_minimum if args.tiny else p.minimum for p in selected[i + 1 :])
            interrupted = _run_part(ctx, part, report, end - time.monotonic(), later)
            _update_projection(report, part.name)
            save()
            print("gpu_check: " + _summary_line(part.name, report["parts"][part.name]), flush=True)
            if interrupted:
                break
    except Interrupted as err:  # between two parts
        interrupted = str(err)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not args.keep_work and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    for name in args.parts:
        if report["parts"][name]["status"] in ("pending", "running"):
            report["parts"][name]["status"] = f"skipped: interrupted ({interrupted})"
    statuses = {name: report["parts"][name]["status"] for name in args.parts}
    bad = [name for name, s in statuses.items() if s.startswith(("failed", "timeout", "running", "pending"))]
    report.update(complete=interrupted is None, finished=_now(),
                  status="ok" if not bad else f"failed: {', '.join(bad)}")  # fmt: skip
    report["summary"] = [_summary_line(name, report["parts"][name]) for name in PARTS]
    save()
    print(f"gpu_check: {report['status']} in {report['elapsed_s']:.0f} s of {args.time_limit:.0f}; wrote {args.out}")
    if interrupted:
        return 124
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
