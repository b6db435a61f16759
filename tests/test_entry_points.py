"""The entry points as a user meets them: --help everywhere, any working folder, user errors as one line + exit 2
(also under torchrun), for the shell scripts, scripts/launch.sh (utils/launch.py) and every tool's main."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import benchmark, evaluate, infer_seg, make_cam, make_pseudo_labels, make_synthetic, prepare_coco, report
from utils.errors import EXIT_USER_ERROR, UserError

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    """The user's environment: this interpreter first on PATH, no PYTHONPATH (the scripts must find the repo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NGPUS", "NNODES")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _bash(script: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _header(script: str) -> str:
    """A script's --help header: its comment lines from line 2 up to ``set -euo pipefail``, without the ``# ``."""
    lines = (REPO / script).read_text().splitlines()[1:]
    header = []
    for line in lines:
        if line.startswith("set "):
            break
        if line.startswith("#"):
            header.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(header) + "\n"


# the headers each --help prints, outermost first: the wrapper's own, then those of the scripts it runs
HELP_HEADERS = {
    "scripts/launch.sh": ["scripts/launch.sh"],
    "scripts/infer_pipeline.sh": ["scripts/infer_pipeline.sh", "scripts/launch.sh"],
    "infer_run_VOC.sh": ["infer_run_VOC.sh", "scripts/infer_pipeline.sh", "scripts/launch.sh"],
    "infer_run_COCO.sh": ["infer_run_COCO.sh", "scripts/infer_pipeline.sh", "scripts/launch.sh"],
    "train_run_VOC.sh": ["train_run_VOC.sh", "scripts/launch.sh"],
    "train_run_COCO.sh": ["train_run_COCO.sh", "scripts/launch.sh"],
}


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("scripts/launch.sh", ["Usage: scripts/launch.sh MODULE", "NNODES", "RDZV_ENDPOINT"]),
        ("scripts/infer_pipeline.sh", ["scripts/infer_pipeline.sh RUN_DIR", "eval.cam_split", "NGPUS"]),
        ("infer_run_VOC.sh", ["./infer_run_VOC.sh runs/voc", "scripts/infer_pipeline.sh RUN_DIR", "RDZV_ENDPOINT"]),
        ("infer_run_COCO.sh", ["./infer_run_COCO.sh runs/coco", "scripts/infer_pipeline.sh RUN_DIR", "NGPUS"]),
        # train: the script's usage, the launcher's variables, then every option of tools.train
        ("train_run_VOC.sh", ["./train_run_VOC.sh data.root=", "NNODES", "RDZV_ENDPOINT", "--config CONFIG"]),
        ("train_run_COCO.sh", ["./train_run_COCO.sh data.root=", "NGPUS", "RDZV_ENDPOINT", "--run-dir RUN"]),
    ],
)
def test_every_shell_entry_point_answers_help_from_any_folder(tmp_path: Path, script: str, expected: list[str]):
    result = _bash(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for text in expected:
        assert text in result.stdout, text
    # each script's own header, once, in order: the wrapper's first (printed by the launcher it runs)
    headers = [_header(name) for name in HELP_HEADERS[script]]
    assert all(result.stdout.count(header) == 1 for header in headers), result.stdout[:3000]
    assert result.stdout.startswith(headers[0])
    assert [result.stdout.index(header) for header in headers] == sorted(result.stdout.index(h) for h in headers)
    assert not list(tmp_path.iterdir())  # asking for help writes nothing


def test_wrappers_keep_their_help_text_in_their_header_only():
    """The --help text of each wrapper is its header comment; the code below it is a few lines (no help copies)."""
    for script in ("train_run_VOC.sh", "train_run_COCO.sh", "infer_run_VOC.sh", "infer_run_COCO.sh"):
        lines = (REPO / script).read_text().splitlines()
        body = lines[lines.index("set -euo pipefail") :]
        assert len(body) <= 4 and "MSFC_WRAPPER=" in "\n".join(body), script


def _fake_python(tmp_path: Path) -> Path:
    """A ``python`` that prints MSFC_WRAPPER and its arguments, one a line, instead of running anything."""
    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "python"
    fake.write_text('#!/bin/sh\necho "MSFC_WRAPPER=${MSFC_WRAPPER-unset}"\nprintf \'%s\\n\' "$@"\n')
    fake.chmod(0o755)
    return folder


@pytest.mark.parametrize(("script", "dataset"), [("train_run_COCO.sh", "coco"), ("train_run_VOC.sh", "voc")])
def test_a_users_config_is_layered_over_the_dataset_config(tmp_path: Path, script: str, dataset: str) -> None:
    """``train_run_COCO.sh --config X`` trains coco.yaml <- X (before, X replaced coco.yaml)."""
    import argparse

    from utils.config import add_config_arguments, config_from_args

    user = tmp_path / "user.yaml"
    user.write_text("train: {max_iters: 5}\ncam: {high_thre: 0.8}\n")
    path = f"{_fake_python(tmp_path)}{os.pathsep}{_env()['PATH']}"
    result = _bash(script, "--config", str(user), "data.root=/d", "run.out_dir=/r", cwd=tmp_path, PATH=path)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()
    assert printed[:3] == ["MSFC_WRAPPER=unset", "-m", "tools.train"]  # the tool never sees the help variable
    argv = printed[3:]
    assert argv[argv.index("--config") + 1] == str(REPO / "configs" / f"{dataset}.yaml")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    assert (cfg.data.name, cfg.train.max_iters, cfg.cam.high_thre) == (dataset, 5, 0.8)
    assert cfg.cam.bkg_thre == {"voc": 0.50, "coco": 0.45}[dataset]  # the dataset file is still merged


def test_a_tool_runs_through_the_launcher_from_another_folder(tmp_path: Path) -> None:
    # a relative output path stays relative to the caller's folder (the launcher puts the repo on PYTHONPATH, no cd)
    for name in ("tools", "utils"):  # the user's own packages of those names must not shadow the repository's
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    args = ["tools.make_synthetic", "data", "--num-train", "2", "--num-val", "1", "--min-size", "48", "--max-size",
            "60"]  # fmt: skip
    result = _bash("scripts/launch.sh", *args, cwd=tmp_path, NGPUS="1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "data" / "ImageSets" / "Segmentation" / "val.txt").read_text().split() != []
    assert "wrote 3 images" in result.stdout


def test_a_user_error_in_a_tool_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _bash("scripts/launch.sh", "tools.make_cam", "--run-dir", "no_such_run", cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.splitlines() == [
        "error: no_such_run is not a run folder: no_such_run/config.yaml not found (train first or pass --config)"
    ]


@pytest.mark.slow
def test_under_torchrun_a_user_error_ends_with_a_one_line_summary_and_exit_2(tmp_path: Path) -> None:
    result = _bash("scripts/launch.sh", "tools.make_cam", "--run-dir", "no_such_run", cwd=tmp_path, NGPUS="2")
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    # every rank that got that far prints its own line; the first to fail makes the agent stop the others
    errors = [line for line in result.stderr.splitlines() if "error: no_such_run is not a run folder" in line]
    assert errors and all(line.split("error:")[0] in ("", "[rank 1] ") for line in errors), result.stderr
    summary = result.stderr.rstrip().splitlines()[-1]
    ranks = r"rank [01] (exit code 2|killed by SIGTERM)"
    assert re.fullmatch(rf"launch: tools\.make_cam failed \({ranks}(, {ranks})?\); the processes' messages are above",
                        summary), summary  # fmt: skip
    assert "exit code 2" in summary


def _missing_coco(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "no_coco")]


def _full_folder(tmp_path: Path) -> list[str]:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    return [str(tmp_path / "full"), "--num-train", "2", "--num-val", "1"]


# (tool's main, its arguments given tmp_path, words of the expected message)
USER_ERRORS = {
    "make_cam": (make_cam.main, lambda t: ["--run-dir", str(t / "no_run")], "is not a run folder"),
    "make_pseudo_labels": (make_pseudo_labels.main, lambda t: ["--run-dir", str(t / "no_run")], "is not a run folder"),
    "infer_seg": (infer_seg.main, lambda t: ["--run-dir", str(t / "no_run")], "is not a run folder"),
    "evaluate": (evaluate.main, lambda t: ["--source", "seg", "--run-dir", str(t / "no_run")], "is not a run folder"),
    "report": (report.main, lambda t: ["--run-dir", str(t / "no_run")], "is not a run folder"),
    "benchmark": (benchmark.main, lambda t: ["--config", str(t / "no.yaml")], "config file not found"),
    "prepare_coco": (prepare_coco.main, _missing_coco, "COCO root folder not found"),
    "make_synthetic": (make_synthetic.main, _full_folder, "is not empty"),
}


@pytest.mark.parametrize("tool", sorted(USER_ERRORS))
def test_every_tool_main_turns_a_user_error_into_one_line_and_exit_2(tmp_path: Path, capsys, tool: str) -> None:
    main, argv, words = USER_ERRORS[tool]
    args = argv(tmp_path)
    capsys.readouterr()
    assert main(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err


def test_debug_mode_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MSFC_DEBUG", "1")
    with pytest.raises(UserError, match="is not a run folder"):
        make_cam.main(["--run-dir", str(tmp_path / "no_run")])
