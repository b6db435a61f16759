"""tools/gpu_check.py and scripts/gpu_check.sh on a CPU: every part's CPU path (``--device cpu --tiny``), the JSON
schema and its numbers, the time limit (a part stopped at its budget, the JSON still valid with the parts done so far),
SIGTERM, the benchmark / pytest / metrics readers, and the script's one-line failure without CUDA or torch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tools import gpu_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STATUS = re.compile(r"ok|pending|running|timeout(: .+)?|(failed|skipped|unavailable): .+")
TOP_KEYS = {"schema", "command", "started", "finished", "device", "tiny", "time_limit_s", "elapsed_s", "complete",
            "status", "machine", "projection", "parts", "summary"}  # fmt: skip


def _numbers(node: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON tree, with its path."""
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in _numbers(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [item for i, value in enumerate(node) for item in _numbers(value, f"{path}[{i}]")]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(path, float(node))]
    return []


def _strings(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*map(_strings, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(_strings, node)) if node else set()
    return {node} if isinstance(node, str) else set()


def _check_report(report: dict[str, Any]) -> None:
    """The schema every report keeps, whatever ran."""
    assert report["schema"] == gpu_check.SCHEMA
    assert set(report) >= TOP_KEYS, TOP_KEYS - set(report)
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert STATUS.fullmatch(part["status"]), (name, part["status"])
    bad = [(path, value) for path, value in _numbers(report) if not math.isfinite(value)]
    assert not bad
    assert not _strings(report) & {"nan", "inf", "-inf"}  # how write_json spells a non-finite figure


def _run(argv: list[str]) -> tuple[int, dict[str, Any]]:
    out = Path(argv[argv.index("--out") + 1])
    code = gpu_check.main(argv)
    return code, json.loads(out.read_text())


def _leftover_processes(marker: str) -> list[int]:
    """Processes (other than this one) whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ----------------------------------------------------------------------------------------------------------------------
# End to end: every part, tiny, on the CPU
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("gpu_check")
    work = folder / "work"
    code, report = _run(["--device", "cpu", "--tiny", "--out", str(folder / "check.json"), "--work-dir", str(work),
                         "--time-limit", "400"])  # fmt: skip
    return code, report, work


@pytest.mark.smoke
@pytest.mark.slow
def test_every_part_runs_on_the_cpu_and_the_json_keeps_its_schema(tiny_report) -> None:
    code, report, _ = tiny_report
    _check_report(report)
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert code == 0, (statuses, {n: p.get("tail") for n, p in report["parts"].items()})
    assert report["complete"] and report["status"] == "ok" and report["finished"]
    assert report["device"] == "cpu" and report["tiny"] is True
    assert all(statuses[name] == "ok" for name in ("cuda_tests", "bench", "train", "cam_agreement")), statuses
    # train.compile: not a config key yet -> unavailable; once it is, --tiny does not compile
    assert statuses["bench_compile"].startswith(("unavailable: ", "skipped: --tiny does not compile")), statuses
    for part in report["parts"].values():
        assert part["wall_s"] >= 0 and part["budget_s"] > 0
    assert report["elapsed_s"] <= report["time_limit_s"]
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and machine["gpu"] is None and machine["cpu_count"] >= 1
    assert report["summary"] and all(line.split(":")[0] in gpu_check.PARTS for line in report["summary"])


@pytest.mark.smoke
@pytest.mark.slow
def test_cuda_tests_part_counts_the_cuda_tests_which_all_skip_here(tiny_report) -> None:
    part = tiny_report[1]["parts"]["cuda_tests"]
    assert "tests/test_cuda.py" in part["command"] and "test_gpu_check" not in part["command"]
    assert part["skipped"] >= 1 and part["passed"] == part["failed"] == part["errors"] == 0
    assert part["returncode"] == 0 and part["skip_reasons"] and "CUDA" in part["note"]


@pytest.mark.smoke
@pytest.mark.slow
def test_bench_part_measures_through_the_benchmark_with_memory_and_projection(tiny_report) -> None:
    _, report, work = tiny_report
    part = report["parts"]["bench"]
    runs = {run["name"]: run for run in part["runs"]}
    assert set(runs) == {"batch2_bf16", "batch2_fp32", "batch4_bf16", "batch4_fp32"}
    measured = runs["batch2_fp32"]
    assert measured["status"] == "ok", measured
    assert measured["seconds_per_iter"] > 0 and measured["images_per_second"] > 0 and measured["peak_rss_gib"] > 0
    assert measured["projected_voc_hours"] == pytest.approx(
        measured["seconds_per_iter"] * 20000 / 3600, rel=1e-2
    )  # configs/voc.yaml: 20k iterations, accum_steps 1
    assert "--json" in measured["command"] and "train.batch_size=2" in measured["command"]
    assert all(runs[name]["status"].startswith("skipped: --tiny") for name in runs if name != "batch2_fp32")
    assert "20000" in part["assumption"] and "1 GPU" in part["assumption"]
    assert report["projection"]["hours"]["benchmark_batch2_fp32"] == measured["projected_voc_hours"]
    assert (work / "batch2_fp32.log").is_file()


@pytest.mark.smoke
@pytest.mark.slow
def test_train_part_lowers_the_loss_and_cam_agreement_uses_its_checkpoint(tiny_report) -> None:
    report = tiny_report[1]
    train, cam = report["parts"]["train"], report["parts"]["cam_agreement"]
    assert train["returncode"] == 0 and train["records"] == train["iterations"] == 12
    assert train["window"] == 4 and train["loss_decreased"]
    assert train["loss_last_mean"] < train["loss_first_mean"]
    assert train["terms"]["loss_total"]["first"] == train["loss_first_mean"]
    assert train["seconds_per_iter"] > 0 and train["projected_voc_hours"] > 0
    assert train["curve"][0][0] == 1 and "scripts/launch.sh tools.train" in train["command"]
    assert "checkpoint" in cam["model"] and cam["images"] == 4
    assert 0.9 <= cam["pixel_agreement"] <= 1 and 0.9 <= cam["cam_aux_pixel_agreement"] <= 1
    assert cam["min_image_agreement"] <= cam["pixel_agreement"] and len(cam["per_image_agreement"]) == 4
    assert cam["max_abs_cam_diff"] > 0  # a real bf16 path ran (torch's CPU autocast), not fp32 twice
    assert cam["bkg_thre"] == 0.25 and "bfloat16" in cam["autocast"]


# ----------------------------------------------------------------------------------------------------------------------
# The time limit and SIGTERM
# ----------------------------------------------------------------------------------------------------------------------


def _fake_part(name: str, run, **budgets: float) -> gpu_check.Part:
    return dataclasses.replace(gpu_check.PARTS[name], run=run, **budgets)


def _quick(ctx, result):
    result["figure"] = 1.5
    return "ok"


def test_the_time_limit_stops_a_child_kills_its_group_and_keeps_the_parts_done(tmp_path, monkeypatch) -> None:
    """5 s for three parts that need 3 s each: bench gets its minimum, its sleeping child is killed at the end of it
    (with its process group), and train, which no longer fits, is skipped; the part done before is kept."""
    marker = f"gpu-check-sleeper-{tmp_path.name}"

    def sleeper(ctx, result):
        result["started"] = True
        child = ctx.run("sleeper", [sys.executable, "-c", f"import time; time.sleep(120)  # {marker}"], cap=300)
        result["timed_out"] = child.timed_out
        return "timeout" if child.timed_out else "ok"

    parts = dict(gpu_check.PARTS, cuda_tests=_fake_part("cuda_tests", _quick), bench=_fake_part("bench", sleeper),
                 train=_fake_part("train", _quick))  # fmt: skip
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    start = time.monotonic()
    code, report = _run(["--device", "cpu", "--tiny", "--parts", "cuda_tests,bench,train", "--time-limit", "5",
                         "--out", str(tmp_path / "c.json")])  # fmt: skip
    assert time.monotonic() - start < 5 + gpu_check.KILL_GRACE
    _check_report(report)
    done, stopped, later = (report["parts"][name] for name in ("cuda_tests", "bench", "train"))
    assert done["status"] == "ok" and done["figure"] == 1.5
    assert stopped["status"] == "timeout" and stopped["timed_out"] and stopped["budget_s"] == 3
    assert later["status"].startswith("skipped: ") and "of the time limit left, the part needs 3 s" in later["status"]
    assert report["parts"]["cam_agreement"]["status"] == "skipped: not selected (--parts)"
    assert code == 1 and report["status"] == "failed: bench" and report["complete"]
    assert report["elapsed_s"] <= 5 + 1
    assert _leftover_processes(marker) == []  # the killed child left nothing running


def test_in_process_work_over_its_budget_is_interrupted(tmp_path, monkeypatch) -> None:
    def hang(ctx, result):
        result["started"] = True
        ctx.save()
        time.sleep(60)
        return "ok"

    parts = dict(gpu_check.PARTS, cam_agreement=_fake_part("cam_agreement", hang, tiny_budget=2, tiny_minimum=1))
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    start = time.monotonic()
    code, report = _run(["--device", "cpu", "--tiny", "--parts", "cam_agreement", "--out", str(tmp_path / "h.json")])
    assert time.monotonic() - start < 15
    _check_report(report)
    part = report["parts"]["cam_agreement"]
    assert part["status"] == "timeout" and part["started"] and part["budget_s"] == 2 and part["wall_s"] < 5
    assert "budget" in part["timeout_reason"] and code == 1


def test_sigterm_stops_the_running_part_and_writes_the_json(tmp_path, monkeypatch) -> None:
    def terminated(ctx, result):
        result["before_signal"] = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return "ok"

    monkeypatch.setattr(gpu_check, "PARTS", dict(gpu_check.PARTS, bench=_fake_part("bench", terminated)))
    handler = signal.getsignal(signal.SIGTERM)
    code, report = _run(["--device", "cpu", "--tiny", "--parts", "bench,train", "--out", str(tmp_path / "t.json")])
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    _check_report(report)
    assert code == 124 and not report["complete"]
    assert report["parts"]["bench"]["status"] == "timeout: interrupted by SIGTERM"
    assert report["parts"]["bench"]["before_signal"]
    assert report["parts"]["train"]["status"] == "skipped: interrupted (SIGTERM)"


def test_budgets_leave_the_later_parts_their_minimum() -> None:
    bench = gpu_check.PARTS["bench"]  # GPU: cap 150, minimum 45
    assert gpu_check._budget(bench, False, remaining=480, later_minimum=135) == 150
    assert gpu_check._budget(bench, False, remaining=200, later_minimum=135) == 65
    assert gpu_check._budget(bench, False, remaining=100, later_minimum=135) == 45  # never below its own minimum
    assert gpu_check._budget(bench, False, remaining=40, later_minimum=0) == 40
    total = sum(p.minimum for p in gpu_check.PARTS.values())
    assert total < 480 / 2  # the default limit leaves every part more than its minimum


# ----------------------------------------------------------------------------------------------------------------------
# Readers and the bench bookkeeping, without child processes
# ----------------------------------------------------------------------------------------------------------------------


def test_parse_benchmark_reads_both_layouts_and_rejects_json_without_a_step_time() -> None:
    spread = {"min": 0.4, "median": 0.5, "max": 0.7, "mean": 0.53, "n": 3}
    variant = {"batch": 2, "crop": 448, "step_seconds": spread, "images_per_second": {"median": 4.0},
               "phase_seconds": {"loss": {"median": 0.3}, "backward": {"median": 0.15}},
               "memory": {"cuda_max_allocated_bytes": 3 * 2**30},
               "profile": {"phases": [{"name": "step/cams", "seconds": 0.05}]}}  # fmt: skip
    new = gpu_check.parse_benchmark({"train": {"order": ["default"], "variants": {"default": variant}}})
    assert new["seconds_per_iter"] == 0.5 and new["images_per_second"] == 4.0
    assert new["benchmark_cuda_max_allocated_gib"] == 3.0 and new["benchmark_crop"] == 448
    assert new["phase_seconds_median"] == {"loss": 0.3, "backward": 0.15}
    assert new["profile_seconds_per_step"] == {"step/cams": 0.05}
    old = gpu_check.parse_benchmark({"train": {"seconds_per_step": 0.25, "batch": 2, "crop": 448}})
    assert old["seconds_per_iter"] == 0.25 and old["images_per_second"] == 8.0
    with pytest.raises(ValueError, match="seconds-per-step"):
        gpu_check.parse_benchmark({"train": {"images_per_second": 3}})
    with pytest.raises(ValueError):
        gpu_check.parse_benchmark([1, 2])


def test_parse_pytest_reads_the_summary_skips_and_failures() -> None:
    text = ("FAILED tests/test_cuda.py::test_a[bf16] - AssertionError\nSKIPPED [1] tests/test_x.py:3: needs 2 GPUs\n"
            "==== 1 failed, 2 passed, 1 skipped, 19 deselected, 1 error in 12.3s ====\n")  # fmt: skip
    counts = gpu_check.parse_pytest(text)
    assert (counts["failed"], counts["passed"], counts["skipped"], counts["errors"]) == (1, 2, 1, 1)
    assert counts["deselected"] == 19 and counts["failures"][0].startswith("FAILED tests/test_cuda.py")
    assert counts["skip_reasons"] == ["SKIPPED [1] tests/test_x.py:3: needs 2 GPUs"]
    assert gpu_check.parse_pytest("3 skipped, 19 deselected in 6.98s")["skipped"] == 3


def test_loss_summary_compares_the_first_and_last_windows() -> None:
    records = [{"step": s, "loss_total": 3.0 - 0.1 * s, "loss_cls": 0.7, "seconds": 0.2 * s} for s in range(1, 13)]
    records[-1]["loss_mem"] = 0.5  # a term that starts late is left out of the per-term table
    summary = gpu_check.loss_summary(records, 4)
    assert summary["loss_first_mean"] == pytest.approx(2.75) and summary["loss_last_mean"] == pytest.approx(1.95)
    assert summary["loss_decreased"] and "loss_mem" not in summary["terms"]
    assert gpu_check.steady_seconds_per_iter(records) == pytest.approx(0.2)
    flat = [dict(r, loss_total=1.0) for r in records]
    assert not gpu_check.loss_summary(flat, 4)["loss_decreased"]


def test_bench_reports_speedups_failures_and_unavailable_flags(tmp_path, monkeypatch) -> None:
    seconds = {"batch2_bf16": 0.2, "batch2_fp32": 0.5, "batch4_bf16": 0.35, "batch4_fp32": 1.0}

    def measured(ctx, run, cap, recipe):
        run.update(status="ok", seconds_per_iter=seconds[run["name"]], images_per_second=1.0)

    ctx = gpu_check.Context("cuda", False, tmp_path, lambda: None, 15, 300, deadline=time.monotonic() + 60,
                            state={"recipe": gpu_check.projection_recipe()})  # fmt: skip
    monkeypatch.setattr(gpu_check, "_run_benchmark", measured)
    result: dict[str, Any] = {}
    assert gpu_check._bench_part(ctx, result, compile_=False, run_cap=60) == "ok"
    assert [run["name"] for run in result["runs"]] == list(seconds)  # the recipe's bf16 batch 2 first
    assert result["bf16_speedup_over_fp32"] == {"batch2": 2.5, "batch4": 2.857}

    def missing_flag(ctx, run, cap, recipe):
        run["status"] = "unavailable: error: unrecognized arguments: --json"

    monkeypatch.setattr(gpu_check, "_run_benchmark", missing_flag)
    assert gpu_check._bench_part(ctx, {}, compile_=True, run_cap=60).startswith("unavailable: error: unrecognized")

    def one_fails(ctx, run, cap, recipe):
        run["status"] = "failed: exit 1: RuntimeError: CUDA out of memory" if run["batch"] == 4 else "ok"
        run.update(seconds_per_iter=0.3, images_per_second=6.0)

    monkeypatch.setattr(gpu_check, "_run_benchmark", one_fails)
    assert gpu_check._bench_part(ctx, {}, compile_=False, run_cap=60).startswith("failed: 2 of 4 runs failed")


def test_benchmark_timing_flags_follow_the_benchmark_source() -> None:
    args = gpu_check.benchmark_timing_args(15, tiny=False, warmup=2)
    source = (REPO / "tools" / "benchmark.py").read_text()
    if '"--repeats"' in source:
        assert args[:6] == ["--warmup", "2", "--steps", "5", "--repeats", "3"]
    else:
        assert args == ["--iters", "15"]


def test_command_line_errors_and_cuda_without_a_device(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--parts", "bench,nope", "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and "nope" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    code, report = _run(["--out", str(tmp_path / "cuda.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("gpu_check: ") and "no CUDA" in err
    assert report["status"].startswith("failed: --device cuda") and not report["complete"]


# ----------------------------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh
# ----------------------------------------------------------------------------------------------------------------------


def _script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, cwd=tmp_path,
                          timeout=120)  # fmt: skip


def test_script_help_prints_its_header(tmp_path: Path) -> None:
    result = _script(tmp_path, "--help")
    assert result.returncode == 0 and result.stdout.startswith("GPU check, one JSON")
    assert "GPU_CHECK_TIME_LIMIT" in result.stdout and "set -euo" not in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.smoke
@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine without CUDA")
def test_script_without_cuda_fails_with_one_clear_line(tmp_path: Path) -> None:
    result = _script(tmp_path, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("gpu_check: torch ") and "sees no CUDA device" in result.stderr
    assert "nothing was run" in result.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"].startswith("failed: torch") and not report["complete"]


def test_script_without_torch_fails_with_one_clear_line(tmp_path: Path) -> None:
    python = tmp_path / "python-without-site"  # the same interpreter without site-packages: no torch
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    result = _script(tmp_path, PYTHON=str(python))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("gpu_check: torch cannot be imported") and "requirements.txt" in result.stderr
    bad = _script(tmp_path, GPU_CHECK_TIME_LIMIT="soon")
    assert bad.returncode == 2 and "GPU_CHECK_TIME_LIMIT" in bad.stderr and len(bad.stderr.splitlines()) == 1
