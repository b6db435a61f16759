"""tools/benchmark.py and utils/profiling.py: the breakdown's structure and consistency, never its speed.

One in-process run of the benchmark on the smoke config (two interleaved variants: two timed, one profiled and one
counted step each) is shared by the smoke tests; the helpers get small unit tests of their own.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tools import benchmark
from utils.errors import UserError
from utils.profiling import PhaseClock, label_times, raw_events, spread
from utils.syncs import KINDS

REPO = Path(__file__).resolve().parent.parent
TOCO = "toco:loss.weight.smc=0,loss.weight.mem=0"
MACHINE_KEYS = {"cpu_model", "logical_cpus", "usable_cpus", "torch_threads", "torch_version", "device", "device_name"}
OUTER = {f"bench/{phase}" for phase in (*benchmark.OUTER_PHASES, "step")}
# Overhead slack for nested ranges (the profiler's own bookkeeping between them); a consistency bound, not a speed.
SLACK = 1.05


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list | tuple):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """(the --json file's content, stdout) of one small benchmark run with two variants."""
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), "--what", "train", "--warmup", "0", "--repeats", "2",
            "--profile-steps", "1", "--count-syncs", "--variants", "full", TOCO, "--json", str(out)]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert benchmark.main(argv) == 0
    return json.loads(out.read_text()), stdout.getvalue()


def _phases(entry: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {row["name"]: row for row in entry["profile"]["phases"]}


@pytest.mark.smoke
def test_json_has_the_machine_and_both_variants(run: tuple[dict[str, Any], str]) -> None:
    results, stdout = run
    assert set(results["machine"]) >= MACHINE_KEYS
    assert results["machine"]["torch_version"] == torch.__version__
    assert results["train"]["order"] == ["full", "toco"]
    assert set(results["train"]["variants"]) == {"full", "toco"}
    assert results["train"]["variants"]["toco"]["overrides"] == ["loss.weight.smc=0", "loss.weight.mem=0"]
    (comparison,) = results["train"]["comparisons"]
    assert (comparison["variant"], comparison["over"]) == ("full", "toco")
    assert comparison["paired_ratio"]["n"] == 2
    assert "peak_rss_bytes" in results["memory"] and results["memory"]["peak_rss_bytes"] > 0
    for name in ("full", "toco", "full / toco", "step (profiled)", "step without profiler"):
        assert name in stdout


@pytest.mark.smoke
def test_every_number_is_finite_and_not_negative(run: tuple[dict[str, Any], str]) -> None:
    numbers = _numbers(run[0])
    assert numbers and all(math.isfinite(n) and n >= 0 for n in numbers)


@pytest.mark.smoke
def test_breakdown_has_a_phase_per_active_term_and_forward_group(run: tuple[dict[str, Any], str]) -> None:
    variants = run[0]["train"]["variants"]
    for name, entry in variants.items():
        labels = set(_phases(entry))
        active = set(entry["active_terms"])
        terms = {f"step/term/{t}" for t in active - {"seg", "reg"}} | {"step/term/seg+reg"}
        assert {label for label in labels if label.startswith("step/term/")} == terms, name
        assert OUTER | {"step/views", "step/cams", "step/combine"} <= labels, name
        forwards = {label for label in labels if label.startswith("step/forward/")}
        assert any(label.startswith("step/forward/main") for label in forwards), name
        assert any("local" in label for label in forwards) == ("ctc" in active), name
        assert any("smcm" in label for label in forwards) == ("smc" in active), name
    assert {"smc", "mem"} <= set(variants["full"]["active_terms"])
    assert not {"smc", "mem"} & set(variants["toco"]["active_terms"])


@pytest.mark.smoke
def test_phase_times_add_up_to_no_more_than_the_profiled_step(run: tuple[dict[str, Any], str]) -> None:
    for name, entry in run[0]["train"]["variants"].items():
        rows = _phases(entry)
        seconds = {label: row["seconds"] for label, row in rows.items()}
        labelled = sum(v for label, v in seconds.items() if label.startswith("step/"))
        assert labelled <= seconds["bench/loss"] * SLACK, name
        outer = sum(seconds[f"bench/{phase}"] for phase in benchmark.OUTER_PHASES)
        assert outer <= seconds["bench/step"] * SLACK, name
        assert seconds["bench/step"] <= entry["profile"]["wall_seconds_per_step"] * SLACK, name
        phases = entry["phase_seconds"]
        assert sum(phases[p]["median"] for p in benchmark.OUTER_PHASES) <= entry["step_seconds"]["max"] * SLACK


@pytest.mark.smoke
def test_sync_count_names_phases_kinds_and_call_sites(run: tuple[dict[str, Any], str]) -> None:
    for name, entry in run[0]["train"]["variants"].items():
        syncs = entry["syncs"]
        assert syncs["counter"] == "utils.syncs.count_syncs" and syncs["steps"] == 1
        assert syncs["device_syncs"] == 0, name  # a CPU run: nothing lives on a device
        assert set(syncs["by_phase"]) == set(benchmark.OUTER_PHASES), name
        assert sum(syncs["by_phase"].values()) == syncs["host_reads"] == sum(syncs["by_kind"].values()), name
        assert set(syncs["by_kind"]) <= set(KINDS), name
        for site in syncs["sites"]:
            assert site["phase"] in benchmark.OUTER_PHASES and site["kind"] in KINDS and site["count"] >= 1
            path, _, line = site["site"].rpartition(":")
            assert path and line.isdigit(), site
    assert "host reads in one step" in run[1]


@pytest.mark.smoke
def test_the_other_stages_still_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stages.json"
    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), "--what", "cam,seg,crf", "--iters", "1",
            "--json", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    results = json.loads(out.read_text())
    assert {"cam", "seg", "crf"} <= set(results) and "train" not in results
    assert all(results[stage]["images_per_second"] > 0 for stage in ("cam", "seg", "crf"))


def test_presets_are_vit_b_at_224_and_448() -> None:
    assert set(benchmark.PRESETS) == {"vit_b_224", "vit_b_448"}
    for crop in (224, 448):
        files, overrides = benchmark.PRESETS[f"vit_b_{crop}"]
        assert [Path(f).name for f in files] == ["voc.yaml"] and all(Path(f).is_file() for f in files)
        assert f"data.crop_size={crop}" in overrides and "model.pretrained=false" in overrides
        assert f"model.backbone={benchmark.VIT_B}" in overrides


def test_parse_variant() -> None:
    assert benchmark.parse_variant("full") == ("full", [])
    assert benchmark.parse_variant(TOCO) == ("toco", ["loss.weight.smc=0", "loss.weight.mem=0"])
    # a comma inside a value does not split it
    assert benchmark.parse_variant("s:cam.scales=[1.0,0.5],loss.weight.mem=0") == (
        "s",
        ["cam.scales=[1.0,0.5]", "loss.weight.mem=0"],
    )
    for bad in ("", "a=b", "x:nokey"):
        with pytest.raises(UserError):
            benchmark.parse_variant(bad)


def test_repeated_variant_names_and_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    smoke = str(REPO / "configs" / "smoke.yaml")
    assert benchmark.main(["--config", smoke, "--variants", "a", "a"]) == 2
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--preset", "vit_b_224", "--config", smoke])
    with pytest.raises(SystemExit):
        benchmark.main(["--config", smoke, "--repeats", "0"])


def test_label_times_sums_ranges_by_label() -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function("step/a"):
                torch.ones(64, 64).matmul(torch.ones(64, 64))
        with record_function("other/b"):
            torch.ones(4).sum()
    times = label_times(raw_events(prof), ("step/",))
    assert list(times) == ["step/a"]
    assert times["step/a"]["calls"] == 3 and times["step/a"]["host_seconds"] > 0
    assert times["step/a"]["device_seconds"] == 0


def test_phase_clock_and_spread() -> None:
    clock = PhaseClock(torch.device("cpu"))
    for _ in range(2):
        with clock.phase("x"):
            pass
        with clock.phase("y"):
            pass
    seconds = clock.seconds()
    assert list(seconds) == ["x", "y"] and all(v >= 0 for v in seconds.values())
    assert clock.seconds() == {}
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "mean": 2.0, "n": 3}


def test_trees_time_two_checkouts_interleaved_and_compare_their_losses() -> None:
    """Two workers on the same code (two names for this checkout): the same seed gives the same losses, step by step,
    in two separate processes, so a before/after run whose losses match shows the versions compute the same step."""
    trees = [("before", REPO, "x"), ("after", REPO, "x")]
    logged: list[str] = []
    overrides = ["data.root=unused", "run.out_dir=unused", "run.num_threads=1"]
    result = benchmark.bench_trees(trees, ["configs/smoke.yaml"], overrides, warmup=0, steps=2, repeats=2,
                                   log=logged.append)  # fmt: skip
    assert result["order"] == ["before", "after"]
    # interleaved: before, after, before, after
    assert [line.split()[2] for line in logged if line.startswith("repeat")] == ["before:", "after:"] * 2
    for tree in result["trees"].values():
        assert len(tree["losses"]) == 4 and all(math.isfinite(loss) for loss in tree["losses"])
        assert tree["step_seconds"]["n"] == 2 and tree["step_seconds"]["min"] > 0
        assert tree["parameters"] > 0 and tree["torch_threads"] == 1
    assert result["trees"]["before"]["losses"] == result["trees"]["after"]["losses"]
    assert len(set(result["trees"]["before"]["losses"])) > 1  # the optimiser moved the weights between steps
    (comparison,) = result["comparisons"]
    assert comparison["same_losses"] and comparison["max_loss_difference"] == 0
    assert comparison["tree"] == "before" and comparison["over"] == "after"
    assert "losses identical" in benchmark.format_trees(result)


def test_trees_check_out_a_revision_and_remove_it_afterwards() -> None:
    with benchmark.checkouts(["HEAD"]) as ((spec, path, commit),):
        assert spec == "HEAD" and (path / "tools" / "benchmark.py").is_file()
        assert commit.split()[0] == benchmark._git(REPO, "rev-parse", "--short", "HEAD")
    assert not path.exists()
    with pytest.raises(UserError, match="neither a folder nor a git revision"), benchmark.checkouts(["no-such-xyz"]):
        pass
    with pytest.raises(UserError, match="given twice"), benchmark.checkouts(["HEAD", "HEAD"]):
        pass


def test_rw_stage_reports_the_walk_and_its_transition_size(tmp_path: Path) -> None:
    out = tmp_path / "rw.json"
    code = benchmark.main(["--config", "configs/smoke.yaml", "--what", "rw", "--image-size", "18", "24", "--iters", "1",
                           "--json", str(out), "rw.exp_times=3"])  # fmt: skip
    assert code == 0
    rw = json.loads(out.read_text())["rw"]
    assert rw["grid"] == [5, 6] and rw["nodes"] == 30 and rw["steps"] == 8
    # radius 5 on a 5x6 grid: every node's loop, plus each valid half-plane pair twice
    assert 30 < rw["transition_nnz"] <= 30 * (2 * 34 + 1)
    assert rw["dense_matrix_mb"] == pytest.approx(30 * 30 * 4 / 2**20)
    assert rw["seconds_per_image"] > 0
