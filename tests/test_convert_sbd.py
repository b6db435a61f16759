"""tools/convert_sbd.py on a tiny fake SBD release (scipy.io.savemat in SBD's cls/*.mat struct layout) and VOC tree:
pixel-exact palette PNGs, VOC's official masks over SBD's, resume, and one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from datasets.voc import VOC_LAYOUT, derive_voc_ids
from tests.user_errors import user_error_line
from tools import convert_sbd
from tools.convert_sbd import main
from utils.io import read_label_png, save_label_png, voc_palette

SBD_TRAIN, SBD_VAL = ["2008_000002", "2008_000003"], ["2008_000004"]
VOC_ONLY = "2007_000032"  # an official mask that SBD does not have
BOTH = "2008_000003"  # in SBD train and in VOC's SegmentationClass: VOC's mask must win


def _sbd_label(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """An SBD-like class map: background with two rectangles of classes 1..20 (no 255: SBD has no void label)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for value in rng.choice(np.arange(1, 21), size=2, replace=False):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        label[y : y + 5, x : x + 6] = value
    return label


def _save_sbd_mat(path: Path, label: np.ndarray) -> None:
    """SBD's cls layout: a struct GTcls with Segmentation (uint8 HxW), Boundaries (cell) and CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = np.zeros((1, 1), np.uint8)
    present = np.unique(label[label > 0]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"GTcls": {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}})


@pytest.fixture
def trees(tmp_path: Path) -> dict[str, object]:
    """benchmark_RELEASE/dataset with 3 ids, a VOC2012 folder with 2 official masks (one shared), and the truth."""
    dataset = tmp_path / "benchmark_RELEASE" / "dataset"
    sbd = {name: _sbd_label(i, (12 + i, 15 + 2 * i)) for i, name in enumerate(SBD_TRAIN + SBD_VAL)}
    for name, label in sbd.items():
        _save_sbd_mat(dataset / "cls" / f"{name}.mat", label)
    (dataset / "train.txt").write_text("".join(f"{n}\n" for n in SBD_TRAIN))
    (dataset / "val.txt").write_text("".join(f"{n}\n" for n in SBD_VAL))
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    official = {}
    for name, shape in ((BOTH, sbd[BOTH].shape), (VOC_ONLY, (9, 11))):
        label = _sbd_label(100 + len(official), shape)
        label[0, :] = 255  # VOC's void band
        official[name] = label
        save_label_png(voc / "SegmentationClass" / f"{name}.png", label)
    for name in [*sbd, VOC_ONLY]:
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        shape = official.get(name, sbd.get(name)).shape
        Image.fromarray(np.zeros((*shape, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{VOC_ONLY}\n")
    expected = {**sbd, **official}  # official masks take precedence
    return {
        "sbd": tmp_path / "benchmark_RELEASE",
        "dataset": dataset,
        "voc": voc,
        "expected": expected,
        "sbd_labels": sbd,
    }


def _outputs(voc: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((voc / "SegmentationClassAug").glob("*.png"))}


def test_every_id_becomes_a_pixel_exact_voc_palette_png_with_voc_masks_first(trees, capsys) -> None:
    voc, expected = trees["voc"], trees["expected"]
    assert main([str(trees["sbd"]), str(voc)]) == 0
    out = capsys.readouterr().out
    assert "4 masks (2 from SBD, 2 official VOC masks, which replace SBD's for 1 ids in both)" in out
    assert "train_aug (derived: these ids minus the val ids): 3 images" in out
    outputs = _outputs(voc)
    assert sorted(outputs) == sorted(expected)
    for name, path in outputs.items():
        with Image.open(path) as png:
            assert png.mode == "P", name
            palette = np.array(png.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
            np.testing.assert_array_equal(palette[:21], voc_palette(21))
            np.testing.assert_array_equal(palette[255], voc_palette()[255])
            np.testing.assert_array_equal(np.asarray(png), expected[name], err_msg=name)
    # the shared id is VOC's mask (with its 255 band), not SBD's
    assert not np.array_equal(read_label_png(outputs[BOTH]), trees["sbd_labels"][BOTH])
    assert (read_label_png(outputs[BOTH])[0] == 255).all()
    # what the dataset reader derives from the folder: all ids but val
    assert derive_voc_ids(VOC_LAYOUT, voc, "train_aug") == sorted(set(expected) - {VOC_ONLY})


def test_a_rerun_writes_nothing_and_a_resume_rewrites_only_what_is_wrong(trees) -> None:
    voc, expected, dataset = trees["voc"], trees["expected"], trees["dataset"]
    first = convert_sbd.convert_sbd(dataset, voc)  # the dataset folder itself is accepted too
    assert (first["written"], first["skipped"]) == (4, 0)
    stamps = {name: path.stat().st_mtime_ns for name, path in _outputs(voc).items()}
    second = convert_sbd.convert_sbd(trees["sbd"], voc)
    assert (second["written"], second["skipped"]) == (0, 4)
    assert {name: path.stat().st_mtime_ns for name, path in _outputs(voc).items()} == stamps
    # a truncated file, SBD's content where VOC's belongs, and a grey (not palette) PNG are each rewritten
    truncated = voc / "SegmentationClassAug" / f"{SBD_TRAIN[0]}.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    save_label_png(voc / "SegmentationClassAug" / f"{BOTH}.png", trees["sbd_labels"][BOTH])
    save_label_png(voc / "SegmentationClassAug" / f"{SBD_VAL[0]}.png", expected[SBD_VAL[0]], palette=False)
    (voc / "SegmentationClassAug" / f"{VOC_ONLY}.png").unlink()
    third = convert_sbd.convert_sbd(trees["sbd"], voc)
    assert (third["written"], third["skipped"]) == (4, 0)
    fourth = convert_sbd.convert_sbd(trees["sbd"], voc)
    assert (fourth["written"], fourth["skipped"]) == (0, 4)
    for name, path in _outputs(voc).items():
        np.testing.assert_array_equal(read_label_png(path), expected[name], err_msg=name)
    assert not [p for p in (voc / "SegmentationClassAug").iterdir() if p.suffix != ".png"]  # no temporary files left


def test_a_worker_pool_writes_the_same_files(trees, tmp_path) -> None:
    voc = trees["voc"]
    other = Path(shutil.copytree(voc, tmp_path / "other" / "VOC2012"))
    convert_sbd.convert_sbd(trees["sbd"], voc)
    assert convert_sbd.convert_sbd(trees["sbd"], other, workers=2)["written"] == 4
    assert {n: p.read_bytes() for n, p in _outputs(voc).items()} == {
        n: p.read_bytes() for n, p in _outputs(other).items()
    }


def test_other_files_in_the_folder_are_left_alone_and_counted(trees, capsys) -> None:
    voc = trees["voc"]
    stray = voc / "SegmentationClassAug" / "2012_999999.png"
    save_label_png(stray, np.zeros((3, 3), np.uint8))
    assert main([str(trees["sbd"]), str(voc)]) == 0
    assert "1 other PNG(s) in that folder are from neither source; left alone" in capsys.readouterr().out
    assert stray.is_file()


def test_a_folder_that_is_not_sbd_is_one_error_line(trees, tmp_path, capsys) -> None:
    (tmp_path / "elsewhere" / "cls").mkdir(parents=True)
    line = user_error_line(main, [str(tmp_path / "elsewhere"), str(trees["voc"])], capsys)
    assert (
        "is not the SBD release folder" in line
        and "benchmark_RELEASE/dataset/{cls/<id>.mat, train.txt, val.txt}" in line
    )
    assert "benchmark.tgz" in line
    line = user_error_line(main, [str(tmp_path / "missing"), str(trees["voc"])], capsys)
    assert "SBD folder" in line and "not found" in line


def test_sbd_file_problems_name_the_file(trees, capsys) -> None:
    dataset, voc = trees["dataset"], trees["voc"]
    os.remove(dataset / "cls" / f"{SBD_VAL[0]}.mat")
    line = user_error_line(main, [str(trees["sbd"]), str(voc)], capsys)
    assert "1 SBD id(s) of train.txt / val.txt have no" in line and SBD_VAL[0] in line
    bad = _sbd_label(7, (6, 6))
    bad[0, 0] = 21
    _save_sbd_mat(dataset / "cls" / f"{SBD_VAL[0]}.mat", bad)
    line = user_error_line(main, [str(trees["sbd"]), str(voc)], capsys)
    assert f"{SBD_VAL[0]}.mat: GTcls.Segmentation holds value(s) [21]; expected class ids 0..20" in line
    scipy.io.savemat(dataset / "cls" / f"{SBD_VAL[0]}.mat", {"GTinst": {"Segmentation": bad}})
    line = user_error_line(main, [str(trees["sbd"]), str(voc)], capsys)
    assert f"{SBD_VAL[0]}.mat has no GTcls.Segmentation" in line
    (dataset / "cls" / f"{SBD_VAL[0]}.mat").write_bytes(b"not a mat file")
    line = user_error_line(main, [str(trees["sbd"]), str(voc)], capsys)
    assert "cannot read SBD mask" in line and f"{SBD_VAL[0]}.mat" in line


def test_a_voc_root_a_level_off_says_did_you_mean(trees, tmp_path, capsys) -> None:
    devkit = trees["voc"].parent
    line = user_error_line(main, [str(trees["sbd"]), str(devkit)], capsys)
    assert f"did you mean {trees['voc']}?" in line
    (tmp_path / "empty").mkdir()
    line = user_error_line(main, [str(trees["sbd"]), str(tmp_path / "empty")], capsys)
    assert "has no SegmentationClass/ folder" in line and "did you mean" not in line
