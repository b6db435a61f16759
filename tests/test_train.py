"""tools/train.py end to end on generated data: outputs, exact resume, 2-process DDP, SIGKILL, learning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tools import train
from utils.checkpoint import read_checkpoint
from utils.config import load_config
from utils.logging import read_metrics
from utils.run import resolve_checkpoint

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


def test_disabled_terms_are_not_computed_or_logged(voc_root, tmp_path):
    out = tmp_path / "run"
    args = _args(voc_root, out, "train.max_iters=2", "loss.weight.ctc=0", "loss.weight.smc=0", "loss.weight.mem=0")
    assert train.main(args) == 0
    for record in _train_records(out).values():
        assert {k[5:] for k in record if k.startswith("loss_")} == {"cls", "cls_aux", "ptc", "seg", "reg", "total"}
    state = read_checkpoint(out / "checkpoints" / "last.pth")["model"]
    assert not state["memory.initialized"].any()  # L_mem off: the bank is never filled


def test_resume_continues_bit_for_bit(voc_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(_args(voc_root, straight, "train.max_iters=4", "train.ckpt_every=4")) == 0
    assert train.main(_args(voc_root, resumed, "train.max_iters=4", "train.stop_iter=2", "train.ckpt_every=4")) == 0
    assert read_checkpoint(resumed / "checkpoints" / "last.pth")["step"] == 2  # stop_iter writes a checkpoint
    assert train.main(_args(voc_root, resumed, "train.max_iters=4", "train.ckpt_every=4", "train.resume=auto")) == 0
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
    # (heads_in_use(cfg, 2), the phase of the *next* step, would have scored the untrained decoder).
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


def test_restore_best_reads_the_current_and_the_old_single_best_format():
    fresh = {"cam_miou": {"score": -1.0, "step": -1}, "seg_miou": {"score": -1.0, "step": -1}}
    assert train.restore_best(None) == train.restore_best({}) == fresh
    current = {"cam_miou": {"score": 0.4, "step": 6}, "seg_miou": {"score": 0.3, "step": 8}}
    assert train.restore_best(current) == current
    # old format: the score carries over to its own metric only
    assert train.restore_best({"score": 0.5, "step": 4, "metric": "seg_miou"}) == {
        **fresh, "seg_miou": {"score": 0.5, "step": 4}}  # fmt: skip
    assert train.restore_best({"score": -1.0, "step": -1, "metric": None}) == fresh  # never validated


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
    with caplog.at_level(logging.WARNING, logger="utils.run"):
        assert resolve_checkpoint(_checkpoint_cfg(tmp_path, "best")) == tmp_path / "checkpoints" / expected
    assert "eval.checkpoint=best is deprecated" in caplog.text and expected in caplog.text


def test_deprecated_best_alias_without_checkpoints_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval.checkpoint=best \(deprecated\)"):
        resolve_checkpoint(_checkpoint_cfg(tmp_path, "best"))
