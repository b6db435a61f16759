"""Tests of tools/prepare_coco.py on the synthetic COCO layout (checked against the VOC layout of the same seed)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import utils.logging
from datasets import build_dataset
from datasets.classes import COCO_CATEGORIES, COCO_CLASSES, COCO_ID_TO_LABEL, VOC_CLASSES, VOC_TO_COCO_NAME
from datasets.coco import val_part_ids
from tools import prepare_coco
from tools.prepare_coco import Instance, coco_label_map, prepare, segmentation_to_mask
from utils.config import load_config
from utils.io import read_label_png

CocoFixture = tuple[Path, dict[str, Any], dict[str, Any]]


def _voc_to_coco_lut() -> np.ndarray:
    """VOC class id -> COCO label (1..80) lookup table; 0 and 255 map to themselves."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    for voc_id, name in enumerate(VOC_CLASSES[1:], start=1):
        lut[voc_id] = COCO_CLASSES.index(VOC_TO_COCO_NAME.get(name, name))
    return lut


def _mask_hashes(root: Path) -> dict[str, str]:
    files = sorted((root / "SegmentationClass").rglob("*.png"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _coco_mask(root: Path, image: dict[str, Any]) -> np.ndarray:
    return read_label_png(root / "SegmentationClass" / f"{image['split']}2014" / f"{image['name']}.png")


def test_masks_reproduce_the_generator_masks(
    synthetic_voc: tuple[Path, dict[str, Any]], synthetic_coco: CocoFixture
) -> None:
    """Outside VOC's void band the COCO mask equals the VOC mask with VOC ids mapped to COCO labels, exactly.

    No tolerance is needed: instance masks are the visible parts, so they do not overlap, and the generator keeps a
    polygon only when its rasterisation differs from the mask inside the void band alone (else it writes exact RLE).
    Crowd objects are the one intended difference: there the COCO mask is 255.
    """
    voc_root, voc_summary = synthetic_voc
    coco_root, coco_summary, _ = synthetic_coco
    lut = _voc_to_coco_lut()
    annotations = {
        split: json.loads((coco_root / "annotations" / f"instances_{split}2014.json").read_text())["annotations"]
        for split in ("train", "val")
    }
    crowd_pixels = 0
    for voc_image, coco_image in zip(voc_summary["images"], coco_summary["images"], strict=True):
        voc = read_label_png(voc_root / "SegmentationClassAug" / f"{voc_image['name']}.png")
        coco = _coco_mask(coco_root, coco_image)
        assert coco.shape == voc.shape
        outside_band = voc != 255
        expected = lut[voc]
        image_id = int(coco_image["name"].rsplit("_", 1)[1])
        for ann in annotations[coco_image["split"]]:
            if ann["image_id"] == image_id and ann["iscrowd"]:
                region = segmentation_to_mask(ann["segmentation"], *voc.shape) & outside_band
                # The crowd region is the object's visible area: VOC labels it with the same class.
                assert (expected[region] == COCO_ID_TO_LABEL[ann["category_id"]]).all()
                expected[region] = 255
                crowd_pixels += int(region.sum())
        np.testing.assert_array_equal(coco[outside_band], expected[outside_band], err_msg=coco_image["name"])
        # The comparison covers most of every image (the band is two pixels wide along object borders).
        assert outside_band.sum() > 0.65 * voc.size
    assert crowd_pixels > 0  # the crowd path was exercised


def test_first_run_writes_every_mask_and_the_second_none(synthetic_coco: CocoFixture) -> None:
    root, summary, first = synthetic_coco
    num_annotations = {"train": 0, "val": 0}
    num_crowd = {"train": 0, "val": 0}
    for image in summary["images"]:
        num_annotations[image["split"]] += len(image["objects"])
        num_crowd[image["split"]] += sum(obj["crowd"] for obj in image["objects"])
    for split, count in (("train", 24), ("val", 8)):
        assert first[split]["images"] == first[split]["written"] == count
        assert first[split]["skipped"] == first[split]["missing_images"] == 0
        assert first[split]["crowd"] == num_crowd[split]
        assert first[split]["instances"] + first[split]["crowd"] == num_annotations[split]
    before = _mask_hashes(root)
    assert len(before) == 32
    second = prepare(root)
    for split, count in (("train", 24), ("val", 8)):
        assert (second[split]["written"], second[split]["skipped"]) == (0, count)
    assert _mask_hashes(root) == before


def test_masks_are_palette_pngs_with_coco_labels(synthetic_coco: CocoFixture) -> None:
    root, summary, _ = synthetic_coco
    allowed = set(range(81)) | {255}
    for image in summary["images"]:
        mask = _coco_mask(root, image)
        assert (mask.shape[0], mask.shape[1]) == (image["height"], image["width"])
        assert set(np.unique(mask).tolist()) <= allowed


def test_split_lists(synthetic_coco: CocoFixture) -> None:
    root, summary, _ = synthetic_coco
    lists = {split: (root / "ImageSets" / f"{split}.txt").read_text().split() for split in ("train", "val", "val_part")}
    for split in ("train", "val"):
        assert lists[split] == sorted(image["name"] for image in summary["images"] if image["split"] == split)
        assert all(name.startswith(f"COCO_{split}2014_") for name in lists[split])
    # Fewer than 5,000 val images: val_part is all of val.
    assert lists["val_part"] == lists["val"]


def test_val_part_is_a_fixed_sorted_subset() -> None:
    stems = [f"COCO_val2014_{i:012d}" for i in range(50, 0, -1)]
    subset = val_part_ids(stems, size=10)
    assert len(subset) == len(set(subset)) == 10
    assert subset == sorted(subset) and set(subset) <= set(stems)
    assert val_part_ids(list(reversed(stems)), size=10) == subset  # depends on the stems, not their order
    assert val_part_ids(stems, size=10, seed=1) != subset
    assert val_part_ids(stems[:7], size=10) == sorted(stems[:7])


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_label_map_paints_larger_instances_first_and_crowd_only_where_uncovered() -> None:
    big = np.zeros((6, 6), dtype=bool)
    big[0:4, 0:4] = True  # cat (COCO id 17 -> label 16), 16 pixels
    crowd = np.zeros((6, 6), dtype=bool)
    crowd[3:6, :] = True  # person crowd, rows 3..5
    # dog (COCO id 18 -> label 17) as a polygon; pycocotools puts pixel i on [i, i+1), so the centres 2.5..4.5 of
    # rows / columns 2..4 lie inside [2.2, 4.8] and none other does: a 3x3 square, 9 pixels.
    small = [[2.2, 2.2, 4.8, 2.2, 4.8, 4.8, 2.2, 4.8]]
    instances = [  # the small one first and the crowd in between: the result must not depend on the order
        Instance(ann_id=1, category_id=18, segmentation=small, iscrowd=False),
        Instance(ann_id=2, category_id=1, segmentation=_rle(crowd), iscrowd=True),
        Instance(ann_id=3, category_id=17, segmentation=_rle(big), iscrowd=False),
    ]
    expected = np.array(
        [
            [16, 16, 16, 16, 0, 0],
            [16, 16, 16, 16, 0, 0],
            [16, 16, 17, 17, 17, 0],
            [16, 16, 17, 17, 17, 255],
            [255, 255, 17, 17, 17, 255],
            [255, 255, 255, 255, 255, 255],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(coco_label_map(instances, 6, 6), expected)
    np.testing.assert_array_equal(coco_label_map(instances[::-1], 6, 6), expected)
    assert (COCO_ID_TO_LABEL[17], COCO_ID_TO_LABEL[18]) == (16, 17)


def test_missing_json_error_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "coco2014" / "train2014").mkdir(parents=True)
    expected = tmp_path / "annotations" / "instances_train2014.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
        prepare(tmp_path, splits=["train"])


def test_missing_image_folder_error_names_the_path(tmp_path: Path, synthetic_coco: CocoFixture) -> None:
    (tmp_path / "annotations").mkdir()
    shutil.copy(synthetic_coco[0] / "annotations" / "instances_val2014.json", tmp_path / "annotations")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "coco2014" / "val2014"))):
        prepare(tmp_path, splits=["val"])
    assert not (tmp_path / "SegmentationClass").exists()


def test_unknown_category_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "coco2014" / "val2014").mkdir(parents=True)
    document = {
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 4, "width": 4}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 12, "segmentation": [[0, 0, 3, 0, 3, 3]]}],
        "categories": [{"id": 12, "name": "not a coco category"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"instances_val2014\.json: annotation 7 has category_id 12"):
        prepare(tmp_path, splits=["val"])


def test_worker_pool_writes_the_same_masks(tmp_path: Path, synthetic_coco: CocoFixture) -> None:
    source = synthetic_coco[0]
    for folder in ("annotations", "coco2014"):
        shutil.copytree(source / folder, tmp_path / folder)
    summary = prepare(tmp_path, splits=["train"], workers=2)
    assert summary["train"]["written"] == 24
    assert _mask_hashes(tmp_path) == {k: v for k, v in _mask_hashes(source).items() if "train2014" in k}


def test_cli_prints_the_summary(synthetic_coco: CocoFixture, capsys: pytest.CaptureFixture[str]) -> None:
    root = synthetic_coco[0]
    assert prepare_coco.main([str(root), "--splits", "val"]) == 0
    out = capsys.readouterr().out
    assert "val2014: 8 images, masks written 0 / skipped 8" in out
    assert re.search(r"\d+ instances, \d+ crowd regions", out)


# ---------------------------------------------------------------------------------------- image labels (SPEC §7)


def _label_file(root: Path, split: str) -> dict[str, list[int]]:
    return json.loads((root / "ImageSets" / f"labels_{split}2014.json").read_text())["labels"]


def test_label_files_hold_every_annotated_category_crowd_included(synthetic_coco: CocoFixture) -> None:
    root, _, first = synthetic_coco
    for split in ("train", "val"):
        # Known answer from the JSON alone: category names of the image's annotations, as COCO_CLASSES indices.
        document = json.loads((root / "annotations" / f"instances_{split}2014.json").read_text())
        names = {cat["id"]: cat["name"] for cat in document["categories"]}
        stems = {image["id"]: Path(image["file_name"]).stem for image in document["images"]}
        expected: dict[str, set[int]] = {}
        for ann in document["annotations"]:
            expected.setdefault(stems[ann["image_id"]], set()).add(COCO_CLASSES.index(names[ann["category_id"]]))
        labels = _label_file(root, split)
        assert first[split]["label_file"] == str(root / "ImageSets" / f"labels_{split}2014.json")
        assert list(labels) == (root / "ImageSets" / f"{split}.txt").read_text().split()  # the listed images
        assert {name: set(classes) for name, classes in labels.items()} == expected
        assert all(classes == sorted(classes) for classes in labels.values())


def _write_json_tree(root: Path, height: int, width: int, annotations: dict[int, list[dict[str, Any]]]) -> list[str]:
    """A train2014-only MSCOCO tree: one flat grey JPEG per image id and the instances JSON; returns the stems."""
    image_dir = root / "coco2014" / "train2014"
    image_dir.mkdir(parents=True)
    images, anns = [], []
    for image_id, image_anns in annotations.items():
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for ann in image_anns:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "iscrowd": 0, **ann})
    categories = [{"id": cat_id, "name": name} for cat_id, name in COCO_CATEGORIES]
    (root / "annotations").mkdir()
    document = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(document))
    return [Path(image["file_name"]).stem for image in images]


def test_crowd_only_and_unrasterisable_classes_stay_in_the_training_label(tmp_path: Path) -> None:
    height, width = 16, 20
    crowd = np.zeros((height, width), dtype=bool)
    crowd[8:, :] = True
    # Pixel i covers [i, i+1) and is inside a polygon when its centre i + 0.5 is: the dog square covers rows 0..5 and
    # columns 0..7; the cat square [5.1, 5.4]^2 holds no pixel centre, so it rasterises to nothing.
    dog = [[0.0, 0.0, 8.0, 0.0, 8.0, 6.0, 0.0, 6.0]]
    tiny_cat = [[5.1, 5.1, 5.4, 5.1, 5.4, 5.4, 5.1, 5.4]]
    bus = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]
    assert not segmentation_to_mask(tiny_cat, height, width).any()  # the premise of image 2
    # COCO ids: person 1, bus 6, cat 17, dog 18 -> labels 1, 6, 16, 17 (ids 1..11 are contiguous, id 12 is unused).
    root = tmp_path / "MSCOCO"
    crowd_person = {"category_id": 1, "segmentation": _rle(crowd), "iscrowd": 1}
    annotations = {
        1: [{"category_id": 18, "segmentation": dog}, crowd_person],  # person only as a crowd region
        2: [{"category_id": 17, "segmentation": tiny_cat}],  # the image's only instance rasterises to no pixel
        3: [{"category_id": 6, "segmentation": bus}],
    }
    stems = _write_json_tree(root, height, width, annotations)
    assert prepare(root, splits=["train"])["train"]["images"] == 3
    expected = {stems[0]: [1, 17], stems[1]: [16], stems[2]: [6]}
    assert _label_file(root, "train") == expected

    overrides = [f"data.root={root}", f"run.out_dir={tmp_path / 'run'}", "data.name=coco", "data.num_classes=81",
                 "data.crop_size=32", "data.num_workers=0"]  # fmt: skip
    cfg = load_config(None, overrides)
    train = build_dataset(cfg, "train", "train")
    assert train.ids == stems
    for index, name in enumerate(train.ids):
        assert (np.flatnonzero(train[index]["label"].numpy()) + 1).tolist() == expected[name], name
    # The masks are unchanged by this: crowd stays 255 (no person pixel), the tiny cat leaves an all-background mask.
    masks = build_dataset(cfg, "train", "eval")
    crowd_mask, tiny_mask = masks[0]["mask"].numpy(), masks[1]["mask"].numpy()
    assert (crowd_mask[8:] == 255).all() and (crowd_mask[:6, :8] == 17).all()
    assert set(np.unique(crowd_mask).tolist()) == {0, 17, 255}
    assert not tiny_mask.any()


def test_rerun_on_a_tree_without_label_files_adds_them_and_keeps_the_masks(
    tmp_path: Path, synthetic_coco: CocoFixture
) -> None:
    source = synthetic_coco[0]
    for folder in ("annotations", "coco2014", "SegmentationClass", "ImageSets"):
        shutil.copytree(source / folder, tmp_path / folder)
    for split in ("train", "val"):  # as a tree prepared by the version before label files
        (tmp_path / "ImageSets" / f"labels_{split}2014.json").unlink()
    before = _mask_hashes(tmp_path)
    summary = prepare(tmp_path)
    assert all(summary[split]["written"] == 0 for split in ("train", "val"))
    assert _mask_hashes(tmp_path) == before
    for split in ("train", "val"):
        name = f"labels_{split}2014.json"
        assert (tmp_path / "ImageSets" / name).read_bytes() == (source / "ImageSets" / name).read_bytes()


# ---------------------------------------------------------------------------------- progress without a terminal


@pytest.mark.parametrize("workers", [0, 2])
def test_without_a_terminal_progress_is_logged_in_lines(
    tmp_path: Path, synthetic_coco: CocoFixture, caplog: pytest.LogCaptureFixture, monkeypatch, workers: int
) -> None:
    """nohup / SLURM: no bar, but a line per interval (here 0 s: every image) with count, rate and ETA, and one at
    the start and end of each split."""
    monkeypatch.setattr(utils.logging, "is_terminal", lambda stream=None: False)  # whatever runs the tests
    source = synthetic_coco[0]
    for folder in ("annotations", "coco2014"):
        shutil.copytree(source / folder, tmp_path / folder)
    caplog.set_level(logging.INFO, logger=prepare_coco.logger.name)
    prepare(tmp_path, splits=["val"], workers=workers, progress_every=0)
    lines = [r.getMessage() for r in caplog.records if r.name == prepare_coco.logger.name]
    assert lines[0] == "COCO val2014 masks: started, 8 img"
    assert re.fullmatch(r"COCO val2014 masks: done, 8 img in \d+:\d\d:\d\d \([\d.e+]+ img/s\)", lines[-1]), lines
    periodic = [re.fullmatch(r"COCO val2014 masks: (\d)/8 \(([\d.]+)%\) \| ([\d.e+]+) img/s \| elapsed "
                             r"\d+:\d\d:\d\d \| ETA (\d+):(\d\d):(\d\d)", line) for line in lines[1:-1]]  # fmt: skip
    assert all(periodic), lines
    assert [int(match[1]) for match in periodic] == list(range(1, 9))
    assert [float(match[2]) for match in periodic] == [100 * n / 8 for n in range(1, 9)]
    assert periodic[-1].groups()[3:] == ("0", "00", "00")  # nothing left


def test_the_progress_interval_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        prepare_coco.main([str(tmp_path), "--progress-every", "-1"])
    assert stopped.value.code == 2 and "--progress-every must be >= 0 seconds, got -1" in capsys.readouterr().err


# -------------------------------------------------------------------- image layouts and the val_part list option


def _copy_coco(source: Path, dest: Path, flat: bool = False) -> Path:
    """The instances JSON and images of ``source`` (no masks or lists); ``flat``: images in dest/{train,val}2014."""
    shutil.copytree(source / "annotations", dest / "annotations")
    shutil.copytree(source / "coco2014", dest if flat else dest / "coco2014", dirs_exist_ok=True)
    return dest


def test_images_directly_under_the_root_give_the_same_masks_lists_and_labels(
    tmp_path: Path, synthetic_coco: CocoFixture
) -> None:
    source = synthetic_coco[0]
    root = _copy_coco(source, tmp_path / "MSCOCO", flat=True)
    assert (root / "train2014").is_dir() and not (root / "coco2014").exists()
    summary = prepare(root)
    assert summary["train"]["missing_images"] == summary["val"]["missing_images"] == 0
    assert _mask_hashes(root) == _mask_hashes(source)
    for name in ("train.txt", "val.txt", "val_part.txt", "labels_train2014.json", "labels_val2014.json"):
        assert (root / "ImageSets" / name).read_bytes() == (source / "ImageSets" / name).read_bytes(), name


def test_missing_images_in_both_layouts_name_both_paths(tmp_path: Path, synthetic_coco: CocoFixture) -> None:
    (tmp_path / "annotations").mkdir()
    shutil.copy(synthetic_coco[0] / "annotations" / "instances_val2014.json", tmp_path / "annotations")
    with pytest.raises(FileNotFoundError) as info:
        prepare(tmp_path, splits=["val"])
    assert str(tmp_path / "coco2014" / "val2014") in str(info.value) and str(tmp_path / "val2014") in str(info.value)


def test_val_part_list_replaces_the_built_in_subset_and_is_kept_by_later_runs(
    tmp_path: Path, synthetic_coco: CocoFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    source = synthetic_coco[0]
    root = _copy_coco(source, tmp_path / "MSCOCO")
    val = (source / "ImageSets" / "val.txt").read_text().split()
    chosen = [val[5], val[0], val[3]]
    listed = tmp_path / "val_part.txt"  # ToCo's format: one image stem per line
    listed.write_text("".join(f"{name}\n" for name in chosen))
    assert prepare_coco.main([str(root), "--splits", "val", "--val-part-list", str(listed)]) == 0
    assert "val_part: 3 images (--val-part-list" in capsys.readouterr().out
    part = root / "ImageSets" / "val_part.txt"
    assert part.read_text().split() == sorted(chosen)
    overrides = [f"data.root={root}", "data.name=coco", "data.num_classes=81", f"run.out_dir={tmp_path / 'run'}"]
    ds = build_dataset(load_config(None, overrides), "val_part", "eval")
    assert ds.ids == sorted(chosen)  # what training validates on
    record = json.loads((root / "ImageSets" / "val_part_source.json").read_text())
    assert record == {"list": str(listed.resolve()), "ids": 3}
    # a later run without the option (e.g. to add label files) keeps the chosen list ...
    summary = prepare(root, splits=["val"])
    assert part.read_text().split() == sorted(chosen) and summary["val"]["val_part"] == 3
    # ... until the record is removed: then the built-in subset (all 8 val images here, fewer than 5,000)
    (root / "ImageSets" / "val_part_source.json").unlink()
    assert prepare(root, splits=["val"])["val"]["val_part_source"] == "built-in fixed subset"
    assert part.read_bytes() == (source / "ImageSets" / "val_part.txt").read_bytes()


def test_val_part_list_with_unknown_ids_is_refused_before_any_mask(
    tmp_path: Path, synthetic_coco: CocoFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.user_errors import user_error_line

    source = synthetic_coco[0]
    root = _copy_coco(source, tmp_path / "MSCOCO")
    val = (source / "ImageSets" / "val.txt").read_text().split()
    train = (source / "ImageSets" / "train.txt").read_text().split()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{val[0]}\nCOCO_val2014_000000999999\n{train[0]}\n")
    line = user_error_line(prepare_coco.main, [str(root), "--val-part-list", str(listed)], capsys)  # train + val
    assert f"2 of 3 id(s) are not among the {len(val)} annotated val2014 images" in line
    assert "COCO_val2014_000000999999" in line and train[0] in line and str(listed) in line
    # val is checked first, so not even the train masks were written
    assert not (root / "SegmentationClass").exists() and not (root / "ImageSets").exists()
    with pytest.raises(ValueError, match="needs the val split"):
        prepare(root, splits=["train"], val_part_list=listed)
    listed.write_text(f"{val[0]}\n{val[0]}\n")
    with pytest.raises(ValueError, match=r"lists 1 id\(s\) more than once"):
        prepare(root, splits=["val"], val_part_list=listed)
    line = user_error_line(prepare_coco.main, [str(root), "--val-part-list", str(tmp_path / "nope.txt")], capsys)
    assert "nope.txt not found" in line
