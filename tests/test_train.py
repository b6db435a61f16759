"""tools/train.py end to end on generated data: outputs, exact resume, 2-process DDP, SIGKILL, learning, and the
reliability guarantees (docs/reliability.md): checkpoint before validation, one training per run folder, honest
resume, every random stream resumed, clear errors for full disks and nonsense configs."""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import engine.task
import engine.trainer
from engine.task import MSFC_METRICS
from engine.trainer import restore_best as _restore_best
from tools import train
from utils.checkpoint import read_checkpoint, resolve_checkpoint
from utils.config import load_config
from utils.logging import read_metrics
from utils.optim import lr_factor
from utils.provenance import git_state

REPO = Path(__file__).resolve().parent.parent
ALL_TERMS = {"cls", "cls_aux", "ptc", "ctc", "smc", "mem", "seg", "reg"}


def _args(root: Path, out: Path, *overrides: str) -> list[str]:
    return ["--config", "configs/smoke.yaml", f"data.root={root}", f"run.out_dir={out}", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl", kind="train")}


@pytest.mark.smoke
def test_two_iterations_write_every_output_and_log_exactly_the_enabled_terms(voc_root, tmp_path):
    out = tmp_path / "run"
    assert train.main(_args(voc_root, out, "train.max_iters=2")) == 0
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.pth").is_file()
    records = _train_records(out)
    # step 1 (first record) has every term but L_mem, which waits for the bank's first update after step 0
    assert {k[5:] for k in records[1] if k.startswith("loss_")} == (ALL_TERMS - {"mem"}) | {"total"}
    assert {k[5:] for k in records[2] if k.startswith("loss_")} == ALL_TERMS | {"total"}
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 2


# a train.log step line: step, lr, seconds per step, ETA (h:mm:ss), [CUDA peak memory], then the losses
STEP_LINE = re.compile(
    r"engine\.trainer: step (\d+)/(\d+)  lr (\S+)  (\S+) s/it  ETA (\d+):(\d\d):(\d\d)(?:  cuda peak (\S+) GiB)?  loss_"
)


def _step_lines(out: Path) -> dict[int, re.Match]:
    found = (STEP_LINE.search(line) for line in (out / "train.log").read_text().splitlines())
    return {int(match[1]): match for match in found if match}


def test_step_lines_tell_the_learning_rate_pace_and_eta_and_the_log_starts_with_the_code(voc_root, tmp_path):
    out = tmp_path / "run"
    overrides = ("train.max_iters=4", "train.ckpt_every=4", "train.log_every=1")
    assert train.main(_args(voc_root, out, *overrides)) == 0
    cfg = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={out}", *overrides]).train
    records, lines = _train_records(out), _step_lines(out)
    assert sorted(lines) == sorted(records) == [1, 2, 3, 4]
    for done, record in records.items():
        line = lines[done]
        # the lr of the window's last step (done - 1), as the schedule gives it, for the backbone group
        factor = lr_factor(done - 1, 4, int(cfg.warmup_iters), float(cfg.warmup_ratio), float(cfg.poly_power))
        assert record["lr"] == record["lr_backbone"] == float(cfg.lr) * factor
        assert line[2] == "4" and float(line[3]) == pytest.approx(record["lr"], rel=1e-2)
        assert 0 < record["sec_per_it"] < 60 and float(line[4]) == pytest.approx(record["sec_per_it"], rel=1e-2)
        assert int(line[5]) * 3600 + int(line[6]) * 60 + int(line[7]) == round(record["eta_s"])
        assert line[8] is None and "cuda_peak_gib" not in record  # a CPU run
    assert records[1]["eta_s"] > records[4]["eta_s"] == 0.0  # counts down to 0 at max_iters
    # the first line names the code that ran: commit, branch and working tree of this checkout (or none)
    first = (out / "train.log").read_text().splitlines()[0]
    state = git_state(REPO)
    assert f"engine.trainer: code: {REPO}, " in first
    assert (f"git {state.commit} on {state.branch}, " if state.commit else "not a git checkout") in first
    (setup,) = read_metrics(out / "metrics.jsonl", kind="setup")
    assert setup["step"] == 0 and (setup["world_size"], setup["global_batch"]) == (1, 2)
    assert (setup["git"]["commit"], setup["git"]["branch"]) == (state.commit, state.branch)
    assert isinstance(setup["git"]["dirty"], bool) == (state.commit is not None)
    assert setup["torch"] == torch.__version__


def test_a_training_outside_a_git_checkout_says_so_and_runs(voc_root, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.trainer, "REPO_ROOT", tmp_path)  # as if the code were a copy without .git
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    out = tmp_path / "run"
    assert train.main(_args(voc_root, out, "train.max_iters=1")) == 0
    assert (
        (out / "train.log")
        .read_text()
        .splitlines()[0]
        .endswith(
            f"engine.trainer: code: {tmp_path}, not a git checkout | python {platform.python_version()}, "
            f"torch {torch.__version__} | host {socket.gethostname()}"
        )
    )
    (setup,) = read_metrics(out / "metrics.jsonl", kind="setup")
    assert setup["git"] == {"commit": None, "branch": None, "changed_files": None, "note": "not a git checkout",
                            "dirty": None}  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_step_lines_tell_the_peak_gpu_memory(voc_root, tmp_path):
    out = tmp_path / "run"
    assert train.main(_args(voc_root, out, "run.device=cuda", "train.max_iters=2")) == 0
    records, lines = _train_records(out), _step_lines(out)
    for done, record in records.items():
        assert 0 < record["cuda_peak_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
        assert float(lines[done][8]) == pytest.approx(record["cuda_peak_gib"], abs=0.006)
    assert records[2]["cuda_peak_gib"] >= records[1]["cuda_peak_gib"]  # a peak since the start never falls


def test_disabled_terms_are_not_computed_or_logged(voc_root, tmp_path):
    out = tmp_path / "run"
    args = _args(voc_root, out, "train.max_iters=2", "loss.weight.ctc=0", "loss.weight.smc=0", "loss.weight.mem=0")
    assert train.main(args) == 0
    for record in _train_records(out).values():
        assert {k[5:] for k in record if k.startswith("loss_")} == {"cls", "cls_aux", "ptc", "seg", "reg", "total"}
    state = read_checkpoint(out / "checkpoints" / "last.pth")["model"]
    assert not state["memory.initialized"].any()  # L_mem off: the bank is never filled


@pytest.mark.parametrize(
    ("extra", "validating"),
    [
        ((), False),
        # stochastic depth draws from torch's global generator at every step, which iter(DataLoader) also used to
        # draw from right after the resumed state was restored
        (("model.backbone_kwargs.drop_path_rate=0.1",), False),
        # ... and a validation between the checkpoint of step 2 and step 3 must not move any stream either
        (("model.backbone_kwargs.drop_path_rate=0.1", "train.eval_every=2"), True),
    ],
    ids=["plain", "drop_path", "drop_path_and_validation"],
)
def test_resume_continues_bit_for_bit(voc_root, tmp_path, monkeypatch, extra, validating):
    if validating:
        real_validate = engine.task.validate

        def never_improving(*args, **kwargs):
            # the real validation (its DataLoader draws a seed from torch's global generator), with scores that never
            # beat the initial -1: no best_* is written, so last.pth of step 2 keeps its pre-validation streams
            results, overlays = real_validate(*args, **kwargs)
            return dict.fromkeys(results, -2.0), overlays

        monkeypatch.setattr(engine.task, "validate", never_improving)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    schedule = ("train.max_iters=4", "train.ckpt_every=4", *extra)
    assert train.main(_args(voc_root, straight, *schedule)) == 0
    assert train.main(_args(voc_root, resumed, *schedule, "train.stop_iter=2")) == 0
    assert read_checkpoint(resumed / "checkpoints" / "last.pth")["step"] == 2  # stop_iter writes a checkpoint
    assert train.main(_args(voc_root, resumed, *schedule, "train.resume=auto")) == 0
    if validating:
        assert sorted(r["step"] for r in read_metrics(resumed / "metrics.jsonl", kind="val")) == [2, 4]
    a = read_checkpoint(straight / "checkpoints" / "last.pth")
    b = read_checkpoint(resumed / "checkpoints" / "last.pth")
    assert a["step"] == b["step"] == 4
    # Tolerance: exact. Same data, crops, views and RNG streams on the same CPU give identical floats.
    for key, value in a["model"].items():  # includes memory.bank / initialized / accumulators and the teacher
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], b["optimizer"]["state"][index][name]), (index, name)
    # metrics.jsonl holds one history: steps 1..4 once each
    assert sorted(_train_records(resumed)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(voc_root, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tools.train", *_args(voc_root, out, "train.max_iters=3", "train.ckpt_every=3")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sync = read_metrics(out / "metrics.jsonl", kind="sync")
    assert sync == [{"step": 3, "kind": "sync", "ranks_identical": True, "world_size": 2}]
    assert "global batch 4 (2 per process x 1 accumulation x 2)" in (out / "train.log").read_text()
    state = read_checkpoint(out / "checkpoints" / "last.pth")["model"]
    assert state["memory.initialized"].any()  # the bank was updated through the all-reduce path


DYING_TRAIN = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from tools import train

    real_save, calls = torch.save, []

    def save_then_die(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # the first file of the second checkpoint: write half of it, then die
            with open(path, "wb") as f:
                f.write(b"\\x80\\x02partial checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *args, **kwargs)

    torch.save = save_then_die
    sys.exit(train.main(sys.argv[1:]))
    """
)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(voc_root, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "dying_train.py"
    script.write_text(DYING_TRAIN)
    args = _args(voc_root, out, "train.max_iters=3", "train.ckpt_every=1")
    killed = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=_env(), capture_output=True)
    assert killed.returncode == -9
    folder = out / "checkpoints"
    assert list(folder.glob(".*.tmp"))  # the torn file is there, under its temporary name only
    assert read_checkpoint(folder / "last.pth")["step"] == 1  # the previous checkpoint survived intact
    assert train.main([*args, "train.resume=auto"]) == 0
    assert not list(folder.glob(".*.tmp"))
    assert "resumed from" in (out / "train.log").read_text()
    assert read_checkpoint(folder / "last.pth")["step"] == 3
    assert sorted(_train_records(out)) == [1, 2, 3]


@pytest.mark.slow
def test_tiny_model_learns_on_generated_data(voc_root, tmp_path, all_background_miou):
    """Classification loss falls and val CAM mIoU beats the all-background baseline by a wide margin."""
    out = tmp_path / "learn"
    args = _args(voc_root, out, "train.max_iters=60", "train.batch_size=4", "train.eval_every=60",
                 "train.log_every=10", "train.ckpt_every=60", "train.lr=1e-3", "data.crop_size=64",
                 "loss.weight.ptc=0", "loss.weight.ctc=0", "loss.weight.smc=0", "loss.weight.mem=0",
                 "loss.weight.seg=0", "loss.weight.reg=0")  # fmt: skip
    assert train.main(args) == 0
    records = _train_records(out)
    first, last = records[10]["loss_cls"], records[60]["loss_cls"]
    val = read_metrics(out / "metrics.jsonl", kind="val")[-1]
    print(f"loss_cls {first:.3f} -> {last:.3f}; val CAM mIoU {val['cam_miou']:.3f} vs {all_background_miou:.3f}")
    assert last < 0.8 * first
    assert val["cam_miou"] > all_background_miou + 0.05


# validation every 2 steps; the decoder (L_seg, L_reg) starts training at step 2
BEST_SCHEDULE = ("train.max_iters=4", "train.eval_every=2", "train.ckpt_every=4", "loss.start_iter.seg=2",
                 "loss.start_iter.reg=2")  # fmt: skip


@pytest.mark.parametrize("saved_format", ["current", "single_best"])
def test_best_checkpoints_keep_their_own_metric_and_survive_resume(voc_root, tmp_path, saved_format):
    """best_cam.pth / best_seg.pth each track their own score; the decoder counts only once trained; resume keeps
    the state, also from a checkpoint of the old single-best format (``{"score", "step", "metric"}``)."""
    out = tmp_path / "run"
    folder = out / "checkpoints"
    assert train.main(_args(voc_root, out, *BEST_SCHEDULE, "train.stop_iter=2")) == 0
    # Validation after steps 0 and 1: the decoder has not trained yet, so there is no segmentation best
    # (the phase of the *next* step, would have scored the untrained decoder).
    assert (folder / "best_cam.pth").is_file() and not (folder / "best_seg.pth").exists()
    first = read_checkpoint(folder / "last.pth")
    assert first["extra"]["best"]["seg_miou"] == {"score": -1.0, "step": -1}
    if saved_format == "single_best":  # what a run trained before best_cam / best_seg wrote
        first["extra"]["best"] = {**first["extra"]["best"]["cam_miou"], "metric": "cam_miou"}
        torch.save(first, folder / "last.pth")
    assert train.main(_args(voc_root, out, *BEST_SCHEDULE, "train.resume=auto")) == 0

    val = {r["step"]: r for r in read_metrics(out / "metrics.jsonl", kind="val")}
    assert sorted(val) == [2, 4]
    cam_step = 4 if val[4]["cam_miou"] > val[2]["cam_miou"] else 2  # strict: an equal score keeps the earlier one
    best = read_checkpoint(folder / "last.pth")["extra"]["best"]
    assert best["cam_miou"] == {"score": pytest.approx(val[cam_step]["cam_miou"]), "step": cam_step}
    # the first segmentation score is a best of its own, whatever the CAM best is
    assert best["seg_miou"] == {"score": pytest.approx(val[4]["seg_miou"]), "step": 4}
    assert read_checkpoint(folder / "best_cam.pth")["step"] == cam_step
    assert read_checkpoint(folder / "best_seg.pth")["step"] == 4
    assert not (folder / "best.pth").exists()


def restore_best(saved):
    return _restore_best(saved, MSFC_METRICS)


def test_restore_best_reads_the_current_and_the_old_single_best_format():
    fresh = {"cam_miou": {"score": -1.0, "step": -1}, "seg_miou": {"score": -1.0, "step": -1}}
    assert restore_best(None) == restore_best({}) == fresh
    current = {"cam_miou": {"score": 0.4, "step": 6}, "seg_miou": {"score": 0.3, "step": 8}}
    assert restore_best(current) == current
    # old format: the score carries over to its own metric only
    assert restore_best({"score": 0.5, "step": 4, "metric": "seg_miou"}) == {
        **fresh, "seg_miou": {"score": 0.5, "step": 4}}  # fmt: skip
    assert restore_best({"score": -1.0, "step": -1, "metric": None}) == fresh  # never validated


def _checkpoint_cfg(out: Path, choice: str):
    return load_config("configs/smoke.yaml", [f"run.out_dir={out}", "data.root=/unused", f"eval.checkpoint={choice}"])


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_resolve_checkpoint_names_and_errors(tmp_path):
    folder = tmp_path / "checkpoints"
    with pytest.raises(FileNotFoundError, match=r"eval.checkpoint=last: no last.pth"):
        resolve_checkpoint(_checkpoint_cfg(tmp_path, "last"))
    _touch(folder, "last.pth", "best_cam.pth")
    assert load_config(None, ["run.out_dir=x", "data.root=y"]).eval.checkpoint == "last"  # SPEC §8
    assert resolve_checkpoint(_checkpoint_cfg(tmp_path, "last")) == folder / "last.pth"
    assert resolve_checkpoint(_checkpoint_cfg(tmp_path, "best_cam")) == folder / "best_cam.pth"
    # an explicit best_seg never falls back to another checkpoint
    with pytest.raises(FileNotFoundError, match=r"eval.checkpoint=best_seg: no best_seg.pth .*best_cam.pth"):
        resolve_checkpoint(_checkpoint_cfg(tmp_path, "best_seg"))
    _touch(folder, "best_seg.pth")
    assert resolve_checkpoint(_checkpoint_cfg(tmp_path, "best_seg")) == folder / "best_seg.pth"
    path = tmp_path / "elsewhere.pth"
    _touch(tmp_path, path.name)
    assert resolve_checkpoint(_checkpoint_cfg(tmp_path, str(path))) == path
    with pytest.raises(FileNotFoundError, match=r"eval.checkpoint=.*missing.pth: file not found"):
        resolve_checkpoint(_checkpoint_cfg(tmp_path, str(tmp_path / "missing.pth")))


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (("best_seg.pth", "best_cam.pth", "best.pth", "last.pth"), "best_seg.pth"),
        (("best_cam.pth", "best.pth", "last.pth"), "best_cam.pth"),
        (("best.pth", "last.pth"), "best.pth"),  # a run folder trained before best_cam / best_seg
        (("last.pth",), "last.pth"),  # e.g. trained without validation, as the old `best` did
    ],
)
def test_deprecated_best_alias_prefers_best_seg_and_warns(tmp_path, caplog, present, expected):
    _touch(tmp_path / "checkpoints", *present)
    with caplog.at_level(logging.WARNING, logger="utils.checkpoint"):
        assert resolve_checkpoint(_checkpoint_cfg(tmp_path, "best")) == tmp_path / "checkpoints" / expected
    assert "eval.checkpoint=best is deprecated" in caplog.text and expected in caplog.text


def test_deprecated_best_alias_without_checkpoints_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval.checkpoint=best \(deprecated\)"):
        resolve_checkpoint(_checkpoint_cfg(tmp_path, "best"))


# ------------------------------------------------------------------------------------------------ reliability (#10)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``folder``: equal snapshots = nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, what: str) -> None:
    """Wait until ``path`` exists; fail (not hang) if ``process`` exits first. A generous cap, not a timing test."""
    deadline = time.monotonic() + 300
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"{what} exited with {process.returncode} first:\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what}: {path} never appeared")
        time.sleep(0.1)


def test_a_failing_validation_keeps_the_checkpoint_of_its_step(voc_root, tmp_path, monkeypatch):
    """ckpt_every 4, eval_every 2: step 2 is validated but is not a checkpoint step; its last.pth must exist anyway."""
    out = tmp_path / "run"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated at full-resolution multi-scale validation)")

    monkeypatch.setattr(engine.task, "validate", out_of_memory)
    args = _args(voc_root, out, "train.max_iters=4", "train.eval_every=2", "train.ckpt_every=4")
    with pytest.raises(RuntimeError, match="simulated"):
        train.main(args)
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 2  # the 2 trained steps survive
    assert "validation after step 2 failed" in (out / "train.log").read_text()
    monkeypatch.undo()
    # and training continues from there (train.eval_every may change on resume)
    assert train.main([*args, "train.resume=auto", "train.eval_every=0"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 4
    assert sorted(_train_records(out)) == [1, 2, 3, 4]


def _break_mask_size(root: Path, name: str) -> Path:
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        path = root / folder / f"{name}.png"
        if path.is_file():
            with Image.open(path) as mask:
                mask.crop((0, 0, mask.width - 1, mask.height)).save(path)  # one column short, palette kept
    return root / "SegmentationClass" / f"{name}.png"


def _break_image(root: Path, name: str) -> Path:
    path = root / "JPEGImages" / f"{name}.jpg"
    path.write_bytes(b"this is not a JPEG")
    return path


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [(_break_mask_size, "but its image"), (_break_image, "cannot read the header of image file")],
    ids=["mask_size", "image"],
)
def test_broken_validation_files_stop_the_run_before_training(voc_root, tmp_path, capsys, breakage, expected):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    name = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[3]
    broken = breakage(root, name)
    out = tmp_path / "run"
    assert train.main(_args(root, out, "train.max_iters=2", "train.eval_every=2")) == 2
    err = capsys.readouterr().err
    assert "error: data.val_split=val: validation (train.eval_every > 0) cannot use these files: " in err
    assert str(broken) in err and expected in err and "train.eval_every=0" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()  # nothing was trained


HOLDING_TRAIN = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tools import train

    ready, release = Path(sys.argv[1]), Path(sys.argv[2])
    real_fit = train.Trainer.fit

    def held_fit(self):  # the run folder is locked and set up; hold it until the test says go
        ready.write_text(str(os.getpid()))
        while not release.exists():
            time.sleep(0.05)
        return real_fit(self)

    train.Trainer.fit = held_fit
    sys.exit(train.main(sys.argv[3:]))
    """
)


def _start_holder(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "holding_train.py"
    script.write_text(HOLDING_TRAIN)
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, str(script), str(ready), str(release), *args], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(ready, holder, "the first training")
    return holder, release


def test_a_second_training_on_a_busy_run_folder_fails_at_once_naming_the_holder(voc_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(voc_root, out, "train.max_iters=2")
    holder, release = _start_holder(tmp_path, args)
    try:
        before = _snapshot(out)
        assert train.main([*args, "train.resume=auto"]) == 2  # resume=auto must not attach to the live run either
        err = capsys.readouterr().err
        assert f"error: run folder {out} is in use by another training" in err
        assert f"pid {holder.pid}" in err and "Traceback" not in err
        assert _snapshot(out) == before  # the second run wrote nothing
    finally:
        release.write_text("")
        stdout, stderr = holder.communicate(timeout=600)
    assert holder.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert sorted(_train_records(out)) == [1, 2]  # one history, not two interleaved
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 2
    assert (out / ".lock").read_text() == ""  # released cleanly


def test_the_lock_of_a_killed_training_is_taken_over(voc_root, tmp_path):
    out = tmp_path / "run"
    args = _args(voc_root, out, "train.max_iters=2")
    holder, _ = _start_holder(tmp_path, args)
    holder.kill()  # SIGKILL: no chance to release anything
    holder.communicate()
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid  # the dead holder's details are still there
    assert train.main(args) == 0
    log = (out / "train.log").read_text()
    assert "took over the lock" in log and f"pid {holder.pid}" in log
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 2


def test_a_fresh_run_refuses_a_folder_holding_checkpoints(voc_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(voc_root, out, "train.max_iters=2")
    assert train.main(args) == 0
    before = (out / "checkpoints" / "last.pth").read_bytes()
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of an earlier training" in err and "train.resume=auto" in err
    assert (out / "checkpoints" / "last.pth").read_bytes() == before


def test_resume_refuses_a_changed_recipe_names_the_keys_and_records_overrides(voc_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(voc_root, out, "train.max_iters=4")
    assert train.main([*args, "train.stop_iter=2"]) == 0
    config, checkpoint = (out / "config.yaml").read_text(), (out / "checkpoints" / "last.pth").read_bytes()
    capsys.readouterr()

    assert train.main([*args, "train.resume=auto", "train.lr=1e-3", "train.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 2 -> 4; train.lr: 0.0005 -> 0.001" in err
    assert "train.resume_allow_changes=[train.batch_size,train.lr]" in err
    assert (out / "config.yaml").read_text() == config  # refused: nothing rewritten
    assert (out / "checkpoints" / "last.pth").read_bytes() == checkpoint

    # allowed changes pass freely; the others pass when named, and both are recorded
    changed = ["train.log_every=2", "eval.crf_workers=1", "train.lr=1e-3", "train.batch_size=4"]
    assert (
        train.main([*args, "train.resume=auto", *changed, "train.resume_allow_changes=[train.lr,train.batch_size]"])
        == 0
    )
    (record,) = read_metrics(out / "metrics.jsonl", kind="resume")
    assert record["step"] == 2 and record["checkpoint"] == str(out / "checkpoints" / "last.pth")
    assert record["overridden"] == {"train.batch_size": [2, 4], "train.lr": [0.0005, 0.001]}
    assert record["changed"]["train.log_every"] == [1, 2] and record["changed"]["eval.crf_workers"] == [0, 1]
    log = (out / "train.log").read_text()
    assert "resuming with a changed recipe: train.batch_size: 2 -> 4; train.lr: 0.0005 -> 0.001" in log
    final = read_checkpoint(out / "checkpoints" / "last.pth")
    assert final["config"]["train"]["lr"] == 1e-3
    # the data stream continues where it was: 2 steps of 2 images, then 2 steps of 4 (not 4 steps of 4)
    assert final["extra"]["samples_done"] == 2 * 2 + 2 * 4


def test_a_full_disk_during_a_checkpoint_is_one_clear_error(voc_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint (iter_000001 + last) fits, the next does not
            Path(path).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert train.main(_args(voc_root, out, "train.max_iters=3", "train.ckpt_every=1")) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write checkpoint {out / 'checkpoints' / 'iter_000002.pth'}" in err
    assert "free on its file system" in err and "(newest complete checkpoint: " in err and "Traceback" not in err
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 1
    assert not list((out / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.max_iters=0", "train.max_iters must be a positive integer, got 0"),
     ("train.ckpt_every=0", "train.ckpt_every must be a positive integer, got 0"),
     ("data.crop_size=72", "data.crop_size must be a multiple of 2·patch = 16")],
)  # fmt: skip
def test_nonsense_configs_stop_before_anything_runs(voc_root, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert train.main(_args(voc_root, out, override)) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not out.exists()
