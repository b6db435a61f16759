"""tools/package_voc_test.py: a synthetic VOC tree with a test split (no masks), a 2-iteration run, segmentation on
test, then the server package: the tar's member names, PNG modes, palettes, sizes and values, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.synthetic import generate
from tests.user_errors import user_error_line
from tools import infer_seg, make_synthetic, package_voc_test, train
from utils.config import load_run_config
from utils.io import read_label_png, save_label_png, voc_palette

REPO = Path(__file__).resolve().parent.parent
NUM_TEST = 3
MEMBER_DIR = "results/VOC2012/Segmentation/comp6_test_cls"


@pytest.fixture(scope="module")
def voc_with_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VOC tree: 6 train_aug + 2 val images with masks, NUM_TEST test images with a JPEG only."""
    root = tmp_path_factory.mktemp("voc_test") / "VOC2012"
    generate(root, num_train=6, num_val=2, num_test=NUM_TEST, seed=0, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def predicted(voc_with_test: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-iteration run with its seg and seg_crf predictions on the test split."""
    run = tmp_path_factory.mktemp("package") / "run"
    args = ["--config", "configs/smoke.yaml", f"data.root={voc_with_test}", f"run.out_dir={run}",
            "train.max_iters=2", "train.ckpt_every=2"]  # fmt: skip
    assert train.main(args) == 0
    cfg = load_run_config(run, [f"run.out_dir={run}", "run.device=cpu", "eval.split=test", "eval.crf=true",
                                "eval.crf_workers=0", "eval.scales=[1.0]"])  # fmt: skip
    stats = infer_seg.run_inference(cfg)
    assert (stats.seg_images, stats.crf_images) == (NUM_TEST, NUM_TEST)
    return run


def _copy(run: Path, dest: Path) -> Path:
    """A private copy of the run folder (config paths point at the original, so run.out_dir is passed)."""
    return Path(shutil.copytree(run, dest))


def _test_ids(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "test.txt").read_text().split()


def test_generator_writes_a_test_split_with_images_only(voc_with_test: Path, tmp_path: Path, capsys) -> None:
    ids = _test_ids(voc_with_test)
    assert len(ids) == NUM_TEST
    val = (voc_with_test / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert not set(ids) & set(val)
    for name in ids:
        assert (voc_with_test / "JPEGImages" / f"{name}.jpg").is_file()
        for other in ("SegmentationClass/{}.png", "SegmentationClassAug/{}.png", "Annotations/{}.xml"):
            assert not (voc_with_test / other.format(name)).exists(), other
    # the COCO layout has no test split: one error line from the command line tool
    line = user_error_line(make_synthetic.main, [str(tmp_path / "c"), "--layout", "coco", "--num-test", "2"], capsys)
    assert "num_test: only the voc layout has a test split" in line


def test_package_holds_one_voc_palette_png_per_test_id_at_its_image_size(predicted, voc_with_test, tmp_path):
    run = _copy(predicted, tmp_path / "run")
    assert package_voc_test.main(["--run-dir", str(run), "--crf"]) == 0
    ids = _test_ids(voc_with_test)
    out = run / "test_server"
    with tarfile.open(out / "results.tgz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        files = sorted(name for name, m in members.items() if m.isfile())
        assert files == sorted(f"{MEMBER_DIR}/{name}.png" for name in ids)
        assert sorted(name for name, m in members.items() if m.isdir()) == [
            "results", "results/VOC2012", "results/VOC2012/Segmentation", MEMBER_DIR]  # fmt: skip
        for name in ids:
            data = tar.extractfile(f"{MEMBER_DIR}/{name}.png")
            with Image.open(data) as png:
                assert png.mode == "P"
                palette = np.array(png.getpalette()[: 21 * 3], dtype=np.uint8).reshape(21, 3)
                np.testing.assert_array_equal(palette, voc_palette(21))
                with Image.open(voc_with_test / "JPEGImages" / f"{name}.jpg") as jpeg:
                    assert png.size == jpeg.size
                values = np.asarray(png)
            # the class ids of the CRF predictions, unchanged (0..20)
            np.testing.assert_array_equal(values, read_label_png(run / "seg_crf" / "test" / f"{name}.png"))
            assert values.max() <= 20
            # the folder copy holds the same file
            assert (out / MEMBER_DIR / f"{name}.png").read_bytes() == tar.extractfile(f"{MEMBER_DIR}/{name}.png").read()
    record = json.loads((out / "package.json").read_text())
    assert record["source"] == str(run / "seg_crf" / "test") and record["num_images"] == NUM_TEST
    assert record["settings"]["crf"]  # the seg_crf folder's settings.json (checkpoint, scales, CRF parameters)


def test_repackaging_replaces_the_folder_and_comp5_is_named(predicted, tmp_path):
    run = _copy(predicted, tmp_path / "run")
    assert package_voc_test.main(["--run-dir", str(run)]) == 0
    stale = run / "test_server" / MEMBER_DIR / "stale.png"
    stale.write_bytes(b"left over")
    assert package_voc_test.main(["--run-dir", str(run), "--competition", "comp5"]) == 0
    assert not stale.exists() and not (run / "test_server" / MEMBER_DIR).exists()
    with tarfile.open(run / "test_server" / "results.tgz") as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert names and all(n.startswith("results/VOC2012/Segmentation/comp5_test_cls/") for n in names)
    assert not [p for p in (run / "test_server").iterdir() if p.name.startswith(".")]  # no build folders left


def test_missing_and_wrong_size_predictions_are_named(predicted, voc_with_test, tmp_path, capsys):
    run = _copy(predicted, tmp_path / "run")
    ids = _test_ids(voc_with_test)
    (run / "seg" / "test" / f"{ids[1]}.png").unlink()
    line = user_error_line(package_voc_test.main, ["--run-dir", str(run)], capsys)
    assert f"1 of {NUM_TEST} test image(s) have no prediction" in line and ids[1] in line
    assert "tools.infer_seg" in line and "eval.split=test" in line
    assert not (run / "test_server" / "results.tgz").exists()

    save_label_png(run / "seg" / "test" / f"{ids[1]}.png", np.zeros((5, 7), np.uint8))
    line = user_error_line(package_voc_test.main, ["--run-dir", str(run)], capsys)
    assert "differ in size" in line and f"{ids[1]} (7x5, image" in line

    with Image.open(voc_with_test / "JPEGImages" / f"{ids[1]}.jpg") as jpeg:  # the right size, an ignore value
        save_label_png(run / "seg" / "test" / f"{ids[1]}.png", np.full(jpeg.size[::-1], 255, np.uint8))
    line = user_error_line(package_voc_test.main, ["--run-dir", str(run)], capsys)
    assert "[255]" in line and ids[1] in line and "0..20" in line
    assert not (run / "test_server" / "results.tgz").exists()
    assert not [p for p in (run / "test_server").iterdir() if p.name.startswith(".")]  # the build folder is gone


def test_runs_of_other_data_or_capped_splits_are_refused(predicted, tmp_path, capsys):
    run = _copy(predicted, tmp_path / "run")
    line = user_error_line(package_voc_test.main, ["--run-dir", str(run), "data.max_images=2"], capsys)
    assert "data.max_images=2" in line
    line = user_error_line(package_voc_test.main, ["--run-dir", str(run), "data.num_classes=5"], capsys)
    assert "VOC evaluation server" in line
    with pytest.raises(SystemExit):
        package_voc_test.main([])  # --run-dir is required


@pytest.mark.slow
def test_split_test_entry_point_infers_and_packages(predicted, voc_with_test, tmp_path):
    """``SPLIT=test infer_run_VOC.sh RUN``: segmentation + DenseCRF on test, then the package of seg_crf."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(predicted / "config.yaml", run / "config.yaml")
    shutil.copy(predicted / "checkpoints" / "last.pth", run / "checkpoints" / "last.pth")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "SPLIT": "test", "NGPUS": "1"}
    overrides = ["run.device=cpu", "run.num_threads=1", "eval.crf_workers=0", "eval.scales=[1.0]"]
    result = subprocess.run(["bash", "infer_run_VOC.sh", str(run), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with tarfile.open(run / "test_server" / "results.tgz") as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert files == sorted(f"{MEMBER_DIR}/{name}.png" for name in _test_ids(voc_with_test))
    assert not (run / "eval").exists()  # nothing scored
