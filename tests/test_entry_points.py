"""The entry points as a user meets them: --help everywhere, any working folder, user errors as one line + exit 2
(also under torchrun), for the shell scripts, scripts/launch.sh (utils/launch.py) and every tool's main."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import (
    benchmark,
    convert_sbd,
    evaluate,
    infer_seg,
    make_cam,
    make_pseudo_labels,
    make_synthetic,
    package_voc_test,
    prepare_coco,
    report,
)
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


# what a user needs to start a training on several machines, named in the training entry points' --help
MULTI_NODE = ["NGPUS", "NNODES", "RDZV_ENDPOINT", "RDZV_ID", "sbatch scripts/slurm_train.sbatch"]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("scripts/launch.sh", ["Usage: scripts/launch.sh MODULE", "NNODES", "RDZV_ENDPOINT"]),
        ("scripts/infer_pipeline.sh", ["scripts/infer_pipeline.sh RUN_DIR", "eval.cam_split", "NGPUS"]),
        ("infer_run_VOC.sh", ["./infer_run_VOC.sh runs/voc", "scripts/infer_pipeline.sh RUN_DIR", "RDZV_ENDPOINT"]),
        ("infer_run_COCO.sh", ["./infer_run_COCO.sh runs/coco", "scripts/infer_pipeline.sh RUN_DIR", "NGPUS"]),
        # train: the script's usage, the launcher's variables, then every option of tools.train
        # (and where a cluster sets those variables: scripts/slurm_train.sbatch)
        ("train_run_VOC.sh", ["./train_run_VOC.sh data.root=", *MULTI_NODE, "--config CONFIG"]),
        (
            "train_run_COCO.sh",
            ["./train_run_COCO.sh data.root=", *MULTI_NODE, "ENTRY=train_run_COCO.sh", "--run-dir RUN"],
        ),
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
    "convert_sbd": (convert_sbd.main, lambda t: [str(t), str(t / "VOC2012")], "SBD"),
    "package_voc_test": (package_voc_test.main, lambda t: ["--run-dir", str(t / "no_run")], "is not a run folder"),
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


# ------------------------------------------------------------------------------- SLURM (scripts/slurm_train.sbatch)

SBATCH = REPO / "scripts" / "slurm_train.sbatch"
# the job's environment as SLURM sets it for the batch script (two machines, 4 GPUs each)
SLURM_JOB = {"SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
             "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_CPUS_PER_TASK": "32", "SLURM_SUBMIT_DIR": str(REPO)}  # fmt: skip

SCONTROL_STUB = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 9
printf 'gpu07\\ngpu08\\n'
"""
# records its argv, then runs the command once per task with SLURM_NODEID set, as each machine would
SRUN_STUB = """#!/bin/sh
printf '%s\\n' "$@" > "$SRUN_RECORD"
tasks=1
while [ "${1#-}" != "$1" ]; do
    case "$1" in --ntasks=*) tasks="${1#--ntasks=}" ;; esac
    shift
done
node=0
while [ "$node" -lt "$tasks" ]; do
    SLURM_NODEID=$node "$@" || exit $?
    node=$((node + 1))
done
"""
# prints the machine, the launcher's variables and its argv (one a line), then "end"
PYTHON_STUB = """#!/bin/sh
echo "node=$SLURM_NODEID NNODES=$NNODES NGPUS=$NGPUS RDZV_ENDPOINT=$RDZV_ENDPOINT RDZV_ID=$RDZV_ID"
echo "MSFC_WRAPPER=${MSFC_WRAPPER-unset}"
printf '%s\\n' "$@"
echo end
"""


def _fake_slurm(tmp_path: Path) -> Path:
    """A folder for PATH with ``scontrol``, ``srun`` and ``python`` stubs (above): the entry point and launcher on
    each simulated machine run for real, up to the ``python`` they would start."""
    folder = tmp_path / "slurm_bin"
    folder.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL_STUB), ("srun", SRUN_STUB), ("python", PYTHON_STUB)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


# the script's optional variables, blank (= unset) unless a test sets them, whatever the caller's environment holds
SBATCH_OPTIONAL = dict.fromkeys(["ENTRY", "MSFC_ROOT", "RDZV_PORT", "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK"], "")


def _sbatch(tmp_path: Path, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` as SLURM would, with the stubs of :func:`_fake_slurm`, in ``tmp_path``."""
    env = SBATCH_OPTIONAL | env
    path = f"{_fake_slurm(tmp_path)}{os.pathsep}{_env()['PATH']}"
    record = str(tmp_path / "srun.args")
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=_env(PATH=path, SRUN_RECORD=record, **env),
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_sbatch_script_is_valid_bash_with_its_directives_before_any_command() -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only up to the first command
    assert directives and max(directives) < first_command and lines[first_command] == "set -euo pipefail"
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task=", "--time="):
        assert any(lines[i].startswith(f"#SBATCH {option}") for i in directives), option


@pytest.mark.parametrize("spooled", [False, True], ids=["in_place", "spooled_copy"])
def test_the_sbatch_script_starts_one_launcher_per_machine_with_a_c10d_rendezvous(tmp_path: Path, spooled: bool):
    """Through srun and the real entry point and launcher, each machine runs the same torchrun command: 2 machines,
    4 GPUs each, the rendezvous on the first host at 29500 + job id % 500, the job id as rendezvous id."""
    script = SBATCH
    if spooled:  # as sbatch runs it: a copy in the spool folder, the repository found through SLURM_SUBMIT_DIR
        (tmp_path / "spool").mkdir()
        script = Path(shutil.copy(SBATCH, tmp_path / "spool" / "slurm_script"))
    result = _sbatch(tmp_path, script, "data.root=/d", "run.out_dir=/r", **SLURM_JOB)
    assert result.returncode == 0, result.stderr[-2000:]
    srun = (tmp_path / "srun.args").read_text().splitlines()
    entry = str(REPO / "train_run_VOC.sh")
    assert srun == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=32",
                    entry, "data.root=/d", "run.out_dir=/r"]  # fmt: skip
    endpoint = f"gpu07:{29500 + 4321 % 500}"
    torchrun = ["-m", "utils.launch", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-id=4321",
                f"--rdzv-endpoint={endpoint}", "--nproc_per_node=4", "-m", "tools.train",
                "--config", str(REPO / "configs" / "voc.yaml"), "data.root=/d", "run.out_dir=/r"]  # fmt: skip
    launched = [block.strip().splitlines() for block in result.stdout.split("end\n")[:-1]]
    assert launched == [
        [f"slurm_train: NNODES=2 NGPUS=4 RDZV_ENDPOINT={endpoint} RDZV_ID=4321 srun {' '.join(srun)}"] * (node == 0)
        + [f"node={node} NNODES=2 NGPUS=4 RDZV_ENDPOINT={endpoint} RDZV_ID=4321", "MSFC_WRAPPER=unset", *torchrun]
        for node in (0, 1)
    ]


def test_the_sbatch_script_takes_entry_ngpus_and_port_from_the_environment(tmp_path: Path) -> None:
    env = {**SLURM_JOB, "SLURM_GPUS_PER_NODE": "", "SLURM_GPUS_ON_NODE": "8", "SLURM_NNODES": "1"}
    result = _sbatch(tmp_path, SBATCH, "--config", "x.yaml", ENTRY="train_run_COCO.sh", RDZV_PORT="31000", **env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NNODES=1 NGPUS=8 RDZV_ENDPOINT=gpu07:31000 RDZV_ID=4321" in result.stdout
    # one machine: the launcher runs torchrun standalone over the machine's 8 GPUs, with the COCO config
    assert "--standalone\n--nproc_per_node=8\n-m\ntools.train\n--config\n" + str(REPO / "configs" / "coco.yaml") in (
        result.stdout
    )
    result = _sbatch(tmp_path, SBATCH, NGPUS="2", **env)
    assert "NGPUS=2 " in result.stdout  # NGPUS wins over the allocation


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "not inside a SLURM job (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES unset): submit with sbatch"),
        ({**SLURM_JOB, "SLURM_GPUS_PER_NODE": ""}, "cannot tell the GPUs per machine ('')"),
        ({**SLURM_JOB, "ENTRY": "train_run_ABC.sh"}, "ENTRY=train_run_ABC.sh: "),
        ({**SLURM_JOB, "MSFC_ROOT": "/nowhere"}, "/nowhere is not the MSFC repository (no scripts/launch.sh)"),
    ],
    ids=["outside_slurm", "no_gpu_count", "bad_entry", "bad_root"],
)
def test_the_sbatch_script_names_what_is_missing_in_one_line(tmp_path: Path, env: dict[str, str], message: str):
    env = dict.fromkeys(SLURM_JOB, "") | env  # the variables of a SLURM job that runs the tests, if any, are hidden
    result = _sbatch(tmp_path, SBATCH, "data.root=/d", **env)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.startswith("slurm_train: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "srun.args").exists()
