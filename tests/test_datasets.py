"""Dataset readers (datasets/base.py, voc.py, coco.py, build_dataset): items, labels, split lists, cache, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

import datasets
import datasets.base as base
from datasets import LAYOUTS, build_dataset, collate_eval
from utils.config import load_config
from utils.io import read_label_png, save_label_png

CROP = 48


def make_cfg(root: Path | str, run_dir: Path, *overrides: str, name: str = "voc", require: bool = True) -> DictConfig:
    num_classes = 21 if name == "voc" else 81
    return load_config(
        None,
        [
            f"data.name={name}",
            f"data.num_classes={num_classes}",
            f"data.root={root}",
            f"run.out_dir={run_dir}",
            f"data.crop_size={CROP}",
            "model.backbone_kwargs.patch_size=8",  # the crop rule (a multiple of 2 * patch) at this small crop
            "data.num_workers=0",
            *overrides,
        ],
        require=require,
    )


def mask_label(path: Path, num_fg: int) -> np.ndarray:
    """The expected multi-hot label of a mask, computed independently of the reader: unique values minus 0 and 255."""
    values = set(np.unique(read_label_png(path)).tolist()) - {0, 255}
    label = np.zeros(num_fg, dtype=np.float32)
    label[[v - 1 for v in values]] = 1.0
    return label


def voc_mask_path(root: Path, name: str) -> Path:
    official = root / "SegmentationClass" / f"{name}.png"
    return official if official.is_file() else root / "SegmentationClassAug" / f"{name}.png"


def read_list(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


@pytest.fixture
def voc_copy(voc_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic VOC tree that a test may damage."""
    return Path(shutil.copytree(voc_root, tmp_path / "VOC2012")).resolve()


# ---------------------------------------------------------------------------------------------------------- contract


def test_datasets_package_is_ours() -> None:
    # A PyPI package named `datasets` must not shadow this one.
    assert Path(datasets.__file__).resolve().parent == Path(__file__).resolve().parent.parent / "datasets"


def test_train_items_follow_the_contract(voc_root: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=6"), "train_aug", "train")
    assert len(ds) == 6
    for index in range(len(ds)):
        item = ds[index]
        assert set(item) == {"img", "g2", "img_box", "label", "name"}
        assert item["img"].shape == (3, CROP, CROP) and item["img"].dtype == torch.uint8
        assert item["g2"].shape == (3, CROP, CROP) and item["g2"].dtype == torch.uint8
        assert item["img_box"].shape == (4,) and item["img_box"].dtype == torch.int64
        assert item["label"].shape == (20,) and item["label"].dtype == torch.float32
        y0, y1, x0, x1 = item["img_box"].tolist()
        assert 0 <= y0 < y1 <= CROP and 0 <= x0 < x1 <= CROP
        outside = torch.ones(CROP, CROP, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert (item["img"][:, outside] == 0).all()
        np.testing.assert_array_equal(item["label"].numpy(), mask_label(voc_mask_path(voc_root, item["name"]), 20))
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["img"].shape == (2, 3, CROP, CROP)


def test_labels_equal_mask_classes_for_every_image(voc_root: Path, tmp_path: Path) -> None:
    for split in ("train_aug", "val"):
        ds = build_dataset(make_cfg(voc_root, tmp_path), split, "eval")
        assert ds.ids == read_list(voc_root, split)
        expected = np.stack([mask_label(voc_mask_path(voc_root, name), 20) for name in ds.ids])
        np.testing.assert_array_equal(ds.labels, expected)
        assert expected.sum(1).min() >= 1  # every synthetic image shows an object, so the check is not vacuous


def test_eval_items_have_image_and_mask_of_equal_size(voc_root: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=4"), "val", "eval")
    for index in range(len(ds)):
        item = ds[index]
        assert item["img"].dtype == torch.uint8 and item["mask"].dtype == torch.int64
        assert item["img"].shape[1:] == item["mask"].shape
        image = np.asarray(Image.open(voc_root / "JPEGImages" / f"{item['name']}.jpg").convert("RGB"))
        np.testing.assert_array_equal(item["img"].permute(1, 2, 0).numpy(), image)  # full resolution, untouched
        mask = read_label_png(voc_mask_path(voc_root, item["name"]))
        np.testing.assert_array_equal(item["mask"].numpy(), mask)


def test_eval_items_stay_at_full_resolution_whatever_eval_resize(voc_root: Path, tmp_path: Path) -> None:
    # eval.resize is applied by inference, which upsamples its prediction back: metrics use the original masks.
    plain = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=2"), "val", "eval")
    resized = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=2", "eval.resize=64"), "val", "eval")
    for index in range(len(plain)):
        assert torch.equal(plain[index]["img"], resized[index]["img"])
        assert torch.equal(plain[index]["mask"], resized[index]["mask"])


def test_sampler_seed_key_fixes_the_crop(voc_root: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=3"), "train_aug", "train")
    first, again, other = ds[(1, 123)], ds[(1, 123)], ds[(1, 124)]
    assert all(torch.equal(first[k], again[k]) for k in ("img", "g2", "img_box"))
    assert not torch.equal(first["img"], other["img"]) or not torch.equal(first["g2"], other["g2"])
    assert first["name"] == ds.ids[1]


def test_collate_eval_keeps_variable_sizes_as_lists(voc_root: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=3"), "val", "eval")
    batch = collate_eval([ds[0], ds[1], ds[2]])
    assert set(batch) == {"img", "mask", "label", "name"}
    assert batch["name"] == ds.ids[:3]
    assert [t.shape[1:] for t in batch["img"]] == [t.shape for t in batch["mask"]]
    with pytest.raises(ValueError, match="differ in keys"):
        collate_eval([ds[0], {"img": ds[1]["img"], "name": "x"}])


def test_same_seed_gives_the_same_crops(voc_root: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=2"), "train_aug", "train")

    def draw(seed: int) -> dict:
        torch.manual_seed(seed)
        return ds[0]

    first, again, other = draw(0), draw(0), draw(1)
    for key in ("img", "g2", "img_box"):
        assert torch.equal(first[key], again[key])
    assert not (torch.equal(first["img"], other["img"]) and torch.equal(first["g2"], other["g2"]))


def test_max_images_caps_the_split(voc_root: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=3"), "val", "eval")
    assert ds.ids == read_list(voc_root, "val")[:3]


# ---------------------------------------------------------------------------------------------- lists and labels


def test_train_aug_is_derived_as_aug_ids_minus_val(voc_copy: Path, tmp_path: Path) -> None:
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    aug = {p.stem for p in (voc_copy / "SegmentationClassAug").glob("*.png")}
    val = set(read_list(voc_copy, "val"))
    assert val and val <= aug  # the synthetic aug folder holds val masks too, so the subtraction matters
    ds = build_dataset(make_cfg(voc_copy, tmp_path / "run"), "train_aug", "train")
    assert ds.ids == sorted(aug - val)
    cached = json.loads((tmp_path / "run" / "cache" / "voc_train_aug.json").read_text())
    assert "ids" not in cached and sorted(cached["labels"]) == ds.ids  # ids are derived afresh, labels are cached


def test_list_dir_overrides_the_layout_list(voc_root: Path, tmp_path: Path) -> None:
    chosen = read_list(voc_root, "val")[::2]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "val.txt").write_text("\n".join(chosen) + "\n")
    ds = build_dataset(make_cfg(voc_root, tmp_path, f"data.list_dir={tmp_path / 'lists'}"), "val", "eval")
    assert ds.ids == chosen


def test_deeplab_style_list_lines_are_read(voc_root: Path, tmp_path: Path) -> None:
    names = read_list(voc_root, "val")[:2]
    (tmp_path / "lists").mkdir()
    lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png" for n in names]
    (tmp_path / "lists" / "val.txt").write_text("\n".join(lines) + "\n\n")
    ds = build_dataset(make_cfg(voc_root, tmp_path, f"data.list_dir={tmp_path / 'lists'}"), "val", "eval")
    assert ds.ids == names


def test_duplicate_ids_in_a_split_list_are_an_error_naming_file_and_lines(voc_root: Path, tmp_path: Path) -> None:
    names = read_list(voc_root, "val")
    (tmp_path / "lists").mkdir()
    list_file = tmp_path / "lists" / "val.txt"
    # Lines 1..5: a, b, a (plain), b again as a DeepLab-style path (same stem), c.
    lines = [names[0], names[1], names[0], f"/JPEGImages/{names[1]}.jpg /SegmentationClassAug/{names[1]}.png", names[2]]
    list_file.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(voc_root, tmp_path, f"data.list_dir={tmp_path / 'lists'}")
    expect_error(lambda: build_dataset(cfg, "val", "eval"), ValueError, str(list_file), "2 id(s) more than once",
                 f"{names[0]} (lines 1, 3)", f"{names[1]} (lines 2, 4)")  # fmt: skip
    with pytest.raises(ValueError) as info:
        base.read_id_list(list_file)
    assert names[2] not in str(info.value)  # only the repeated ids are named


def test_labels_fall_back_to_annotation_xml_without_masks(voc_copy: Path, tmp_path: Path) -> None:
    name = read_list(voc_copy, "train_aug")[0]
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc_copy / folder / f"{name}.png").unlink(missing_ok=True)
    # Known answer: objects "dog" (12) twice and "person" (15) -> label indices 11 and 14.
    xml = "<annotation>" + "".join(f"<object><name>{n}</name></object>" for n in ("dog", "person", "dog"))
    (voc_copy / "Annotations" / f"{name}.xml").write_text(xml + "</annotation>")
    ds = build_dataset(make_cfg(voc_copy, tmp_path, "data.max_images=2"), "train_aug", "train")
    assert ds.ids[0] == name
    assert np.flatnonzero(ds.labels[0]).tolist() == [11, 14]
    # Without masks or XML a training image has no label at all: that must be an error naming the id.
    (voc_copy / "Annotations" / f"{name}.xml").unlink()
    with pytest.raises(FileNotFoundError, match=name):
        build_dataset(make_cfg(voc_copy, tmp_path / "other"), "train_aug", "train")


# --------------------------------------------------------------------------------------------------------- cache


def count_mask_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every label PNG the dataset code opens (labels are derived in-process for small splits)."""
    calls: list[str] = []

    def counting(path: Path) -> np.ndarray:
        calls.append(str(path))
        return read_label_png(path)

    monkeypatch.setattr(base, "read_label_png", counting)
    return calls


def test_cache_is_reused_and_rebuilt_for_another_root(
    voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_mask_reads(monkeypatch)
    cfg = make_cfg(voc_root, tmp_path / "run")
    first = build_dataset(cfg, "train_aug", "train")
    assert len(calls) == len(first)
    cache_file = tmp_path / "run" / "cache" / "voc_train_aug.json"
    assert json.loads(cache_file.read_text())["key"]["root"] == str(voc_root.resolve())

    calls.clear()
    second = build_dataset(cfg, "train_aug", "train")
    assert calls == []  # second construction reads no masks
    np.testing.assert_array_equal(second.labels, first.labels)

    other_root = Path(shutil.copytree(voc_root, tmp_path / "elsewhere"))
    third = build_dataset(make_cfg(other_root, tmp_path / "run"), "train_aug", "train")
    assert len(calls) == len(third)  # another root: the cache is rebuilt, not trusted
    assert json.loads(cache_file.read_text())["key"]["root"] == str(other_root.resolve())


def set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


def test_rewritten_mask_is_read_again_in_the_same_run_folder(
    voc_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(voc_copy, tmp_path / "run")
    first = build_dataset(cfg, "val", "eval")
    name = first.ids[2]
    path = voc_mask_path(voc_copy, name)
    old = np.flatnonzero(first.labels[2]) + 1
    # Known answer: the fixed mask shows class 7 (car) on its top rows and nothing else but background / ignore.
    new_class = 7 if 7 not in old else 8
    mask = np.zeros_like(read_label_png(path))
    mask[:4] = new_class
    mask[-1] = 255
    save_label_png(path, mask)
    set_mtime(path, 1_000_000_000)
    calls = count_mask_reads(monkeypatch)
    second = build_dataset(cfg, "val", "eval")
    assert calls == [str(path)]  # only the rewritten mask is read again
    assert (np.flatnonzero(second.labels[2]) + 1).tolist() == [new_class]
    np.testing.assert_array_equal(np.delete(second.labels, 2, 0), np.delete(first.labels, 2, 0))


def test_same_size_rewrite_with_the_old_mtime_is_read_again(
    voc_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `rsync -t` or `tar x` does to a replaced mask: rewritten, old mtime restored; here the size is the same
    # too (the same bytes), so only the ctime shows the rewrite and the label must be read again to be trusted.
    cfg = make_cfg(voc_copy, tmp_path / "run")
    first = build_dataset(cfg, "val", "eval")
    path = voc_mask_path(voc_copy, first.ids[0])
    before = path.stat()
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns  # POSIX: a write and a utime both set the ctime to now
    calls = count_mask_reads(monkeypatch)
    second = build_dataset(cfg, "val", "eval")
    assert calls == [str(path)]
    np.testing.assert_array_equal(second.labels, first.labels)


def test_derived_split_gains_an_id_when_a_mask_is_added(voc_copy: Path, tmp_path: Path) -> None:
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    cfg = make_cfg(voc_copy, tmp_path / "run")
    first = build_dataset(cfg, "train_aug", "train")
    # A download finishing: one more image and its aug mask (class 3 = bird) appear under the same root.
    new = "synth_999999"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(voc_copy / "JPEGImages" / f"{new}.jpg")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 10:30] = 3
    save_label_png(voc_copy / "SegmentationClassAug" / f"{new}.png", mask)
    second = build_dataset(cfg, "train_aug", "train")
    assert second.ids == sorted([*first.ids, new])
    assert np.flatnonzero(second.labels[second.ids.index(new)]).tolist() == [2]
    np.testing.assert_array_equal(second.labels[[second.ids.index(i) for i in first.ids]], first.labels)


def test_unchanged_tree_reads_no_mask_or_xml_the_second_time(
    voc_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A derived split, with some images labelled from XML (no SegmentationClassAug): every source must hit the cache.
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    train_aug = build_dataset(make_cfg(voc_copy, tmp_path / "probe"), "train_aug", "train").ids
    without_mask = [i for i in train_aug if not (voc_copy / "SegmentationClass" / f"{i}.png").is_file()]
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(train_aug) + "\n")
    for name in without_mask:
        (voc_copy / "SegmentationClassAug" / f"{name}.png").unlink()
    assert without_mask and len(without_mask) < len(train_aug)  # both sources are in play
    cfg = make_cfg(voc_copy, tmp_path / "run")
    xml_reads: list[str] = []
    real_xml = base.xml_classes
    monkeypatch.setattr(base, "xml_classes", lambda path, names: xml_reads.append(str(path)) or real_xml(path, names))
    calls = count_mask_reads(monkeypatch)
    first = build_dataset(cfg, "train_aug", "train")
    assert len(calls) == len(train_aug) - len(without_mask) and len(xml_reads) == len(without_mask)
    calls.clear()
    xml_reads.clear()
    second = build_dataset(cfg, "train_aug", "train")
    assert calls == [] and xml_reads == []
    np.testing.assert_array_equal(second.labels, first.labels)


def test_mask_added_for_an_xml_labelled_image_replaces_the_xml_label(voc_copy: Path, tmp_path: Path) -> None:
    name = read_list(voc_copy, "train_aug")[0]
    moved = tmp_path / f"{name}.png"
    shutil.move(voc_mask_path(voc_copy, name), moved)
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc_copy / folder / f"{name}.png").unlink(missing_ok=True)
    # Known answer: the XML says "cat" (8) only, while the mask shows the generator's classes.
    (voc_copy / "Annotations" / f"{name}.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    from_mask = mask_label(moved, 20)
    assert np.flatnonzero(from_mask).tolist() != [7]  # the two sources disagree, so the test can tell them apart
    cfg = make_cfg(voc_copy, tmp_path / "run", "data.max_images=3")
    assert np.flatnonzero(build_dataset(cfg, "train_aug", "train").labels[0]).tolist() == [7]
    shutil.move(moved, voc_copy / "SegmentationClassAug" / f"{name}.png")  # the download of the aug masks finished
    np.testing.assert_array_equal(build_dataset(cfg, "train_aug", "train").labels[0], from_mask)


def test_cache_of_an_older_format_is_discarded(voc_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(voc_root, tmp_path / "run")
    truth = build_dataset(make_cfg(voc_root, tmp_path / "fresh"), "val", "eval")
    # A version-1 cache as the previous code wrote it: key without stamps, bare label lists, all wrong here.
    val_list = str(voc_root.resolve() / "ImageSets" / "Segmentation" / "val.txt")
    old_key = {"version": 1, "dataset": "voc", "root": str(voc_root.resolve()), "split": "val", "list": val_list,
               "num_classes": 21}  # fmt: skip
    cache_file = tmp_path / "run" / "cache" / "voc_val.json"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"key": old_key, "ids": None, "labels": {i: [20] for i in truth.ids}}))
    np.testing.assert_array_equal(build_dataset(cfg, "val", "eval").labels, truth.labels)


def test_xml_fallback_of_training_images_is_logged_once(
    voc_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(voc_copy / "SegmentationClassAug")  # training without the aug masks: only train ids keep a mask
    train_aug, train = read_list(voc_copy, "train_aug"), set(read_list(voc_copy, "train"))
    expected = len([i for i in train_aug if i not in train])
    assert 0 < expected < len(train_aug)
    cfg = make_cfg(voc_copy, tmp_path / "run")
    for attempt in range(2):  # the second construction takes every label from the cache and must still say so
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datasets.base"):
            build_dataset(cfg, "train_aug", "train")
        warnings = [r.getMessage() for r in caplog.records if "annotation XML" in r.getMessage()]
        assert len(warnings) == 1, (attempt, warnings)
        assert warnings[0].startswith(f"{expected} of {len(train_aug)} training images of split train_aug")
        assert str(voc_copy / "SegmentationClassAug") in warnings[0] and str(voc_copy / "Annotations") in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datasets.base"):
        build_dataset(cfg, "train", "train")  # every train image has its official mask: nothing to say
    assert not [r for r in caplog.records if "annotation XML" in r.getMessage()]


def test_cache_dir_key_is_used_and_nothing_is_written_to_the_dataset(voc_root: Path, tmp_path: Path) -> None:
    before = sorted(p.relative_to(voc_root) for p in voc_root.rglob("*"))
    build_dataset(make_cfg(voc_root, tmp_path / "run", f"data.cache_dir={tmp_path / 'c'}"), "val", "eval")
    assert (tmp_path / "c" / "voc_val.json").is_file()
    assert not (tmp_path / "run").exists()
    assert sorted(p.relative_to(voc_root) for p in voc_root.rglob("*")) == before


# ------------------------------------------------------------------------------------------------------ bad input


def expect_error(build: Callable[[], object], error: type[Exception], *fragments: str) -> None:
    with pytest.raises(error) as info:
        build()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"


def test_missing_root_names_the_key(tmp_path: Path) -> None:
    expect_error(lambda: build_dataset(make_cfg(tmp_path / "nope", tmp_path), "val", "eval"), FileNotFoundError,
                 "data.root", str(tmp_path / "nope"))  # fmt: skip
    unset = make_cfg("???", tmp_path, require=False)
    expect_error(lambda: build_dataset(unset, "val", "eval"), ValueError, "data.root")


def test_missing_subfolder_names_it_and_the_layout(voc_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(voc_copy / "JPEGImages")
    expect_error(lambda: build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval"), FileNotFoundError,
                 "JPEGImages", "SegmentationClassAug")  # fmt: skip


def test_listed_id_without_image_is_named(voc_copy: Path, tmp_path: Path) -> None:
    names = read_list(voc_copy, "val")
    for name in names[:2]:
        (voc_copy / "JPEGImages" / f"{name}.jpg").unlink()
    expect_error(lambda: build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval"), FileNotFoundError,
                 names[0], names[1], "2 id(s)")  # fmt: skip


def test_corrupt_image_names_the_file(voc_copy: Path, tmp_path: Path) -> None:
    name = read_list(voc_copy, "val")[0]
    (voc_copy / "JPEGImages" / f"{name}.jpg").write_bytes(b"not a jpeg at all")
    ds = build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval")
    expect_error(lambda: ds[0], OSError, f"{name}.jpg")


def test_mask_size_mismatch_names_both_sizes(voc_copy: Path, tmp_path: Path) -> None:
    name = read_list(voc_copy, "val")[0]
    path = voc_mask_path(voc_copy, name)
    mask = read_label_png(path)
    height, width = mask.shape
    save_label_png(path, np.zeros((height + 3, width), dtype=np.uint8))
    ds = build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval")
    expect_error(lambda: ds[0], ValueError, str(path), f"{height + 3}x{width}", f"{height}x{width}")


def test_mask_value_out_of_range_names_value_and_file(voc_copy: Path, tmp_path: Path) -> None:
    name = read_list(voc_copy, "val")[0]
    path = voc_mask_path(voc_copy, name)
    mask = read_label_png(path)
    mask[0, 0] = 42  # > num_classes - 1 = 20 and not the ignore value 255
    save_label_png(path, mask)
    expect_error(lambda: build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval"), ValueError, "42", str(path))


def test_mask_value_out_of_range_is_caught_at_load_time(voc_copy: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval")
    path = voc_mask_path(voc_copy, ds.ids[0])
    mask = read_label_png(path)
    mask[1, 1] = 77
    save_label_png(path, mask)  # damaged after its label was read (e.g. while a run goes on)
    expect_error(lambda: ds[0], ValueError, "77", str(path))


def test_empty_list_names_the_split(voc_copy: Path, tmp_path: Path) -> None:
    (voc_copy / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    expect_error(lambda: build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval"), ValueError, "'val'", "empty")


def test_split_without_list_names_the_expected_file(voc_copy: Path, tmp_path: Path) -> None:
    expect_error(lambda: build_dataset(make_cfg(voc_copy, tmp_path), "test", "eval"), FileNotFoundError,
                 "test.txt", "data.list_dir")  # fmt: skip


def test_list_dir_without_the_split_file_is_an_error(voc_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(voc_root, tmp_path, f"data.list_dir={tmp_path}")
    expect_error(lambda: build_dataset(cfg, "val", "eval"), FileNotFoundError, "data.list_dir", "val.txt")


def test_partial_masks_in_an_eval_split_are_reported(voc_copy: Path, tmp_path: Path) -> None:
    name = read_list(voc_copy, "val")[1]
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (voc_copy / folder / f"{name}.png").unlink(missing_ok=True)
    expect_error(lambda: build_dataset(make_cfg(voc_copy, tmp_path), "val", "eval"), FileNotFoundError,
                 name, "no mask")  # fmt: skip


def test_bad_config_values_name_their_key(voc_root: Path, tmp_path: Path) -> None:
    expect_error(lambda: build_dataset(make_cfg(voc_root, tmp_path, "data.name=cityscapes"), "val", "eval"),
                 ValueError, "data.name")  # fmt: skip
    no_run = make_cfg(voc_root, "???", require=False)
    expect_error(lambda: build_dataset(no_run, "val", "eval"), ValueError, "run.out_dir", "data.cache_dir")
    expect_error(lambda: build_dataset(make_cfg(voc_root, tmp_path, "data.max_images=0"), "val", "eval"),
                 ValueError, "data.max_images")  # fmt: skip
    expect_error(lambda: build_dataset(make_cfg(voc_root, tmp_path), "val", "predict"), ValueError, "mode")


def test_check_files_reports_unreadable_files_and_size_mismatches(voc_copy: Path, tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(voc_copy, tmp_path, "data.max_images=6"), "val", "eval")
    assert ds.check_files() == [] and ds.check_files("full") == []
    images, masks = ds.image_paths, ds.mask_paths
    # Damaged after construction, as a tree can be between the start of a run and its first validation.
    images[0].write_bytes(images[0].read_bytes()[:20])  # truncated inside the JPEG header
    height, width = read_label_png(masks[1]).shape
    save_label_png(masks[1], np.zeros((height, width + 5), dtype=np.uint8))  # wrong size
    rgb_shape = (*read_label_png(masks[2]).shape, 3)
    Image.fromarray(np.zeros(rgb_shape, np.uint8)).save(masks[2])  # an RGB PNG of the right size, not a label map
    data = images[3].read_bytes()
    images[3].write_bytes(data[: len(data) // 2])  # truncated pixel data: the header still reads
    header = ds.check_files("header")
    assert len(header) == 3, header
    assert str(images[0]) in header[0] and "cannot read the header" in header[0]
    assert header[1] == (f"mask {masks[1]} is {width + 5}x{height} (WxH) but its image {images[1]} is {width}x{height}")
    assert str(masks[2]) in header[2] and "'RGB'" in header[2]
    full = ds.check_files("full")
    assert full[:3] == [header[0].replace("read the header of", "decode"), header[1], header[2]]
    assert len(full) == 4 and str(images[3]) in full[3] and "cannot decode" in full[3]
    expect_error(lambda: ds.check_files("deep"), ValueError, "header", "full")


# ------------------------------------------------------------------------------------------------------------ COCO


# Classes in the label files (as tools/prepare_coco.py writes them from the JSON) but in no mask: a crowd-only person
# (label 1) in one val image, a too-small-to-rasterise "dining table" (label 61) in one train image.
COCO_LABEL_ONLY = {"COCO_val2014_000000000005": [1], "COCO_train2014_000000000003": [61]}


def write_coco_tree(root: Path) -> dict[str, dict[str, list[int]]]:
    """A hand-made COCO-layout tree: 3 train and 2 val images with masks and label files, one val image without a mask.

    Returns split -> {id: foreground classes of the label file} (the known answer): the mask classes plus
    ``COCO_LABEL_ONLY``, which no mask shows.
    """
    rng = np.random.default_rng(0)
    masks = {
        "train": {"COCO_train2014_000000000001": [1], "COCO_train2014_000000000002": [3, 80],
                  "COCO_train2014_000000000003": [17]},
        "val": {"COCO_val2014_000000000004": [2, 5], "COCO_val2014_000000000005": [60]},
    }  # fmt: skip
    contents = {
        split: {name: sorted(classes + COCO_LABEL_ONLY.get(name, [])) for name, classes in images.items()}
        for split, images in masks.items()
    }
    for split, labels in contents.items():
        label_file = root / "ImageSets" / f"labels_{split}2014.json"
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text(json.dumps({"labels": labels}))
    for split, images in masks.items():
        for index, (name, classes) in enumerate(images.items()):
            height, width = 30 + 4 * index, 40
            pixels = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)
            image_path = root / "coco2014" / f"{split}2014" / f"{name}.jpg"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(image_path)
            mask = np.zeros((height, width), dtype=np.uint8)
            for k, c in enumerate(classes):
                mask[2 + 6 * k : 6 + 6 * k, 2:10] = c
            mask[-1, :] = 255
            save_label_png(root / "SegmentationClass" / f"{split}2014" / f"{name}.png", mask)
    # An image with no annotation gets no mask from tools/prepare_coco.py, so a derived list leaves it out.
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(root / "coco2014" / "val2014" / "COCO_val2014_9.jpg")
    return contents


def test_coco_layout_derives_lists_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    contents = write_coco_tree(root)
    for split in ("train", "val", "val_part"):
        cfg = make_cfg(root, tmp_path / "run", name="coco")
        ds = build_dataset(cfg, split, "eval")
        truth = contents["val" if split == "val_part" else split]
        assert ds.ids == sorted(truth)  # fewer than 5,000 val images: val_part is all of them
        for index, name in enumerate(ds.ids):
            assert (np.flatnonzero(ds.labels[index]) + 1).tolist() == truth[name]
            item = ds[index]
            assert item["img"].shape[1:] == item["mask"].shape
    train = build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "train", "train")
    assert train[0]["img"].shape == (3, CROP, CROP) and train.labels.shape == (3, 80)


def json_labels(json_path: Path, num_fg: int) -> dict[str, np.ndarray]:
    """Expected multi-hot labels from an instances JSON, independently of the code under test: every annotated
    category (crowd included), mapped by name to its index in COCO_CLASSES."""
    from datasets.classes import COCO_CLASSES

    document = json.loads(json_path.read_text())
    names = {cat["id"]: cat["name"] for cat in document["categories"]}
    stems = {image["id"]: Path(image["file_name"]).stem for image in document["images"]}
    labels: dict[str, np.ndarray] = {}
    for ann in document["annotations"]:
        label = labels.setdefault(stems[ann["image_id"]], np.zeros(num_fg, dtype=np.float32))
        label[COCO_CLASSES.index(names[ann["category_id"]]) - 1] = 1.0
    return labels


def test_synthetic_coco_labels_come_from_the_json(coco_root: Path, tmp_path: Path) -> None:
    for split, folder in (("train", "train2014"), ("val_part", "val2014")):
        ds = build_dataset(make_cfg(coco_root, tmp_path, name="coco"), split, "eval")
        assert ds.ids == (coco_root / "ImageSets" / f"{split}.txt").read_text().split()
        expected = json_labels(coco_root / "annotations" / f"instances_{folder}.json", 80)
        np.testing.assert_array_equal(ds.labels, np.stack([expected[name] for name in ds.ids]))
        # Every class a mask shows is in the label (the label may hold more: crowd-only or tiny classes).
        masks = [coco_root / "SegmentationClass" / folder / f"{name}.png" for name in ds.ids]
        from_masks = np.stack([mask_label(path, 80) for path in masks])
        assert (from_masks <= ds.labels).all()
        if split == "train":  # seed 0 has crowd-only classes in train: labels from masks would have lost them
            assert (from_masks < ds.labels).any()
        item = ds[0]
        assert item["img"].shape[1:] == item["mask"].shape


def test_coco_labels_come_from_the_label_file_not_the_masks(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    write_coco_tree(root)
    train = build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "train", "train")
    row = train.ids.index("COCO_train2014_000000000003")
    assert (np.flatnonzero(train.labels[row]) + 1).tolist() == [17, 61]  # 61 is in no mask
    # val_part reads val2014's label file: the crowd-only person of image 5 is in its label, 255 (not 1) in its mask.
    val_part = build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "val_part", "eval")
    row = val_part.ids.index("COCO_val2014_000000000005")
    assert (np.flatnonzero(val_part.labels[row]) + 1).tolist() == [1, 60]
    mask = val_part[row]["mask"]
    assert (mask == 255).any() and not (mask == 1).any()


def test_coco_without_label_file_points_to_prepare_coco(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    write_coco_tree(root)
    label_file = root / "ImageSets" / "labels_train2014.json"
    label_file.unlink()  # a tree prepared before image labels came from the JSON
    for mode in ("train", "eval"):
        expect_error(lambda mode=mode: build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "train", mode),
                     FileNotFoundError, str(label_file), f"python -m tools.prepare_coco {root.resolve()}")  # fmt: skip
    # The val file still exists, so val and val_part are unaffected.
    assert len(build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "val_part", "eval")) == 2
    label_file.write_text("{not json")
    expect_error(lambda: build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "train", "train"),
                 ValueError, str(label_file), "tools.prepare_coco")  # fmt: skip
    label_file.write_text(json.dumps({"labels": {"COCO_train2014_000000000001": [81]}}))
    expect_error(lambda: build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "train", "train"),
                 ValueError, "class id(s) 81;", "data.num_classes = 81")  # fmt: skip


def test_coco_training_id_without_label_entry_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    write_coco_tree(root)
    label_file = root / "ImageSets" / "labels_train2014.json"
    labels = json.loads(label_file.read_text())["labels"]
    del labels["COCO_train2014_000000000002"]
    label_file.write_text(json.dumps({"labels": labels}))
    expect_error(lambda: build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "train", "train"),
                 FileNotFoundError, "COCO_train2014_000000000002", str(label_file))  # fmt: skip


def test_coco_labels_are_never_taken_from_a_stale_cache(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    contents = write_coco_tree(root)
    cfg = make_cfg(root, tmp_path / "run", name="coco")
    cache_file = tmp_path / "run" / "cache" / "coco_val.json"
    first = build_dataset(cfg, "val", "eval")
    assert not cache_file.exists()  # file labels are never cached, and ids are derived afresh
    # Bogus labels in the cache formats a run folder may hold: version 1 (mask labels, as written before the label
    # file existed) and version 2 with entries whose source stamps match the masks. Neither may shadow the file.
    stale = {name: [7] for name in first.ids}
    key = {"version": base.CACHE_VERSION, "dataset": "coco", "root": str(root.resolve()), "split": "val",
           "num_classes": 81}  # fmt: skip
    entries = {}
    for name, mask in zip(first.ids, first.mask_paths, strict=True):
        entries[name] = {"classes": [7], "source": mask.relative_to(root.resolve()).as_posix(),
                         "stamp": base.file_stamp(mask)}  # fmt: skip
    cache_file.parent.mkdir(parents=True)
    for payload in ({"key": {**key, "version": 1}, "ids": first.ids, "labels": stale}, {"key": key, "labels": entries}):
        cache_file.write_text(json.dumps(payload))
        ds = build_dataset(cfg, "val", "eval")
        assert [(np.flatnonzero(row) + 1).tolist() for row in ds.labels] == [contents["val"][i] for i in ds.ids]


def test_coco_list_file_and_unknown_split(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    write_coco_tree(root)
    (root / "ImageSets" / "train.txt").write_text("COCO_train2014_000000000002\n")
    cfg = make_cfg(root, tmp_path / "run", name="coco")
    assert build_dataset(cfg, "train", "train").ids == ["COCO_train2014_000000000002"]
    expect_error(lambda: build_dataset(cfg, "train_aug", "train"), ValueError, "train_aug", "val_part")


def test_coco_without_masks_points_to_prepare_coco(tmp_path: Path) -> None:
    root = tmp_path / "MSCOCO"
    write_coco_tree(root)
    shutil.rmtree(root / "SegmentationClass")
    expect_error(lambda: build_dataset(make_cfg(root, tmp_path / "run", name="coco"), "val", "eval"),
                 FileNotFoundError, "tools.prepare_coco")  # fmt: skip


def test_val_part_rule_is_a_fixed_sorted_subset() -> None:
    from datasets.coco import val_part_ids

    ids = [f"{i:05d}" for i in range(7000)]
    part = val_part_ids(ids[::-1], size=5000)
    assert len(part) == 5000 and part == sorted(part) and set(part) <= set(ids)
    assert part == val_part_ids(ids, size=5000)  # input order does not matter
    assert val_part_ids(ids[:10], size=5000) == ids[:10]


def test_layouts_are_descriptions_of_one_code_path() -> None:
    assert set(LAYOUTS) == {"voc", "coco"}
    assert all(isinstance(layout, base.Layout) for layout in LAYOUTS.values())


# ---------------------------------------------------------------------------- set-up mistakes and other layouts


def test_a_voc_root_a_level_off_names_the_folder_meant(voc_root: Path, tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    devkit.mkdir()
    (devkit / "VOC2012").symlink_to(voc_root, target_is_directory=True)
    meant = devkit.resolve() / "VOC2012"
    expect_error(lambda: build_dataset(make_cfg(devkit, tmp_path / "run"), "val", "eval"), FileNotFoundError,
                 f"data.root = {devkit.resolve()} has no JPEGImages/", f"did you mean data.root={meant}?")  # fmt: skip
    expect_error(lambda: build_dataset(make_cfg(voc_root / "JPEGImages", tmp_path / "run"), "val", "eval"),
                 FileNotFoundError, f"did you mean data.root={voc_root.resolve()}?")  # fmt: skip


def test_coco_images_directly_under_the_root_are_found(tmp_path: Path) -> None:
    """MSCOCO/{train2014,val2014}/ (as the zips unpack) reads exactly as MSCOCO/coco2014/{train2014,val2014}/."""
    root = tmp_path / "MSCOCO"
    contents = write_coco_tree(root)
    reference = {split: build_dataset(make_cfg(root, tmp_path / "a", name="coco"), split, "eval")
                 for split in ("train", "val")}  # fmt: skip
    first_images = {split: ds[0]["img"] for split, ds in reference.items()}
    for folder in ("train2014", "val2014"):
        (root / "coco2014" / folder).rename(root / folder)
    (root / "coco2014").rmdir()
    for split, expected in reference.items():
        ds = build_dataset(make_cfg(root, tmp_path / "b", name="coco"), split, "eval")
        assert ds.image_dir == root.resolve() / f"{split}2014"
        assert ds.ids == expected.ids == sorted(contents[split])
        np.testing.assert_array_equal(ds.labels, expected.labels)
        assert torch.equal(ds[0]["img"], first_images[split])
    shutil.rmtree(root / "train2014")
    both = "MSCOCO/coco2014/{train2014,val2014}/<id>.jpg (SPEC §7) or MSCOCO/{train2014,val2014}/<id>.jpg"
    expect_error(lambda: build_dataset(make_cfg(root, tmp_path / "c", name="coco"), "train", "eval"),
                 FileNotFoundError, str(root.resolve() / "coco2014" / "train2014"), str(root.resolve() / "train2014"),
                 both)  # fmt: skip


def test_a_split_without_masks_gives_eval_items_without_masks(tmp_path: Path) -> None:
    """A VOC test split (generator --num-test): images and a list only; eval items have no mask, labels are empty."""
    from datasets.synthetic import generate

    root = tmp_path / "VOC2012"
    summary = generate(root, num_train=2, num_val=1, num_test=2, seed=3, min_size=48, max_size=64)
    ds = build_dataset(make_cfg(root, tmp_path / "run"), "test", "eval")
    assert ds.ids == summary["splits"]["test"] == ["synth_000003", "synth_000004"]
    assert not ds.has_masks and ds.mask_paths == [None, None] and not ds.labels.any()
    item = ds[1]
    assert set(item) == {"img", "label", "name"} and item["img"].shape[0] == 3
    assert build_dataset(make_cfg(root, tmp_path / "run"), "val", "eval").has_masks  # the other splits are unchanged
