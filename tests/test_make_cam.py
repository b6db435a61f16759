"""Tests for tools/make_cam.py on a 2-iteration smoke run (SPEC §2.1, §4.5, §5.1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cam import multiscale_cam, normalise_per_class
from core.camfile import read_cams
from datasets import build_dataset
from models import fuse_similarity, load_trained_model
from tests.user_errors import user_error_line
from tools import make_cam, train
from utils.checkpoint import CheckpointError
from utils.config import load_run_config
from utils.io import load_npz

REPO = Path(__file__).resolve().parent.parent
# float16 keeps 11 significant bits: a value in [0.5, 1] is stored within 2^-11 ≈ 4.9e-4 (half an ulp of 2^-10).
FP16_TOL = 2.0**-11


@pytest.fixture(scope="module")
def run(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-iteration smoke run with its val CAMs exported once."""
    out = tmp_path_factory.mktemp("cam_run")
    assert train.main(["--config", "configs/smoke.yaml", f"data.root={voc_root}", f"run.out_dir={out}",
                       "train.max_iters=2"]) == 0  # fmt: skip
    assert make_cam.main(["--run-dir", str(out)]) == 0
    return out


def _val(run: Path):
    cfg = load_run_config(run)
    return cfg, build_dataset(cfg, "val", "eval")


def test_every_val_image_has_its_classes_and_float16_maps(run: Path) -> None:
    _, dataset = _val(run)
    folder = run / "cams" / "val"
    assert sorted(p.stem for p in folder.glob("*.npz")) == sorted(dataset.ids)
    for index, name in enumerate(dataset.ids):
        item = dataset[index]
        raw = load_npz(folder / f"{name}.npz")
        assert raw["classes"].dtype == np.int16
        assert raw["cam"].dtype == raw["cam_aux"].dtype == np.float16
        cams = read_cams(folder / f"{name}.npz")
        classes, cam, cam_aux = cams.classes, cams.cam, cams.cam_aux
        assert classes.tolist() == (torch.nonzero(item["label"]).flatten() + 1).tolist()
        assert cam.shape == cam_aux.shape == (len(classes), *item["img"].shape[-2:])
        for maps in (cam, cam_aux):
            assert maps.min() >= 0.0 and maps.max() <= 1.0
            # §2.1 max-normalisation: every present class peaks at ~1 (max / (max + 1e-5), rounded to float16)
            np.testing.assert_allclose(maps.reshape(len(classes), -1).max(1), 1.0, atol=FP16_TOL)


def test_maps_equal_multiscale_cam_computed_directly(run: Path) -> None:
    cfg, dataset = _val(run)
    model = load_trained_model(cfg, torch.device("cpu"))
    index = 1
    item = dataset[index]
    x = model.normalize(item["img"][None])
    cam, cam_aux = multiscale_cam(model, x, tuple(cfg.cam.scales), int(cfg.cam.max_batch))
    present = torch.nonzero(item["label"]).flatten()
    cams = read_cams(run / "cams" / "val" / f"{dataset.ids[index]}.npz")
    classes, saved, saved_aux = cams.classes, cams.cam, cams.cam_aux
    assert classes.tolist() == (present + 1).tolist()
    np.testing.assert_allclose(saved, cam[0, present].numpy(), atol=FP16_TOL, rtol=0)
    np.testing.assert_allclose(saved_aux, cam_aux[0, present].numpy(), atol=FP16_TOL, rtol=0)


def test_second_run_does_no_work(run: Path) -> None:
    folder = run / "cams" / "val"
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    summary = make_cam.export_cams(load_run_config(run))
    assert summary["processed"] == 0 and summary["skipped"] == summary["total"] == len(mtimes)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")} == mtimes
    log = (run / "make_cam.log").read_text()
    assert f"0 processed, {len(mtimes)} already done (skipped)" in log


def _user_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the tool's main on ``argv``; it must fail as a user error (:func:`tests.user_errors.user_error_line`)."""
    return user_error_line(make_cam.main, argv, capsys)


def test_changed_settings_are_refused(run: Path, capsys: pytest.CaptureFixture) -> None:
    message = _user_error(capsys, ["--run-dir", str(run), "cam.scales=[1.0]"])
    assert re.search(r"cams/val holds outputs made with other settings \(scales", message), message


def test_outputs_of_a_rewritten_checkpoint_are_not_resumed(run: Path, tmp_path: Path, capsys) -> None:
    """Retraining into the same run folder rewrites best/last.pth: the old CAMs must not pass as current."""
    copy = tmp_path / "retrained"
    shutil.copytree(run, copy)
    (copy / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(run), str(copy)))
    assert make_cam.main(["--run-dir", str(copy)]) == 0  # same checkpoint file: resumes, nothing to do
    checkpoint = copy / "checkpoints" / "last.pth"
    checkpoint.write_bytes(checkpoint.read_bytes())  # a new training run wrote it again
    assert "other settings (checkpoint" in _user_error(capsys, ["--run-dir", str(copy)])


def _fresh_copy(run: Path, dest: Path) -> Path:
    """The trained run folder without its CAMs."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("cams"))
    (dest / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(run), str(dest)))
    return dest


def test_a_run_that_failed_before_its_first_output_does_not_block_the_corrected_rerun(run, tmp_path, capsys):
    """Issue #10 item 6: settings.json is recorded before the checkpoint loads; a failed load must not poison it."""
    copy = _fresh_copy(run, tmp_path / "run")
    folder = copy / "cams" / "val"
    garbage = copy / "checkpoints" / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        make_cam.export_cams(load_run_config(copy, [f"eval.checkpoint={garbage}"]))
    recorded = json.loads((folder / "settings.json").read_text())
    assert recorded["checkpoint"]["path"] == "checkpoints/garbage.pth" and not list(folder.glob("*.npz"))
    # the corrected rerun (another checkpoint, so other settings) re-claims the empty folder
    assert make_cam.main(["--run-dir", str(copy)]) == 0
    assert json.loads((folder / "settings.json").read_text())["checkpoint"]["path"] == "checkpoints/last.pth"
    assert len(list(folder.glob("*.npz"))) == len(_val(run)[1].ids)
    assert "re-claimed with the current settings (checkpoint:" in (copy / "make_cam.log").read_text()
    # a folder that holds outputs is still refused
    message = _user_error(capsys, ["--run-dir", str(copy), "cam.scales=[1.0]"])
    assert "holds outputs made with other settings (scales" in message


DYING_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    import utils.io
    from tools import make_cam

    real_write, calls = utils.io.atomic_write_bytes, []

    def write_then_die(path, data):
        if str(path).endswith(".npz"):
            calls.append(path)
        # the second CAM file: half-written through the real atomic writer, then SIGKILL
        if len(calls) == 2 and calls[-1] == path:
            with utils.io.atomic_path(path) as tmp:
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, data)

    utils.io.atomic_write_bytes = write_then_die
    sys.exit(make_cam.main(sys.argv[1:]))
    """
)


def test_temporary_files_of_a_killed_export_are_swept_by_the_next_run(run: Path, tmp_path: Path) -> None:
    """Issue #10 item 7: a SIGKILLed tool leaves `.<id>.npz.*.tmp`; the next run removes it before writing."""
    copy = _fresh_copy(run, tmp_path / "run")
    folder = copy / "cams" / "val"
    script = tmp_path / "dying_export.py"
    script.write_text(DYING_EXPORT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # cam.write_threads=0: the files are written in the loop, so exactly the second one is cut short
    killed = subprocess.run([sys.executable, str(script), "--run-dir", str(copy), "cam.write_threads=0"], cwd=REPO,
                            env=env, capture_output=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    leftovers = list(folder.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{_val(run)[1].ids[1]}.npz.")
    assert len(list(folder.glob("*.npz"))) == 1
    assert make_cam.main(["--run-dir", str(copy), "cam.write_threads=0"]) == 0
    assert not list(folder.glob(".*.tmp"))
    assert sorted(p.stem for p in folder.glob("*.npz")) == sorted(_val(run)[1].ids)
    assert f"removed 1 temporary file(s) left by a killed run in {folder}" in (copy / "make_cam.log").read_text()


@pytest.mark.slow
def test_two_process_export_equals_single_process(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    # --run-dir (not --run, which torchrun's own argparse would take for an abbreviation of its --run-path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "tools.make_cam", "--run-dir", str(run), f"run.out_dir={out}",
               f"eval.checkpoint={run / 'checkpoints' / 'last.pth'}"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single = sorted((run / "cams" / "val").glob("*.npz"))
    sharded = sorted((out / "cams" / "val").glob("*.npz"))
    assert [p.name for p in sharded] == [p.name for p in single]
    for a, b in zip(single, sharded, strict=True):
        left, right = load_npz(a), load_npz(b)
        assert left.keys() == right.keys()
        for key in left:
            assert np.array_equal(left[key], right[key]), (a.name, key)
    # both ranks worked: the summary counts all images as processed in this run
    assert f"{len(single)} processed, 0 already done" in (out / "make_cam.log").read_text()


def test_background_writers_write_the_files_of_the_main_loop_and_raise_their_failures(run: Path, tmp_path: Path):
    copy = _fresh_copy(run, tmp_path / "run")  # the fixture's export used the default cam.write_threads (2)
    assert load_run_config(run).cam.write_threads == 2
    summary = make_cam.export_cams(load_run_config(copy, ["cam.write_threads=0"]))
    _assert_same_cams(_cam_arrays(copy / "cams" / "val"), _cam_arrays(run / "cams" / "val"))
    sizes = [p.stat().st_size for p in (copy / "cams" / "val").glob("*.npz")]
    assert summary["bytes_per_image"] == pytest.approx(sum(sizes) / len(sizes))
    arrays = {"classes": np.array([1], np.int16), "cam": np.zeros((1, 2, 2), np.uint8)}
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    writer = make_cam.CamWriter(1)
    writer.submit(tmp_path / "ok.npz", arrays)
    writer.submit(blocker / "x.npz", arrays)  # its folder cannot be created: the failure surfaces in the caller
    with pytest.raises(OSError):
        writer.close()
    assert (tmp_path / "ok.npz").is_file() and writer.bytes == (tmp_path / "ok.npz").stat().st_size
    with pytest.raises(ValueError, match=r"cam.write_threads must be >= 0"):
        make_cam.CamWriter(-1)


def test_uint8_export_is_the_float16_export_quantised_and_smaller(run: Path, tmp_path: Path, capsys) -> None:
    copy = _fresh_copy(run, tmp_path / "run")
    summary = make_cam.export_cams(load_run_config(copy, ["cam.file_dtype=uint8"]))
    folder = copy / "cams" / "val"
    assert json.loads((folder / "settings.json").read_text())["file_dtype"] == "uint8"
    assert "file_dtype" not in json.loads((run / "cams" / "val" / "settings.json").read_text())  # float16: as before
    u8_bytes = f16_bytes = 0
    for name in _val(run)[1].ids:
        raw = load_npz(folder / f"{name}.npz")
        assert raw["cam"].dtype == raw["cam_aux"].dtype == np.uint8
        u8, f16 = read_cams(folder / f"{name}.npz"), read_cams(run / "cams" / "val" / f"{name}.npz")
        assert u8.classes.tolist() == f16.classes.tolist()
        for key in ("cam", "cam_aux"):  # round(v * 255) / 255 is within half a step of v; float16 within FP16_TOL
            assert np.abs(u8.maps(key) - f16.maps(key)).max() <= 0.5 / 255 + FP16_TOL
        u8_bytes += (folder / f"{name}.npz").stat().st_size
        f16_bytes += (run / "cams" / "val" / f"{name}.npz").stat().st_size
    assert u8_bytes < f16_bytes
    assert summary["bytes_per_image"] == pytest.approx(u8_bytes / summary["processed"])
    assert "KiB/image (uint8)" in (copy / "make_cam.log").read_text()
    # one folder holds one kind: resuming it as float16 is refused
    message = _user_error(capsys, ["--run-dir", str(copy)])
    assert "holds outputs made with other settings (file_dtype: 'uint8' -> None)" in message


def _cam_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {path.stem: load_npz(path) for path in sorted(folder.glob("*.npz"))}


def _assert_same_cams(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert np.array_equal(a[name][key], b[name][key]), (name, key)


def test_two_shards_export_disjoint_halves_that_merge_into_the_single_machine_export(run: Path, tmp_path: Path):
    """run.num_shards=2: machine i exports ids[i::2], into one shared folder or into copies merged by copying."""
    ids = _val(run)[1].ids
    single = _cam_arrays(run / "cams" / "val")
    shared = _fresh_copy(run, tmp_path / "shared")
    first = make_cam.export_cams(load_run_config(shared, ["run.num_shards=2", "run.shard_index=0"]))
    assert sorted(p.stem for p in (shared / "cams" / "val").glob("*.npz")) == sorted(ids[0::2])
    assert (first["processed"], first["skipped"], first["shard"]) == (len(ids[0::2]), 0, "0/2")
    assert first["total"] == len(ids)
    second = make_cam.export_cams(load_run_config(shared, ["run.num_shards=2", "run.shard_index=1"]))
    assert second["processed"] == len(ids[1::2]) and len(ids[0::2]) + len(ids[1::2]) == len(ids)
    _assert_same_cams(_cam_arrays(shared / "cams" / "val"), single)  # complete, and equal to one machine's
    assert f"(shard 1/2: {len(ids[1::2])} of them)" in (shared / "make_cam.log").read_text()
    # the other layout: each machine its own copy of the run folder, the shards' folders merged by copying
    machines = [_fresh_copy(run, tmp_path / f"machine{i}") for i in range(2)]
    for index, machine in enumerate(machines):
        make_cam.export_cams(load_run_config(machine, ["run.num_shards=2", f"run.shard_index={index}"]))
    shutil.copytree(machines[1] / "cams", machines[0] / "cams", dirs_exist_ok=True)
    _assert_same_cams(_cam_arrays(machines[0] / "cams" / "val"), single)
    # the merged folder resumes as a whole on one machine: nothing left to do
    assert make_cam.export_cams(load_run_config(machines[0]))["processed"] == 0
    # a shard index beyond the shard count is a one-line error, before anything is written
    other = _fresh_copy(run, tmp_path / "other")
    with pytest.raises(ValueError, match=r"run.shard_index must be in 0..run.num_shards-1.*index 2 of num_shards 2"):
        make_cam.export_cams(load_run_config(other, ["run.num_shards=2", "run.shard_index=2"]))
    assert not list((other / "cams" / "val").glob("*"))


def test_missing_image_is_a_clear_error(run: Path, tmp_path: Path, capsys) -> None:
    _, dataset = _val(run)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "val.txt").write_text("\n".join([*dataset.ids[:2], "ghost_0001"]) + "\n")
    message = _user_error(capsys, ["--run-dir", str(run), f"data.list_dir={lists}"])
    assert re.search(r"1 id\(s\) of split 'val' have no image .*ghost_0001", message), message


# ----------------------------------------------------------------------------------------------------------------------
# Memory fusion (SPEC §4.5, memory.fuse_lambda)
# ----------------------------------------------------------------------------------------------------------------------


def test_memory_fusion_recipe_known_answer() -> None:
    # make_cam fuses as normalise_per_class(fuse_similarity(CAM, S, λ)) (SPEC §4.5; λ = 0 skips both).
    # CAM [0, 1, 0.5], S [1, 0, 0.5], λ = 0.5 → CAM + λS = [0.5, 1, 0.75] → minus min 0.5 → [0, 0.5, 0.25]
    # → divided by (0.5 + 1e-5).
    cam = torch.tensor([0.0, 1.0, 0.5]).view(1, 1, 1, 3)
    sim = torch.tensor([1.0, 0.0, 0.5]).view(1, 1, 1, 3)
    expected = torch.tensor([0.0, 0.5, 0.25]) / (0.5 + 1e-5)
    torch.testing.assert_close(normalise_per_class(fuse_similarity(cam, sim, 0.5)).flatten(), expected)


def test_memory_fusion_upsamples_token_similarity() -> None:
    cam = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    sim = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    fused = normalise_per_class(fuse_similarity(cam, sim, 1.0))
    assert fused.shape == cam.shape
    flat = fused.flatten(2)
    torch.testing.assert_close(flat.amin(2), torch.zeros(2, 3))
    assert (flat.amax(2) <= 1).all() and (flat.amax(2) > 0.999).all()


def test_memory_similarity_at_scale_one(run: Path) -> None:
    cfg, dataset = _val(run)
    model = load_trained_model(cfg, torch.device("cpu"))
    item = dataset[0]
    height, width = item["img"].shape[-2:]
    label = item["label"][None]
    sim = make_cam.memory_similarity(model, model.normalize(item["img"][None]), label)
    patch = model.patch_size
    # each side rounded half-up to whole patches, as multiscale_cam does at scale 1.0
    assert sim.shape == (1, label.shape[1], max(1, int(height / patch + 0.5)), max(1, int(width / patch + 0.5)))
    absent = label[0] == 0
    assert not sim[0, absent].any()  # S is zero for absent classes
    assert sim.min() >= 0 and sim.max() < 1
