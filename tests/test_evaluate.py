"""tools/evaluate.py on hand-made predictions over a hand-made 2-image VOC split with known answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.user_errors import user_error_line
from tools import evaluate as ev
from utils.config import load_config, save_config
from utils.io import save_label_png, save_npz

REPO = Path(__file__).resolve().parent.parent
IDS = ("a", "b")
# 2x4 ground truth; 255 = ignore (the last pixel of "a").
GT = {
    "a": np.array([[0, 0, 1, 1], [0, 0, 1, 255]], dtype=np.uint8),
    "b": np.array([[2, 2, 0, 0], [2, 2, 0, 0]], dtype=np.uint8),
}
SEG = {
    "a": np.array([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=np.uint8),
    "b": np.array([[2, 2, 2, 0], [0, 2, 0, 0]], dtype=np.uint8),
}
# Confusion over the 15 valid pixels (rows GT, columns prediction):
#   a: GT0 -> 0,1,0,0   GT1 -> 1,1,1          b: GT2 -> 2,2,0,2   GT0 -> 2,0,0,0
#   M[0,0]=6 M[0,1]=1 M[0,2]=1 | M[1,1]=3 | M[2,0]=1 M[2,2]=3
#   IoU0 = 6/(6+1+2) = 6/9, IoU1 = 3/(3+1+0) = 3/4, IoU2 = 3/(3+1+1) = 3/5; classes 3..20 have no GT pixel.
SEG_MIOU = (6 / 9 + 3 / 4 + 3 / 5) / 3
SEG_PIXEL_ACC = 12 / 15
PSEUDO = {
    "a": np.array([[0, 255, 1, 1], [0, 0, 255, 255]], dtype=np.uint8),
    "b": np.array([[2, 2, 255, 0], [0, 2, 0, 0]], dtype=np.uint8),
}
# 255 as background: a: GT0 -> 0,0(255),0,0  GT1 -> 1,1,0(255)   b: GT2 -> 2,2,0,2  GT0 -> 0(255),0,0,0
#   M[0,0]=8 | M[1,0]=1 M[1,1]=2 | M[2,0]=1 M[2,2]=3: IoU0 = 8/10, IoU1 = 2/3, IoU2 = 3/4.
PSEUDO_MIOU = (8 / 10 + 2 / 3 + 3 / 4) / 3
# Labelled pixels only (3 of the 15 valid pixels are 255): M[0,0]=6 | M[1,1]=2 | M[2,0]=1 M[2,2]=3
#   IoU0 = 6/7, IoU1 = 2/2, IoU2 = 3/4; coverage = 12/15.
PSEUDO_LABELLED_MIOU = (6 / 7 + 1 + 3 / 4) / 3
PSEUDO_COVERAGE = 12 / 15


def _write_dataset(root: Path) -> None:
    """A minimal VOC2012 layout: JPEGImages, SegmentationClass and the val list."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for name, gt in GT.items():
        Image.fromarray(np.full((*gt.shape, 3), 128, dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        save_label_png(root / "SegmentationClass" / f"{name}.png", gt)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(IDS) + "\n")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder (config.yaml only) whose val split is the 2 hand-made images."""
    root, out = tmp_path / "VOC2012", tmp_path / "run"
    _write_dataset(root)
    cfg = load_config(None, [f"data.root={root}", f"run.out_dir={out}", "data.num_workers=0", "run.device=cpu"])
    save_config(cfg, out)
    return out


def _write_pngs(run: Path, source: str, labels: dict[str, np.ndarray]) -> None:
    for name, label in labels.items():
        save_label_png(run / source / "val" / f"{name}.png", label)


def _write_cams(run: Path, seed: int = 0) -> None:
    """CAMs of classes 1 and 2 for both images, including values exactly at sweep thresholds (0.5, 0.25)."""
    rng = np.random.default_rng(seed)
    for name in IDS:
        cam = rng.uniform(0.0, 1.0, size=(2, 2, 4)).astype(np.float16)
        cam[0, 0, 0], cam[1, 1, 1] = 0.5, 0.25
        save_npz(run / "cams" / "val" / f"{name}.npz",
                 {"classes": np.array([1, 2], dtype=np.int16), "cam": cam, "cam_aux": cam[::-1].copy()})  # fmt: skip


def _evaluate(run: Path, *args: str) -> dict:
    assert ev.main(["--run-dir", str(run), *args]) == 0
    return json.loads((run / "eval" / _json_name(args)).read_text())


def _json_name(args: tuple[str, ...]) -> str:
    source = args[args.index("--source") + 1]
    name = "cams_aux" if "cam_aux" in args else source
    return f"{name}_val" + ("_sweep" if "--sweep" in args else "") + ".json"


def test_seg_miou_and_accuracy_equal_the_hand_computed_values(run):
    _write_pngs(run, "seg", SEG)
    result = _evaluate(run, "--source", "seg")
    assert result["miou"] == pytest.approx(SEG_MIOU)
    assert result["pixel_acc"] == pytest.approx(SEG_PIXEL_ACC)
    assert result["iou"][:3] == pytest.approx([6 / 9, 3 / 4, 3 / 5])
    assert result["iou"][3:] == [None] * 18  # no GT pixel: not averaged into the mIoU
    assert result["present"] == [0, 1, 2]
    assert result["num_images"] == 2 and result["num_pixels"] == 15
    assert result["source"] == "seg" and result["split"] == "val" and result["checkpoint"] is None
    assert result["class_names"][1] == "aeroplane" and len(result["class_names"]) == 21


def test_pseudo_labels_count_unlabelled_as_background_and_report_labelled_miou_and_coverage(run):
    _write_pngs(run, "pseudo_labels", PSEUDO)
    result = _evaluate(run, "--source", "pseudo_labels")
    assert result["miou"] == pytest.approx(PSEUDO_MIOU)
    assert result["labelled_miou"] == pytest.approx(PSEUDO_LABELLED_MIOU)
    assert result["coverage"] == pytest.approx(PSEUDO_COVERAGE)
    assert result["labelled"]["num_pixels"] == 12


def test_random_walk_pseudo_labels_score_like_pseudo_labels_in_their_own_file(run, capsys):
    _write_pngs(run, "pseudo_labels_rw", PSEUDO)
    result = _evaluate(run, "--source", "pseudo_labels_rw")  # reads eval/pseudo_labels_rw_val.json
    assert result["source"] == "pseudo_labels_rw" and result["num_images"] == 2
    assert result["miou"] == pytest.approx(PSEUDO_MIOU)
    assert result["labelled_miou"] == pytest.approx(PSEUDO_LABELLED_MIOU)
    assert result["coverage"] == pytest.approx(PSEUDO_COVERAGE)
    assert not (run / "eval" / "pseudo_labels_val.json").exists()
    (run / "pseudo_labels_rw" / "val" / "b.png").unlink()
    message = _user_error(capsys, run, "--source", "pseudo_labels_rw", "eval.split=val")
    assert f"python -m tools.make_pseudo_labels --run-dir {run} pseudo.refine=[rw] rw.checkpoint=IRN_RUN " \
        "eval.split=val" in message  # fmt: skip


def _user_error(capsys: pytest.CaptureFixture, run: Path, *args: str) -> str:
    """``tools.evaluate`` must fail as a user error (:func:`tests.user_errors.user_error_line`)."""
    return user_error_line(ev.main, ["--run-dir", str(run), *args], capsys)


def test_seg_prediction_with_ignore_value_is_an_error_naming_the_file(run, capsys):
    _write_pngs(run, "seg", PSEUDO)  # 255 is no class: only pseudo labels may leave pixels unlabelled
    assert re.search(r"seg/val/a\.png.*255", _user_error(capsys, run, "--source", "seg"))


def test_out_of_range_class_is_an_error_naming_the_file(run, capsys):
    _write_pngs(run, "seg", {"a": SEG["a"], "b": np.where(SEG["b"] == 2, 30, SEG["b"]).astype(np.uint8)})
    assert re.search(r"seg/val/b\.png.*30", _user_error(capsys, run, "--source", "seg"))


def test_cam_threshold_sweep_equals_separate_single_threshold_runs(run):
    _write_cams(run)
    overrides = ["eval.sweep_start=0.1", "eval.sweep_stop=0.9", "eval.sweep_step=0.2"]
    swept = _evaluate(run, "--source", "cams", "--sweep", *overrides)
    thresholds = [r["threshold"] for r in swept["sweep"]]
    assert thresholds == [0.1, 0.3, 0.5, 0.7, 0.9]
    mious = []
    for threshold in thresholds:
        single = _evaluate(run, "--source", "cams", f"cam.bkg_thre={threshold}")
        assert single["threshold"] == threshold
        mious.append(single["miou"])
    assert [r["miou"] for r in swept["sweep"]] == pytest.approx(mious, abs=1e-12)
    assert len(set(mious)) > 1  # the thresholds matter on this data, so the comparison has teeth
    best = max(range(len(mious)), key=lambda i: mious[i])  # max keeps the first (lowest) of equal maxima
    assert swept["threshold"] == thresholds[best] and swept["miou"] == pytest.approx(mious[best])
    assert (run / "eval" / "cams_val_sweep.png").stat().st_size > 0


def test_sweep_also_writes_the_result_at_the_configured_threshold(run):
    _write_cams(run)
    grid = ["eval.sweep_start=0.1", "eval.sweep_stop=0.9", "eval.sweep_step=0.2"]  # 0.25 is off the grid
    swept = _evaluate(run, "--source", "cams", "--sweep", "cam.bkg_thre=0.25", *grid)
    from_sweep = json.loads((run / "eval" / "cams_val.json").read_text())
    single = _evaluate(run, "--source", "cams", "cam.bkg_thre=0.25")
    assert from_sweep["threshold"] == single["threshold"] == 0.25
    assert from_sweep["miou"] == pytest.approx(single["miou"], abs=1e-12)
    assert 0.25 in [r["threshold"] for r in swept["sweep"]]


def test_cam_aux_branch_is_read_and_named_separately(run):
    _write_cams(run)
    main = _evaluate(run, "--source", "cams", "cam.bkg_thre=0.3")
    aux = _evaluate(run, "--source", "cams", "--cam-key", "cam_aux", "cam.bkg_thre=0.3")
    assert aux["cam_key"] == "cam_aux" and main["cam_key"] == "cam"
    assert (run / "eval" / "cams_val.json").is_file() and (run / "eval" / "cams_aux_val.json").is_file()
    assert aux["miou"] != main["miou"]  # cam_aux holds the class maps swapped, so it scores differently


def test_missing_predictions_error_lists_ids_and_the_command(run, capsys):
    _write_pngs(run, "seg_crf", {"a": SEG["a"]})
    message = _user_error(capsys, run, "--source", "seg_crf")
    assert re.search(r"1 of 2 .*: b\. Produce them with: python -m tools\.infer_seg .*eval\.crf=true", message)


def test_the_union_of_two_shards_is_scored_once_their_files_are_together(run, tmp_path, capsys):
    """run.num_shards=2: each machine wrote ids[i::2] (here a and b) into its own copy of the run folder; evaluate
    lists what is missing until the shards' files are copied together, then scores the whole split."""
    _write_pngs(run, "seg", {"a": SEG["a"]})  # shard 0's output
    other = tmp_path / "machine1"
    _write_pngs(other, "seg", {"b": SEG["b"]})  # shard 1's, on another machine
    message = _user_error(capsys, run, "--source", "seg", "run.num_shards=2")
    assert re.search(r"1 of 2 image\(s\) .*: b\. Produce them .*made in shards, run\.num_shards: every shard", message)
    for path in (other / "seg" / "val").glob("*.png"):  # the merge: a plain copy, the layouts are the same
        shutil.copy(path, run / "seg" / "val")
    for shard_keys in ((), ("run.num_shards=2", "run.shard_index=1")):  # the whole split, whatever the shard keys
        result = _evaluate(run, "--source", "seg", *shard_keys)
        assert result["miou"] == pytest.approx(SEG_MIOU) and result["num_images"] == 2 and result["num_pixels"] == 15


def test_uint8_cam_files_score_as_their_dequantised_values(run):
    """CAM files of either cam.file_dtype: uint8 maps are read as q / 255, so they score exactly like float maps
    holding those values."""
    rng = np.random.default_rng(3)
    quantised = {name: rng.integers(0, 256, size=(2, 2, 4), dtype=np.uint8) for name in IDS}
    classes = np.array([1, 2], dtype=np.int16)
    for name, q in quantised.items():
        save_npz(run / "cams" / "val" / f"{name}.npz", {"classes": classes, "cam": q, "cam_aux": q[::-1].copy()})
    grid = ["eval.sweep_start=0.1", "eval.sweep_stop=0.9", "eval.sweep_step=0.2"]
    from_uint8 = _evaluate(run, "--source", "cams", "--sweep", *grid)
    for name, q in quantised.items():
        values = q.astype(np.float32) / np.float32(255)
        save_npz(run / "cams" / "val" / f"{name}.npz", {"classes": classes, "cam": values, "cam_aux": values[::-1]})
    from_float = _evaluate(run, "--source", "cams", "--sweep", *grid)
    assert [r["miou"] for r in from_uint8["sweep"]] == [r["miou"] for r in from_float["sweep"]]
    assert len({r["miou"] for r in from_uint8["sweep"]}) > 1


def test_wrong_size_prediction_error_names_prediction_and_ground_truth(run, capsys):
    _write_pngs(run, "seg", {"a": SEG["a"], "b": np.zeros((3, 4), dtype=np.uint8)})
    message = _user_error(capsys, run, "--source", "seg")
    assert re.search(r"seg/val/b\.png is 3x4 .*SegmentationClass/b\.png is 2x4", message), message


def test_cam_file_without_the_branch_is_an_error_naming_it(run, capsys):
    save_npz(run / "cams" / "val" / "a.npz", {"classes": np.array([1], dtype=np.int16)})
    save_npz(run / "cams" / "val" / "b.npz", {"classes": np.array([1], dtype=np.int16)})
    message = _user_error(capsys, run, "--source", "cams")
    assert re.search(r"cams/val/a\.npz lacks key\(s\) \['cam', 'cam_aux'\]", message), message


def test_cam_file_with_a_class_beyond_data_num_classes_is_an_error_naming_it(run, capsys):
    _write_cams(run)
    cam = np.zeros((1, 2, 4), dtype=np.float16)
    save_npz(run / "cams" / "val" / "b.npz", {"classes": np.array([21], dtype=np.int16), "cam": cam, "cam_aux": cam})
    for args in ((), ("--sweep",)):
        message = _user_error(capsys, run, "--source", "cams", *args)
        assert re.search(r"cams/val/b\.npz: classes must be .* 1\.\.20 \(data\.num_classes = 21\)", message), message


def test_a_missing_run_folder_and_a_bad_sweep_range_are_one_line_errors(tmp_path, run, capsys):
    assert "is not a run folder" in _user_error(capsys, tmp_path / "missing", "--source", "seg")
    _write_cams(run)
    message = _user_error(capsys, run, "--source", "cams", "--sweep", "eval.sweep_start=0.9", "eval.sweep_stop=0.1")
    assert "eval.sweep_start" in message and "0.9" in message


def test_results_log_gets_one_tagged_line_per_call(run, tmp_path):
    _write_pngs(run, "seg", SEG)
    _write_pngs(run, "pseudo_labels", PSEUDO)
    log = tmp_path / "logs" / "results.jsonl"
    _evaluate(run, "--source", "seg", f"eval.results_log={log}", "--tag", "first")
    _evaluate(run, "--source", "pseudo_labels", f"eval.results_log={log}")  # config key; tag defaults to source
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["tag"] for line in lines] == ["first", "pseudo_labels"]
    assert lines[0]["miou"] == pytest.approx(SEG_MIOU) and lines[0]["source"] == "seg"
    assert lines[1]["coverage"] == pytest.approx(PSEUDO_COVERAGE)
    assert all(line["run"] == str(run) and line["split"] == "val" and "time" in line for line in lines)


def test_the_results_log_is_a_config_key_only(run, tmp_path, capsys):
    # eval.results_log is the one way to name the log: there is no --log flag mirroring it
    with pytest.raises(SystemExit):
        ev.main(["--run-dir", str(run), "--source", "seg", "--log", str(tmp_path / "x.jsonl")])
    assert "unrecognized arguments: --log" in capsys.readouterr().err


def test_sweep_is_rejected_for_other_sources(run):
    with pytest.raises(SystemExit):
        ev.main(["--run-dir", str(run), "--source", "seg", "--sweep"])


def test_sweep_thresholds_are_inclusive_and_free_of_float_drift():
    values = ev.sweep_thresholds(0.05, 0.95, 0.05)
    assert len(values) == 19 and values[0] == 0.05 and values[-1] == 0.95
    assert values[5] == 0.3  # 0.05 + 5 * 0.05 = 0.30000000000000004 before rounding
    assert ev.sweep_thresholds(0.5, 0.5, 0.1) == [0.5]
    with pytest.raises(ValueError, match="sweep_step"):
        ev.sweep_thresholds(0.1, 0.9, 0.0)


@pytest.mark.slow
def test_two_ranks_all_reduce_to_the_single_process_result(run):
    _write_pngs(run, "seg", SEG)
    single = _evaluate(run, "--source", "seg")
    (run / "eval" / "seg_val.json").unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launch, "-m", "tools.evaluate", "--run-dir", str(run), "--source", "seg"]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    sharded = json.loads((run / "eval" / "seg_val.json").read_text())
    assert sharded["miou"] == pytest.approx(SEG_MIOU)
    assert sharded["num_pixels"] == single["num_pixels"] == 15  # each rank scored one image; the sum is complete
