"""utils/logging.py: metrics.jsonl records, TensorBoard events, truncation on resume; the pace of a training log
(seconds per step, ETA), progress lines where there is no terminal; utils/provenance.py: the git state of the code."""

import io
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from utils.logging import LoggedProgress, MetricsWriter, StepClock, format_duration, progress_bar, read_metrics
from utils.provenance import GitState, git_state


def test_metrics_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log(0, {"loss_cls": 0.5, "lr": 1e-4})
    writer.log(1, {"miou": float("nan")}, kind="val")
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 0, "kind": "train", "loss_cls": 0.5, "lr": 1e-4},
        {"step": 1, "kind": "val", "miou": None},  # non-finite numbers become null, keeping the file valid JSON
    ]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(5):
        writer.log(step, {"x": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tr')  # torn by a kill
    # resumed from the checkpoint taken after 2 completed steps: record 2 stays, 3 and 4 are rewritten
    MetricsWriter(tmp_path, resume_step=2, tensorboard=False).log(3, {"x": 30})
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(0, 0), (1, 1), (2, 2), (3, 30)]


def test_other_ranks_write_nothing(tmp_path):
    MetricsWriter(tmp_path, rank=1).log(0, {"x": 1})
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------- pace and progress lines


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (59.4, "0:00:59"), (59.6, "0:01:00"), (3599, "0:59:59"), (3600, "1:00:00"),
     (97_329, "27:02:09"), (-5, "0:00:00")],
)  # fmt: skip
def test_format_duration_writes_hours_minutes_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_step_clock_times_each_window_and_counts_the_eta_down_without_the_first_window() -> None:
    clock = FakeClock()
    pace = StepClock(start_step=0, total=100, clock=clock)
    laps = []
    # 10 steps per window: the first takes 50 s (start-up), then 10 s each, the fourth 40 s (with a validation)
    for seconds in (50.0, 10.0, 10.0, 40.0, 10.0):
        clock.now += seconds
        laps.append(pace.lap(10 * (len(laps) + 1)))
    assert [lap["sec_per_it"] for lap in laps] == [5.0, 1.0, 1.0, 4.0, 1.0]
    # ETA: the first lap from its own window; later ones from the mean since the first lap, validation included
    etas = [lap["eta_s"] for lap in laps]
    assert etas == [90 * 5.0, 80 * 1.0, 70 * 1.0, 60 * (60.0 / 30), 50 * (70.0 / 40)]
    assert etas[0] > etas[1] > etas[2]  # at a steady pace it counts down
    clock.now += 50.0
    assert pace.lap(100) == {"sec_per_it": 1.0, "eta_s": 0.0}


def test_step_clock_of_a_resumed_run_counts_from_the_resumed_step() -> None:
    clock = FakeClock()
    pace = StepClock(start_step=40, total=100, clock=clock)
    clock.now += 20.0
    assert pace.lap(50) == {"sec_per_it": 2.0, "eta_s": 100.0}


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.progress"]


def test_progress_off_a_terminal_logs_periodic_lines_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock, stream = FakeClock(), io.StringIO()  # StringIO is no terminal
    caplog.set_level(logging.INFO, logger="test.progress")
    log = logging.getLogger("test.progress")
    with progress_bar(total=1, file=stream, logger=log) as probe:
        assert isinstance(probe, LoggedProgress)  # what progress_bar picks off a terminal
    caplog.clear()
    bar = LoggedProgress(total=100, desc="masks", unit="img", log_every_s=30.0, logger=log, clock=clock)
    for _ in range(100):  # 1 image per second: a line after 30 s, 60 s, 90 s
        clock.now += 1.0
        bar.update(1)
    bar.set_postfix_str("skipped 3", refresh=False)
    bar.close()
    assert _progress_lines(caplog) == [
        "masks: started, 100 img",
        "masks: 30/100 (30.0%) | 1 img/s | elapsed 0:00:30 | ETA 0:01:10",
        "masks: 60/100 (60.0%) | 1 img/s | elapsed 0:01:00 | ETA 0:00:40",
        "masks: 90/100 (90.0%) | 1 img/s | elapsed 0:01:30 | ETA 0:00:10",
        "masks: done, 100 img in 0:01:40 (1 img/s) | skipped 3",
    ]
    assert stream.getvalue() == ""  # no bar drawn into the file


def test_progress_over_an_iterable_yields_every_item_and_logs_each_update_at_interval_0(caplog) -> None:
    caplog.set_level(logging.INFO, logger="test.progress")
    items = list(progress_bar(iter(range(5)), total=5, desc="d", file=io.StringIO(), log_every_s=0,
                              logger=logging.getLogger("test.progress")))  # fmt: skip
    assert items == [0, 1, 2, 3, 4]
    lines = _progress_lines(caplog)
    assert lines[0] == "d: started, 5 it" and lines[-1].startswith("d: done, 5 it in 0:00:00 (")
    assert [line.split(" | ")[0] for line in lines[1:-1]] == [f"d: {n}/5 ({20 * n:.1f}%)" for n in range(1, 6)]


def test_progress_on_a_terminal_is_a_plain_bar_and_disable_turns_off_both(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="test.progress")
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    bar = progress_bar(range(3), desc="d", file=terminal, disable=None, logger=logging.getLogger("test.progress"))
    assert not isinstance(bar, LoggedProgress) and list(bar) == [0, 1, 2]
    assert "3/3" in terminal.getvalue()  # tqdm drew the bar; disable=None means "on" here
    quiet = progress_bar(range(3), file=io.StringIO(), disable=True, logger=logging.getLogger("test.progress"))
    assert not isinstance(quiet, LoggedProgress) and list(quiet) == [0, 1, 2]
    assert _progress_lines(caplog) == []


# ------------------------------------------------------------------------------------ provenance (utils/provenance)


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def no_parent_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path, with git kept from finding a repository above it."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    return tmp_path


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_of_a_checkout_clean_dirty_and_detached(no_parent_repo: Path) -> None:
    repo = no_parent_repo / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "trunk")
    assert git_state(repo) == GitState("no commit yet", "trunk", 0)
    (repo / "a.txt").write_text("a")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    state = git_state(repo / ".")
    assert state == GitState(commit, "trunk", 0) and state.dirty is False
    assert state.describe() == f"git {commit} on trunk, clean"
    (repo / "a.txt").write_text("changed")
    (repo / "sub").mkdir()
    (repo / "sub" / "new.txt").write_text("untracked")
    state = git_state(repo / "sub")  # any folder inside the checkout
    assert state == GitState(commit, "trunk", 2) and state.dirty is True
    assert state.describe() == f"git {commit} on trunk, dirty (2 changed files)"
    assert state.as_dict() == {"commit": commit, "branch": "trunk", "changed_files": 2, "note": "", "dirty": True}
    _git(repo, "checkout", "-q", "--detach")
    assert git_state(repo).branch == "(detached HEAD)"


def test_git_state_outside_a_checkout_and_without_git(no_parent_repo: Path, monkeypatch) -> None:
    state = git_state(no_parent_repo)
    assert state == GitState(None, None, None, "not a git checkout") and state.dirty is None
    assert state.describe() == "not a git checkout"
    assert state.as_dict()["commit"] is None
    monkeypatch.setenv("PATH", str(no_parent_repo))  # no git on PATH
    assert git_state(no_parent_repo).describe() == "not a git checkout (git is not installed)"
