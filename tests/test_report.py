"""tools/report.py: the protocol table and folder gathered from a run's evaluation files, the split routing of
scripts/infer_pipeline.sh (run against a stand-in launcher), and the ablation comparison."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import compare_runs, report
from utils.config import load_config, save_config
from utils.io import atomic_write_json
from utils.outputs import split_name

REPO = Path(__file__).resolve().parent.parent
ORACLE = "GT-tuned threshold, oracle — not a protocol number"


def _run(tmp_path: Path, config: str = "configs/demo.yaml", *overrides: str) -> Path:
    cfg = load_config(config, [f"run.out_dir={tmp_path}", "data.root=/unused", *overrides])
    save_config(cfg, tmp_path)
    return tmp_path


def test_report_takes_cam_stages_from_cam_split_and_seg_from_seg_split(tmp_path):
    run = _run(tmp_path)  # base.yaml: eval.cam_split train, eval.split null -> data.val_split val
    eval_dir = run / "eval"
    atomic_write_json(eval_dir / "cams_train.json", {"miou": 0.61, "num_images": 3})
    atomic_write_json(eval_dir / "cams_train_sweep.json", {"miou": 0.64, "threshold": 0.35})
    atomic_write_json(eval_dir / "pseudo_labels_train.json", {"miou": 0.58, "labelled_miou": 0.7, "coverage": 0.9})
    atomic_write_json(eval_dir / "seg_val.json", {"miou": 0.55, "num_images": 8})
    # the other split's files must not leak into the protocol table
    atomic_write_json(eval_dir / "cams_val.json", {"miou": 0.99})
    atomic_write_json(eval_dir / "seg_train.json", {"miou": 0.98})
    atomic_write_json(run / "cams" / "train" / "settings.json", {"checkpoint": {"path": "checkpoints/last.pth"}})
    atomic_write_json(run / "seg" / "val" / "settings.json", {"checkpoint": {"path": "checkpoints/last.pth"}})
    (run / "metrics.jsonl").write_text(json.dumps({"step": 500, "kind": "train", "seconds": 321.0}) + "\n")
    (run / "seg" / "val_overlays").mkdir(parents=True)
    (run / "seg" / "val_overlays" / "a.png").write_bytes(b"png")
    (eval_dir / "cams_train_sweep.png").write_bytes(b"png")

    assert report.main(["--run-dir", str(run), "--seconds", "555"]) == 0
    results = json.loads((run / "results" / "results.json").read_text())
    assert (results["cam_split"], results["seg_split"]) == ("train", "val")
    assert (results["cam_num_images"], results["seg_num_images"]) == (3, 8)
    assert results["checkpoint"] == "last"
    assert results["cam_checkpoint"] == results["seg_checkpoint"] == "checkpoints/last.pth"
    assert results["cam_miou"] == 0.61 and results["cam_best_miou"] == 0.64 and results["cam_best_threshold"] == 0.35
    assert results["cam_best_note"] == ORACLE
    assert results["pseudo_label_miou"] == 0.58 and results["pseudo_label_labelled_miou"] == 0.7
    assert results["pseudo_label_coverage"] == 0.9
    assert results["seg_miou"] == 0.55
    assert results["cam_aux_miou"] is None and results["seg_crf_miou"] is None  # not evaluated: null, not 0
    assert results["pseudo_label_rw_miou"] is None and "pseudo_label_rw_labelled_miou" not in results
    assert (results["train_iterations"], results["train_seconds"], results["seconds"]) == (500, 321.0, 555.0)

    lines = (run / "results" / "results.md").read_text().splitlines()
    assert lines[0] == ("Protocol (SPEC §8): CAMs and pseudo labels on train (3 images), segmentation on val "
                        "(8 images); weights eval.checkpoint=last (checkpoints/last.pth).")  # fmt: skip
    assert lines[2:4] == ["| stage | split | mIoU (%) |", "|---|---|---|"]
    rows = lines[4:]
    assert rows[0] == "| CAM (multi-scale, bkg threshold 0.25) | train | 61.0 |"
    assert "| aux-CAM (multi-scale, bkg threshold 0.25) | train | not run |" in rows
    assert "| pseudo labels (ignore band counted as background) | train | 58.0 |" in rows
    assert "| pseudo-label coverage (share of pixels labelled) | train | 90.0% |" in rows
    assert "| segmentation head | val | 55.0 |" in rows and "| segmentation head + DenseCRF | val | not run |" in rows
    # the sweep row comes after every protocol row and carries the oracle label
    assert rows[7] == f"| CAM at the sweep's best threshold (0.35): {ORACLE} | train | 64.0 |"
    assert rows[8:] == ["| training: 500 iterations | — | 321 s |", "| whole pipeline, wall time | — | 555 s |"]
    assert not any("RW" in row for row in rows)  # no random walk evaluated: no row for it, not "not run"
    assert (run / "results" / "seg_overlays" / "a.png").is_file()
    assert (run / "results" / "cams_train_sweep.png").is_file()


def test_random_walk_rows_follow_the_pseudo_label_rows_when_evaluated(tmp_path):
    run = _run(tmp_path)
    eval_dir = run / "eval"
    atomic_write_json(eval_dir / "pseudo_labels_train.json", {"miou": 0.58, "labelled_miou": 0.7, "coverage": 0.9})
    atomic_write_json(eval_dir / "pseudo_labels_rw_train.json", {"miou": 0.634, "labelled_miou": 0.634,
                                                                 "coverage": 1.0})  # fmt: skip
    atomic_write_json(eval_dir / "pseudo_labels_rw_val.json", {"miou": 0.99})  # not the CAM split: not read
    results = report.collect(load_config(run / "config.yaml"))
    assert results["pseudo_label_rw_miou"] == 0.634
    assert results["pseudo_label_coverage"] == 0.9  # the plain pseudo labels' coverage, not the walk's
    rows = report.markdown(results).splitlines()[4:]
    coverage = rows.index("| pseudo-label coverage (share of pixels labelled) | train | 90.0% |")
    assert rows[coverage + 1 : coverage + 3] == [
        "| pseudo labels + RW (random walk, IRN boundary network) | train | 63.4 |",
        "| segmentation head | val | not run |",
    ]  # fmt: skip


def test_report_names_a_non_final_checkpoint(tmp_path):
    run = _run(tmp_path, "configs/demo.yaml", "eval.checkpoint=best_seg")
    atomic_write_json(run / "cams" / "train" / "settings.json", {"checkpoint": {"path": "checkpoints/best_seg.pth"}})
    atomic_write_json(run / "seg" / "val" / "settings.json", {"checkpoint": {"path": "checkpoints/last.pth"}})
    results = report.collect(load_config(run / "config.yaml"))
    assert (results["checkpoint"], results["cam_checkpoint"]) == ("best_seg", "checkpoints/best_seg.pth")
    header = report.markdown(results).splitlines()[0]
    assert "eval.checkpoint=best_seg (CAMs checkpoints/best_seg.pth, segmentation checkpoints/last.pth)" in header
    assert header.endswith("not the final checkpoint that SPEC §8 reports.")


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("configs/voc.yaml", [], ("train", "val")),  # SPEC §8: CAMs on VOC train, segmentation on val
        ("configs/coco.yaml", [], ("val", "val")),  # the full val2014 for both, not val_part
        ("configs/voc.yaml", ["eval.split=train"], ("train", "train")),  # eval.split moves segmentation only
        ("configs/voc.yaml", ["eval.cam_split=val"], ("val", "val")),
        ("configs/voc.yaml", ["eval.cam_split=null", "eval.split=test"], ("test", "test")),  # null follows eval.split
    ],
)
def test_protocol_splits(config, overrides, expected):
    cfg = load_config(config, ["run.out_dir=/unused", "data.root=/unused", *overrides])
    assert report.protocol_splits(cfg) == expected
    assert report.seg_split(cfg) == split_name(cfg)  # report's copy of the rule agrees with utils.outputs


FAKE_LAUNCH = """#!/usr/bin/env bash
# stands in for scripts/launch.sh: records each stage's command line, one per line
printf '%s\\n' "$*" >> "$(dirname "$0")/calls.log"
"""


def _last_split(call: str) -> str:
    """The ``eval.split`` a tool sees: the last one on its command line wins (utils.config)."""
    return [word.split("=", 1)[1] for word in call.split() if word.startswith("eval.split=")][-1]


def _pipeline(tmp_path: Path, run: Path, *overrides: str) -> tuple[list[str], str]:
    """Run scripts/infer_pipeline.sh on ``run`` against the stand-in launcher: (the stages' command lines, stdout)."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(REPO / "scripts" / "infer_pipeline.sh", scripts)
    (scripts / "launch.sh").write_text(FAKE_LAUNCH)
    (scripts / "launch.sh").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = ["bash", str(scripts / "infer_pipeline.sh"), str(run), "data.num_workers=0", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (scripts / "calls.log").read_text().splitlines(), result.stdout


def _stages(calls: list[str], run: Path) -> list[str]:
    """Each call without its --run-dir and key=value arguments: the tool and its options."""
    return [" ".join(word for word in call.split() if not word.startswith(("--run-dir", str(run))) and "=" not in word)
            for call in calls]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "cam_split", "seg_split"),
    [([], "train", "val"), (["eval.split=train", "eval.cam_split=val"], "val", "train")],
)
def test_pipeline_scores_cam_stages_on_cam_split_and_seg_stages_on_eval_split(tmp_path, overrides, cam_split,
                                                                                seg_split):  # fmt: skip
    run = _run(tmp_path / "run", "configs/voc.yaml")
    calls, stdout = _pipeline(tmp_path, run, *overrides)
    assert _stages(calls, run) == [
        "tools.make_cam", "tools.evaluate --source cams --sweep", "tools.evaluate --source cams --cam-key cam_aux",
        "tools.make_pseudo_labels", "tools.evaluate --source pseudo_labels", "tools.infer_seg",
        "tools.evaluate --source seg", "tools.evaluate --source seg_crf",
    ]  # fmt: skip
    assert [_last_split(call) for call in calls] == [cam_split] * 5 + [seg_split] * 3
    assert all(f"--run-dir {run}" in call and "data.num_workers=0" in call for call in calls)  # overrides reach all
    assert "eval.crf=true" in calls[5]
    assert not any("pseudo.refine" in call for call in calls)  # no boundary network: no random walk
    # the protocol table closes the run, with each row's split and the sweep labelled as an oracle
    assert f"| segmentation head + DenseCRF | {seg_split} | not run |" in stdout
    assert f"| CAM (multi-scale, bkg threshold 0.5) | {cam_split} | not run |" in stdout
    assert f"{ORACLE} | {cam_split} |" in stdout
    assert f"threshold sweep on {cam_split}: {ORACLE}" in stdout


@pytest.mark.parametrize("given", [False, True])
def test_pipeline_adds_random_walk_pseudo_labels_with_a_boundary_network(tmp_path, given):
    """A boundary network trained into RUN/irn (or one given as rw.checkpoint=...) adds the random-walk pseudo labels
    and their score after the plain ones, on the CAM split; a sharded run only produces them."""
    run = _run(tmp_path / "run", "configs/voc.yaml")
    if given:
        network, overrides = str(tmp_path / "elsewhere" / "irn"), [f"rw.checkpoint={tmp_path / 'elsewhere' / 'irn'}"]
    else:
        network, overrides = str(run / "irn" / "checkpoints" / "last.pth"), []
        (run / "irn" / "checkpoints").mkdir(parents=True)
        (run / "irn" / "checkpoints" / "last.pth").write_bytes(b"weights")
    calls, stdout = _pipeline(tmp_path, run, *overrides)
    stages = _stages(calls, run)
    assert stages[3:7] == ["tools.make_pseudo_labels", "tools.evaluate --source pseudo_labels",
                           "tools.make_pseudo_labels", "tools.evaluate --source pseudo_labels_rw"]  # fmt: skip
    walk = calls[5].split()
    assert "pseudo.refine=[rw]" not in calls[3] and walk[-3:] == ["pseudo.refine=[rw]", "pseudo.folder=null",
                                                                  f"rw.checkpoint={network}"]  # fmt: skip
    assert [_last_split(call) for call in calls[3:7]] == ["train"] * 4
    assert f"random-walk pseudo labels on train (boundary network rw.checkpoint={network})" in stdout

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    calls, _ = _pipeline(sharded, run, *overrides, "run.num_shards=2", "run.shard_index=0")
    assert _stages(calls, run) == ["tools.make_cam", "tools.make_pseudo_labels", "tools.make_pseudo_labels",
                                   "tools.infer_seg"]  # fmt: skip
    assert calls[2].split()[-1] == f"rw.checkpoint={network}" and "pseudo.refine=[rw]" in calls[2]


def test_shell_entry_points_parse():
    for script in ("scripts/infer_pipeline.sh", "scripts/ablate.sh", "infer_run_VOC.sh", "infer_run_COCO.sh"):
        assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0, script


def test_compare_scores_cams_on_both_splits_and_marks_untrained_seg_heads(tmp_path):
    runs = []
    for name, seg_weight, miou in (("baseline", 0.0, 0.5), ("full", 0.1, 0.6)):
        run = _run(tmp_path / name, "configs/demo.yaml", f"loss.weight.seg={seg_weight}")
        atomic_write_json(run / "eval" / "cams_train.json", {"miou": miou})
        atomic_write_json(run / "eval" / "cams_val.json", {"miou": miou + 0.1})
        atomic_write_json(run / "eval" / "cams_val_sweep.json", {"miou": miou + 0.2, "threshold": 0.3})
        atomic_write_json(run / "eval" / "seg_val.json", {"miou": 0.01})
        runs.append(run)
    out = tmp_path / "table.md"
    assert report.main(["--compare", *map(str, runs), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == (
        "| run | CAM (train) | aux-CAM (train) | CAM, GT-tuned threshold (train) | CAM (val) | aux-CAM (val) "
        "| CAM, GT-tuned threshold (val) | segmentation (val) | training time |"
    )
    assert lines[2] == "| baseline | 50.0 | n/a | n/a | 60.0 | n/a | 70.0 | no seg head | n/a |"
    assert lines[3] == "| full | 60.0 | n/a | n/a | 70.0 | n/a | 80.0 | 1.0 | n/a |"
    assert ORACLE in lines[-1]


def test_a_torn_eval_file_is_a_one_line_error_naming_it(tmp_path, capsys):
    run = _run(tmp_path)
    (run / "eval").mkdir()
    (run / "eval" / "seg_val.json").write_text('{"miou": 0.5')  # a run killed before the atomic writer existed
    capsys.readouterr()
    assert report.main(["--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'eval' / 'seg_val.json'} is not valid JSON") and len(err.splitlines()) == 1


CLASSES = ["background", "cow", "sofa"]
# per-class IoUs as tools.evaluate writes them (None: the class is in neither the masks nor the predictions)
PER_CLASS = {
    "cams_train.json": [0.9, 0.42, 0.18],
    "pseudo_labels_train.json": [0.8, 0.22, None],
    "pseudo_labels_rw_train.json": [0.85, 0.3, 0.05],
    "seg_val.json": [0.95, 0.0, 0.0],
    "seg_crf_val.json": [0.96, 0.0, 0.01],
}


def _per_class_run(tmp_path: Path) -> Path:
    run = _run(tmp_path)
    for name, iou in PER_CLASS.items():
        values = [v for v in iou if v is not None]
        atomic_write_json(run / "eval" / name, {"miou": sum(values) / len(values), "iou": iou, "class_names": CLASSES,
                                                "num_images": 3 if "train" in name else 8})  # fmt: skip
    # the other split's files are not charted
    atomic_write_json(run / "eval" / "cams_val.json", {"miou": 0.5, "iou": [0.5] * 3, "class_names": CLASSES})
    return run


def test_per_class_chart_plots_the_eval_files_values_and_is_written_next_to_the_report(tmp_path):
    run = _per_class_run(tmp_path)
    names, stages = report.per_class_iou(run, "train", "val")
    assert names == CLASSES
    assert list(stages) == ["CAM", "pseudo labels", "pseudo labels + RW", "seg head", "seg head + DenseCRF"]
    for (stem, _, group), stage in zip(report.PER_CLASS_STAGES, stages.values(), strict=True):
        split = "train" if group == "cam" else "val"
        assert stage["split"] == split and stage["iou"] == PER_CLASS[stem.format(split=split)]

    assert report.main(["--run-dir", str(run)]) == 0
    png = run / "results" / report.PER_CLASS_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == [
        "per_class_iou.json", "per_class_iou.png", "results.json", "results.md"
    ]  # fmt: skip
    drawn = json.loads((run / "results" / report.PER_CLASS_JSON).read_text())
    assert drawn["class_names"] == CLASSES
    assert [stage["iou"] for stage in drawn["stages"].values()] == list(PER_CLASS.values())

    # what is drawn: one bar per class and stage with the eval file's IoU, legend = stage (split, mIoU)
    results = json.loads((run / "results" / "results.json").read_text())
    figure = report.per_class_figure(results)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "CAM (train, mIoU 50.0)", "pseudo labels (train, mIoU 51.0)", "pseudo labels + RW (train, mIoU 40.0)",
        "seg head (val, mIoU 31.7)",
        "seg head + DenseCRF (val, mIoU 32.3)",
    ]  # fmt: skip
    for container, iou in zip(axes.containers, PER_CLASS.values(), strict=True):
        heights = [bar.get_height() for bar in container.patches]
        assert heights == pytest.approx([float("nan") if v is None else v for v in iou], nan_ok=True)
    assert axes.get_ylabel() == "IoU" and axes.get_ylim() == (0.0, 1.0)
    assert figure.get_suptitle() == (
        f"Per-class IoU, run {run}\nCAM and pseudo labels on train (3 images), segmentation on val (8 images); "
        "weights eval.checkpoint=last"
    )


def test_per_class_chart_skips_missing_stages_and_refuses_mismatched_classes(tmp_path, capsys):
    run = _per_class_run(tmp_path)
    (run / "eval" / "seg_crf_val.json").unlink()
    (run / "eval" / "pseudo_labels_rw_train.json").unlink()
    assert list(report.per_class_iou(run, "train", "val")[1]) == ["CAM", "pseudo labels", "seg head"]
    assert report.per_class_iou(run, "test", "test") == ([], {})  # nothing evaluated there: no chart
    atomic_write_json(run / "eval" / "seg_val.json", {"miou": 0.5, "iou": [0.5, 0.5], "class_names": ["a", "b"]})
    capsys.readouterr()
    assert report.main(["--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {run / 'eval' / 'seg_val.json'} names other classes than the other eval files of {run}; " \
        "rerun tools.evaluate\n"  # fmt: skip


def _seed_run(root: Path, name: str, seed: int, cam: float | None, seconds: float | None = None,
              *overrides: str) -> Path:  # fmt: skip
    """A fabricated run of scripts/ablate.sh with SEEDS set: ``root/<name>/seed<k>``, its CAM scored on train."""
    run = _run(root / name / f"seed{seed}", "configs/demo.yaml", f"run.seed={seed}", *overrides)
    if cam is not None:
        atomic_write_json(run / "eval" / "cams_train.json", {"miou": cam})
        atomic_write_json(run / "eval" / "cams_val.json", {"miou": cam + 0.1})
        atomic_write_json(run / "eval" / "seg_val.json", {"miou": cam - 0.2})
    if seconds is not None:
        (run / "metrics.jsonl").write_text(json.dumps({"step": 650, "kind": "train", "seconds": seconds}) + "\n")
    return run


def test_compare_averages_the_seeds_of_each_config_and_lists_every_run(tmp_path):
    base = tmp_path / "ablations" / "base"
    runs = [_seed_run(base, "full", seed, cam, seconds) for seed, cam, seconds in
            ((0, 0.60, 400.0), (1, 0.62, 420.0), (2, 0.64, None))]  # fmt: skip
    runs += [_seed_run(base, "baseline", seed, cam, None, "loss.weight.seg=0") for seed, cam in ((0, 0.5), (1, 0.6))]
    runs += [_seed_run(base, "toco", 3, 0.7), _seed_run(base, "toco", 4, None)]  # seed 4 not evaluated yet
    assert compare_runs.group_runs(runs) == {"full": runs[:3], "baseline": runs[3:5], "toco": runs[5:]}
    out = tmp_path / "table.md"
    assert report.main(["--compare", *map(str, runs), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    columns = ("CAM (train) | aux-CAM (train) | CAM, GT-tuned threshold (train) | CAM (val) | aux-CAM (val) "
               "| CAM, GT-tuned threshold (val) | segmentation (val)")  # fmt: skip
    assert lines[0] == f"| config | n | {columns} | training time |"
    assert lines[1] == "|---" * 10 + "|"
    # sample std: 0.60 / 0.62 / 0.64 -> 62.0 ± 2.0; two training times of three -> (n=2)
    assert lines[2] == "| full | 3 | 62.0 ± 2.0 | n/a | n/a | 72.0 ± 2.0 | n/a | n/a | 42.0 ± 2.0 | 410 ± 14 s (n=2) |"
    assert lines[3] == "| baseline | 2 | 55.0 ± 7.1 | n/a | n/a | 65.0 ± 7.1 | n/a | n/a | no seg head | n/a |"
    assert lines[4] == "| toco | 2 | 70.0 (n=1) | n/a | n/a | 80.0 (n=1) | n/a | n/a | 50.0 (n=1) | n/a |"
    assert lines[5] == ""
    assert lines[6].startswith("Mean ± sample standard deviation over the n runs of each config") and ORACLE in lines[6]
    assert lines[8:10] == ["Per run:", ""]
    assert lines[10] == f"| config | seed | run | {columns} | training time |"
    assert lines[12:] == [
        f"| full | 0 | {runs[0]} | 60.0 | n/a | n/a | 70.0 | n/a | n/a | 40.0 | 400 s |",
        f"| full | 1 | {runs[1]} | 62.0 | n/a | n/a | 72.0 | n/a | n/a | 42.0 | 420 s |",
        f"| full | 2 | {runs[2]} | 64.0 | n/a | n/a | 74.0 | n/a | n/a | 44.0 | n/a |",
        f"| baseline | 0 | {runs[3]} | 50.0 | n/a | n/a | 60.0 | n/a | n/a | no seg head | n/a |",
        f"| baseline | 1 | {runs[4]} | 60.0 | n/a | n/a | 70.0 | n/a | n/a | no seg head | n/a |",
        f"| toco | 3 | {runs[5]} | 70.0 | n/a | n/a | 80.0 | n/a | n/a | 50.0 | n/a |",
        f"| toco | 4 | {runs[6]} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |",
    ]  # fmt: skip


def test_compare_keeps_one_row_per_run_when_every_config_has_one_run(tmp_path, capsys):
    """One seed per config: the table of one row per run (that of single runs), named by config, not 'seed0'; the
    same name in two families is told apart by the family folder."""
    runs = [_seed_run(tmp_path / family, "full", 0, cam) for family, cam in (("base", 0.6), ("heldout", 0.4))]
    runs.append(_seed_run(tmp_path / "base", "toco", 0, 0.5))
    assert report.main(["--compare", *map(str, runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | CAM (train) |")
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| base/full", "| heldout/full", "| toco"]
    assert lines[2] == "| base/full | 60.0 | n/a | n/a | 70.0 | n/a | n/a | 40.0 | n/a |"
    assert lines[5:] == ["", compare_runs.COMPARE_NOTE]

    # the output for plain run folders is that of before seeds, to the byte
    plain = []
    for name, cam in (("baseline", 0.5), ("full", 0.6)):
        run = _run(tmp_path / "plain" / name, "configs/demo.yaml")
        atomic_write_json(run / "eval" / "cams_train.json", {"miou": cam})
        plain.append(run)
    (plain[1] / "metrics.jsonl").write_text(json.dumps({"step": 650, "kind": "train", "seconds": 451.4}) + "\n")
    header = ("| run | CAM (train) | aux-CAM (train) | CAM, GT-tuned threshold (train) | CAM (val) | aux-CAM (val) "
              "| CAM, GT-tuned threshold (val) | segmentation (val) | training time |")  # fmt: skip
    assert compare_runs.compare(plain) == "\n".join([
        header, "|---" * 9 + "|",
        "| baseline | 50.0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |",
        "| full | 60.0 | n/a | n/a | n/a | n/a | n/a | n/a | 451 s |",
        "",
        f'mIoU in %; CAM and aux-CAM at cam.bkg_thre; "CAM, GT-tuned threshold" = the sweep\'s best ({ORACLE}).',
    ]) + "\n"  # fmt: skip


def test_compare_refuses_a_seed_twice_and_notes_runs_that_differ_in_more_than_the_seed(tmp_path, capsys):
    root = tmp_path / "heldout"
    first = _seed_run(root, "full", 0, 0.6)
    capsys.readouterr()
    assert report.main(["--compare", str(first), str(first)]) == 2
    assert capsys.readouterr().err == f"error: {first} is given twice to --compare; give each run once\n"
    twin = _seed_run(root, "full", 5, 0.6, None, "run.seed=0")  # trained by hand without its seed
    assert report.main(["--compare", str(first), str(twin)]) == 2
    assert capsys.readouterr().err == (f"error: {first} and {twin} are both run.seed=0 of config full: not two seeds; "
                                       "compare each once, or retrain one with another run.seed\n")  # fmt: skip
    shutil.rmtree(twin)

    # run-time keys may differ (workers, validation interval); the recipe and the data may not, and a folder that
    # names another seed than its run recorded is noted
    other = _seed_run(root, "full", 1, 0.62, None, "data.num_workers=0", "train.eval_every=25", "loss.weight.seg=0.2",
                      "data.root=/elsewhere")  # fmt: skip
    stray = _run(root / "full" / "seed7", "configs/demo.yaml", "run.seed=2")
    table = compare_runs.compare([first, other, stray])
    notes = table.splitlines()[-2:]
    assert notes[0] == f"note: {stray} records run.seed=2, not the 7 of its folder name."
    assert notes[1] == (f"note: {other} differs from {first} (both averaged in full): "
                        "data.root: '/unused' -> '/elsewhere'; loss.weight.seg: 0.1 -> 0.2.")  # fmt: skip
    assert "| full | 3 | 61.0 ± 1.4 (n=2) |" in table  # still averaged (the stray one has no CAM): a note, no error


def _val(run: Path, records: list[tuple[int, float, float, float]], train_seconds: float | None = None) -> None:
    """Append validation records (step, cam, cam_aux, seg) to the run's metrics.jsonl, as the trainer logs them."""
    lines = [json.dumps({"step": 1, "kind": "setup", "world_size": 2})]
    lines += [json.dumps({"step": step, "kind": "val", "cam_miou": cam, "cam_aux_miou": aux, "seg_miou": seg})
              for step, cam, aux, seg in records]  # fmt: skip
    if train_seconds is not None:
        lines.append(json.dumps({"step": 650, "kind": "train", "seconds": train_seconds}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n".join(lines) + "\n")


def test_curves_draw_each_seed_thin_and_each_configs_mean_thick(tmp_path, capsys):
    base = tmp_path / "base"
    full = [_seed_run(base, "full", seed, 0.6) for seed in range(3)]
    for seed, run in enumerate(full):
        _val(run, [(50, 0.30 + 0.01 * seed, 0.32, 0.10), (100, 0.50 + 0.01 * seed, 0.52, 0.20)])
    _val(full[2], [(100, 0.53, 0.52, 0.20), (150, 0.60, 0.61, 0.30)])  # resumed: step 100 again (the last counts)
    baseline = [_seed_run(base, "baseline", seed, 0.5, None, "loss.weight.seg=0") for seed in range(2)]
    _val(baseline[0], [(50, 0.2, 0.25, 0.0), (100, 0.4, 0.45, 0.0)])  # its other seed did not validate
    toco = _seed_run(base, "toco", 0, 0.5)
    _val(toco, [])  # a metrics.jsonl without validation records (train.eval_every=0)
    runs = [*full, *baseline, toco]

    figure, summary = compare_runs.curves_figure(runs)
    assert summary["configs"] == {"full": list(map(str, full)), "baseline": [str(baseline[0])]}
    assert summary["skipped"] == [str(baseline[1]), str(toco)]
    # full: 3 thin + 1 thick in every panel; baseline: its one seed thick only, and no seg curve (no seg head)
    assert summary["lines"] == {"cam_miou": {"seeds": 3, "means": 2}, "cam_aux_miou": {"seeds": 3, "means": 2},
                                "seg_miou": {"seeds": 3, "means": 1}}  # fmt: skip
    cam, aux, seg = figure.axes
    assert [axes.get_title() for axes in figure.axes] == [
        "CAM", "aux-CAM", "segmentation head (loss.weight.seg > 0)"
    ]  # fmt: skip
    assert [axes.get_xlabel() for axes in figure.axes] == ["iteration"] * 3
    assert cam.get_ylabel() == "validation mIoU (%)"
    assert [line.get_label() for line in cam.get_lines()] == [
        "_full seed 0", "_full seed 1", "_full seed 2", "full (n=3)", "baseline (n=1)"
    ]  # fmt: skip
    assert len(seg.get_lines()) == 4 and len(aux.get_lines()) == 5
    thin, thick = cam.get_lines()[2], cam.get_lines()[3]
    assert list(thin.get_xdata()) == [50, 100, 150] and list(thin.get_ydata()) == pytest.approx([32.0, 53.0, 60.0])
    # the mean at the steps every seed validated: 150 only seed 2 reached
    assert list(thick.get_xdata()) == [50, 100] and list(thick.get_ydata()) == pytest.approx([31.0, 51.333333])
    assert thick.get_linewidth() > thin.get_linewidth() and thick.get_color() == thin.get_color()
    assert cam.get_lines()[4].get_color() != thick.get_color()  # one colour per config
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["full (n=3)", "baseline (n=1)"]
    assert figure.get_suptitle().startswith("Validation during training on data.val_split (val)")
    assert figure.get_supxlabel() == f"not plotted, no validation records (train.eval_every=0?): {baseline[1]}, {toco}"

    png = tmp_path / "curves.png"
    capsys.readouterr()
    assert report.main(["--compare", *map(str, runs), "--curves", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"curves: wrote {png} (4 runs of 2 configs); no validation records (train.eval_every=0?), not plotted: "
        f"{baseline[1]}, {toco}"
    )


def test_curves_without_any_validation_record_write_nothing(tmp_path, capsys):
    runs = [_seed_run(tmp_path, "full", seed, 0.6) for seed in range(2)]
    png = tmp_path / "curves.png"
    assert report.main(["--compare", *map(str, runs), "--curves", str(png)]) == 0
    assert not png.exists()
    assert capsys.readouterr().out.splitlines()[-1] == (
        "curves: nothing drawn, no run has validation records; no validation records (train.eval_every=0?), not "
        f"plotted: {runs[0]}, {runs[1]}"
    )
    with pytest.raises(SystemExit):
        report.main(["--curves", str(png), "--run-dir", str(runs[0])])  # --curves belongs to --compare


FAKE_TRAIN = """#!/usr/bin/env bash
# stands in for train_run_VOC.sh: records its command line and writes the run's config.yaml, as training would
printf '%s\\n' "$*" >> "$(dirname "$0")/train.log"
python - "$@" <<'PY'
import sys
from utils.config import load_config, save_config
args = sys.argv[1:]
files = ["configs/voc.yaml"] + [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]
cfg = load_config(files, [arg for arg in args if "=" in arg])
save_config(cfg, cfg.run.out_dir)
PY
"""


def _ablate(root: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    """Run scripts/ablate.sh in ``root`` against stand-ins for training and the launcher (no model is trained)."""
    if not (root / "scripts").is_dir():
        (root / "scripts").mkdir(parents=True)
        shutil.copy(REPO / "scripts" / "ablate.sh", root / "scripts")
        shutil.copytree(REPO / "configs", root / "configs")
        for path, text in ((root / "scripts" / "launch.sh", FAKE_LAUNCH), (root / "train_run_VOC.sh", FAKE_TRAIN)):
            path.write_text(text)
            path.chmod(0o755)
        data = root / "data" / "synthetic_voc"
        (data / "ImageSets" / "Segmentation").mkdir(parents=True)
        (data / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
        (data / "synthetic.json").write_text('{"layout": "voc", "seed": 0}\n')  # from before families: base
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "NGPUS": "1", **env}  # fmt: skip
    for name in ("SEEDS", "FAMILY", "EVAL_EVERY", "ABLATIONS"):
        if env.get(name) is None:
            env.pop(name, None)
    command = ["bash", str(root / "scripts" / "ablate.sh"), *overrides]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_ablate_trains_each_config_per_seed_into_family_folders_and_groups_the_table(tmp_path):
    result = _ablate(tmp_path, {"SEEDS": "0 1", "EVAL_EVERY": "25", "ABLATIONS": "full baseline"}, "data.num_workers=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trains = (tmp_path / "train.log").read_text().splitlines()
    outs = [f"runs/ablations/base/{name}/seed{seed}" for name in ("full", "baseline") for seed in (0, 1)]
    assert [call.split()[1] for call in trains] == ["configs/ablations/full.yaml"] * 2 + [
        "configs/ablations/baseline.yaml"] * 2  # fmt: skip
    for call, out, seed in zip(trains, outs, (0, 1, 0, 1), strict=True):
        words = call.split()
        assert words[2:] == ["data.root=data/synthetic_voc", f"run.out_dir={out}", "train.resume=auto",
                             "train.eval_every=25", "data.num_workers=0", f"run.seed={seed}"]  # fmt: skip
    calls = (tmp_path / "scripts" / "calls.log").read_text().splitlines()
    run_dirs = [words[words.index("--run-dir") + 1] for words in map(str.split, calls)]
    assert run_dirs == [out for out in outs for _ in range(8)]  # 3 CAM stages on each of 2 splits, then seg
    table = (tmp_path / "runs" / "ablations" / "base" / "ablations.md").read_text().splitlines()
    assert table[0].startswith("| config | n | CAM (train) |")
    assert [row.split(" | ")[:2] for row in table[2:4]] == [["| full", "2"], ["| baseline", "2"]]
    assert "per run:" in "\n".join(table).lower()
    assert result.stdout.splitlines()[-1].startswith("curves: nothing drawn, no run has validation records")

    # SEEDS unset (and the base family): the layout from before seeds, no run.seed, the one-row-per-run table
    (tmp_path / "train.log").unlink()
    result = _ablate(tmp_path, {"ABLATIONS": "full"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "train.log").read_text().split()[2:] == [
        "data.root=data/synthetic_voc", "run.out_dir=runs/ablations/full", "train.resume=auto"]  # fmt: skip
    table = (tmp_path / "runs" / "ablations" / "ablations.md").read_text().splitlines()
    assert table[0].startswith("| run | CAM (train) |") and table[2].startswith("| full | ")
    assert "curves" not in result.stdout

    # the family must match the data it is given; SEEDS owns run.seed
    result = _ablate(tmp_path, {"FAMILY": "heldout"}, "data.root=data/synthetic_voc")
    assert result.returncode == 2
    assert "data/synthetic_voc holds the base family, not FAMILY=heldout" in result.stderr
    result = _ablate(tmp_path, {"SEEDS": "0"}, "run.seed=3")
    assert result.returncode == 2 and "SEEDS sets run.seed; drop run.seed=3" in result.stderr
    result = _ablate(tmp_path, {"SEEDS": "0 x"})
    assert result.returncode == 2 and "SEEDS must hold integers, not 'x'" in result.stderr
