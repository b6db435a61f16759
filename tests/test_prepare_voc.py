"""tools/prepare_voc.py: report exactly what a VOC tree lacks; exit status 0 only for a usable tree."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.prepare_voc import check_voc, main
from utils.io import read_label_png, save_label_png


def read_list(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


@pytest.fixture
def voc_copy(voc_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(voc_root, tmp_path / "VOC2012")).resolve()


def test_synthetic_tree_passes_with_counts_and_a_note(voc_root: Path, capsys: pytest.CaptureFixture) -> None:
    report = check_voc(voc_root)
    assert report.errors == []
    for split in ("train_aug", "train", "val"):
        assert report.counts[split] == len(read_list(voc_root, split))
    # Synthetic counts differ from the official 10,582 / 1,464 / 1,449, which is a note, not an error.
    assert any("10582" in note and "synthetic" in note for note in report.notes)
    assert main([str(voc_root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("OK:") and f"train_aug {report.counts['train_aug']}" in out


def test_missing_folders_and_lists_are_each_reported(voc_copy: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(voc_copy / "SegmentationClassAug")
    (voc_copy / "ImageSets" / "Segmentation" / "val.txt").unlink()
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    report = check_voc(voc_copy)
    text = "\n".join(report.errors)
    assert "SegmentationClassAug" in text and "val.txt" in text
    assert main([str(voc_copy)]) == 1
    assert "ERROR:" in capsys.readouterr().out


def test_ids_without_image_or_mask_are_named(voc_copy: Path) -> None:
    val = read_list(voc_copy, "val")
    (voc_copy / "JPEGImages" / f"{val[0]}.jpg").unlink()
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc_copy / folder / f"{val[1]}.png").unlink(missing_ok=True)
    errors = check_voc(voc_copy).errors
    assert any("val: 1 id(s) without image" in e and val[0] in e for e in errors)
    assert any("val: 1 id(s) without mask" in e and val[1] in e for e in errors)


def test_train_aug_is_derived_when_its_list_is_missing(voc_copy: Path) -> None:
    listed = read_list(voc_copy, "train_aug")
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    report = check_voc(voc_copy)
    assert report.errors == []
    assert report.counts["train_aug"] == len(listed)  # aug ids minus val = the synthetic train_aug list
    assert any("derived" in note for note in report.notes)


def test_train_aug_overlapping_val_is_an_error(voc_copy: Path) -> None:
    val = read_list(voc_copy, "val")
    with open(voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt", "a") as f:
        f.write(f"{val[0]}\n")
    assert any("val id" in e and val[0] in e for e in check_voc(voc_copy).errors)


def test_deep_check_reads_mask_values_and_sizes(voc_copy: Path) -> None:
    val = read_list(voc_copy, "val")
    bad_value = voc_copy / "SegmentationClass" / f"{val[0]}.png"
    mask = read_label_png(bad_value)
    mask[0, 0] = 99
    save_label_png(bad_value, mask)
    bad_size = voc_copy / "SegmentationClass" / f"{val[1]}.png"
    save_label_png(bad_size, np.zeros((5, 7), dtype=np.uint8))
    assert check_voc(voc_copy).errors == []  # the quick check does not open masks
    errors = "\n".join(check_voc(voc_copy, deep=True).errors)
    assert "99" in errors and str(bad_value) in errors
    assert str(bad_size) in errors and "7x5" in errors


def test_deep_check_decodes_every_image_and_names_the_broken_ones(
    voc_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    val, train_aug, train = read_list(voc_copy, "val"), read_list(voc_copy, "train_aug"), read_list(voc_copy, "train")
    aug_only = [name for name in train_aug if name not in train]
    broken = [voc_copy / "JPEGImages" / f"{name}.jpg" for name in (val[0], aug_only[-1], train[0])]
    for path in broken:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a download cut short: the header opens, the pixels do not decode
    bad_mask = voc_copy / "SegmentationClassAug" / f"{aug_only[0]}.png"
    bad_mask.write_bytes(bad_mask.read_bytes()[:-12])  # a PNG missing its end
    assert check_voc(voc_copy).errors == []
    errors = check_voc(voc_copy, deep=True).errors
    assert len(errors) == 4, errors  # each broken file once, with the split(s) that use it
    for prefix, path in zip(("val", "train_aug", "train/train_aug"), broken, strict=True):
        assert any(e.startswith(f"{prefix}: cannot decode image file {path} ") for e in errors), (prefix, errors)
    assert any(str(bad_mask) in e for e in errors)
    assert main([str(voc_copy), "--deep"]) == 1
    out = capsys.readouterr().out
    assert all(str(path) in out for path in (*broken, bad_mask))


def test_duplicate_ids_in_a_list_are_reported_with_line_numbers(voc_copy: Path) -> None:
    val_list = voc_copy / "ImageSets" / "Segmentation" / "val.txt"
    val = read_list(voc_copy, "val")
    val_list.write_text("\n".join([*val, val[1]]) + "\n")
    errors = check_voc(voc_copy).errors
    assert any(str(val_list) in e and f"{val[1]} (lines 2, {len(val) + 1})" in e for e in errors), errors


def test_missing_root_fails() -> None:
    report = check_voc("/definitely/not/here")
    assert len(report.errors) == 1 and "/definitely/not/here" in report.errors[0]


def test_module_entry_point_exit_codes(voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `python -m tools.prepare_voc ROOT`, run in-process (a subprocess would spend seconds importing torch).
    for root, code in ((voc_root, 0), (tmp_path / "missing", 1)):
        monkeypatch.setattr(sys, "argv", ["prepare_voc", str(root)])
        monkeypatch.delitem(sys.modules, "tools.prepare_voc", raising=False)  # run_module executes a fresh copy
        with pytest.raises(SystemExit) as info:
            runpy.run_module("tools.prepare_voc", run_name="__main__")
        assert info.value.code == code


# ------------------------------------------------------------------------ a root one or two levels off: "did you mean"


def _linked_voc(voc_root: Path, *parts: str) -> Path:
    """``parts`` as real folders, the last a symlink to the session's VOC2012 tree; returns the link."""
    link = Path(*parts)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(voc_root, target_is_directory=True)
    return link


@pytest.mark.parametrize("given", ["VOCdevkit", "download"])
def test_a_root_above_voc2012_names_the_voc2012_folder(
    voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, given: str
) -> None:
    meant = _linked_voc(voc_root, str(tmp_path), "download", "VOCdevkit", "VOC2012")
    # A sibling VOC2007 (also with JPEGImages) must not be chosen over VOC2012.
    (tmp_path / "download" / "VOCdevkit" / "VOC2007" / "JPEGImages").mkdir(parents=True)
    root = tmp_path / "download" / "VOCdevkit" if given == "VOCdevkit" else tmp_path / "download"
    report = check_voc(root)
    assert len(report.errors) == 1 and f"did you mean {meant}?" in report.errors[0]  # one finding, not every folder
    assert str(root) in report.errors[0]
    assert main([str(root)]) == 1
    assert f"did you mean {meant}?" in capsys.readouterr().out


@pytest.mark.parametrize("below", ["JPEGImages", "ImageSets/Segmentation"])
def test_a_root_inside_voc2012_names_the_voc2012_folder(voc_root: Path, below: str) -> None:
    report = check_voc(voc_root / below)
    assert len(report.errors) == 1 and f"did you mean {voc_root.resolve()}?" in report.errors[0]


def test_an_unrelated_folder_gets_no_hint_but_the_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "photos" / "holiday").mkdir(parents=True)
    errors = check_voc(tmp_path).errors
    assert not any("did you mean" in e for e in errors)
    assert any("missing folder" in e and "JPEGImages" in e for e in errors)
