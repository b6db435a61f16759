"""Tests of the synthetic dataset generator (datasets/synthetic.py, tools/make_synthetic.py)."""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

import datasets
from datasets import synthetic
from datasets.classes import COCO_CATEGORIES, COCO_ID_TO_LABEL, VOC_CLASSES, VOC_TO_COCO_NAME
from datasets.synthetic import MIN_VISIBLE_PIXELS, generate
from tools import make_synthetic
from tools.prepare_coco import segmentation_to_mask
from utils.io import read_image, read_label_png, voc_palette

REPO = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {"num_train": 5, "num_val": 2, "min_size": 48, "max_size": 64}


def _hash_tree(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _voc_mask(root: Path, name: str) -> np.ndarray:
    return read_label_png(root / "SegmentationClassAug" / f"{name}.png")


def test_datasets_package_is_ours() -> None:
    # A PyPI package called `datasets` would shadow ours and break every import of datasets.*.
    assert Path(datasets.__file__).resolve().parent == REPO / "datasets"


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path: Path) -> None:
    generate(tmp_path / "serial", seed=3, workers=0, **TINY)
    generate(tmp_path / "pooled", seed=3, workers=2, **TINY)
    serial, pooled = _hash_tree(tmp_path / "serial"), _hash_tree(tmp_path / "pooled")
    # 7 JPEGs + 7 Aug masks + 7 XMLs + SegmentationClass for train (round(0.14 * 5) = 1) and val (2) = 3,
    # + 3 split lists + synthetic.json = 28 files.
    assert len(serial) == 28
    assert serial == pooled


def test_different_seed_changes_every_image(tmp_path: Path) -> None:
    generate(tmp_path / "seed0", seed=0, **TINY)
    generate(tmp_path / "seed1", seed=1, **TINY)
    first, second = _hash_tree(tmp_path / "seed0"), _hash_tree(tmp_path / "seed1")
    jpegs = [key for key in first if key.endswith(".jpg")]
    assert len(jpegs) == 7
    assert all(first[key] != second[key] for key in jpegs)


def test_every_recorded_object_is_in_the_mask(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    for image in summary["images"]:
        mask = _voc_mask(root, image["name"])
        expected: dict[int, int] = {}
        for obj in image["objects"]:
            assert obj["pixels"] >= MIN_VISIBLE_PIXELS, (image["name"], obj)
            expected[obj["class_id"]] = expected.get(obj["class_id"], 0) + obj["pixels"]
        present = {int(c) for c in np.unique(mask)} - {0, 255}
        assert present == set(expected), image["name"]
        # The recorded pixels (outside the void band) of a class add up to exactly its pixels in the mask.
        for class_id, pixels in expected.items():
            assert int((mask == class_id).sum()) == pixels, (image["name"], class_id)


def test_dataset_uses_many_classes_and_up_to_three_objects(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    _, summary = synthetic_voc
    counts = [len(image["objects"]) for image in summary["images"]]
    assert min(counts) >= 1 and max(counts) == 3
    assert sum(1 for n in summary["class_counts"].values() if n > 0) >= 15
    assert summary["num_objects"] == sum(counts)


def test_xml_lists_exactly_the_mask_classes(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    for image in summary["images"]:
        tree = ET.parse(root / "Annotations" / f"{image['name']}.xml").getroot()
        assert tree.tag == "annotation"
        assert tree.findtext("filename") == f"{image['name']}.jpg"
        width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
        assert (height, width) == (image["height"], image["width"])
        names = [node.findtext("name") for node in tree.findall("object")]
        assert len(names) == len(image["objects"])
        present = set(np.unique(_voc_mask(root, image["name"])).tolist()) - {0, 255}
        mask_classes = {VOC_CLASSES[c] for c in present}
        assert set(names) == mask_classes
        for node in tree.findall("object/bndbox"):
            x0, y0, x1, y1 = (int(node.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 <= x1 <= width and 1 <= y0 <= y1 <= height


def test_masks_are_voc_palette_pngs(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    allowed = set(range(21)) | {255}
    with_class_mask = set(summary["splits"]["train"]) | set(summary["splits"]["val"])
    for image in summary["images"]:
        path = root / "SegmentationClassAug" / f"{image['name']}.png"
        with Image.open(path) as png:
            assert png.mode == "P"
            palette = np.array(png.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, voc_palette())
        assert set(np.unique(read_label_png(path)).tolist()) <= allowed
        class_mask = root / "SegmentationClass" / f"{image['name']}.png"
        # As in VOC, SegmentationClass covers train + val only, with the same masks as SegmentationClassAug.
        if image["name"] in with_class_mask:
            assert class_mask.read_bytes() == path.read_bytes()
        else:
            assert not class_mask.exists()


def test_void_band_known_answer() -> None:
    # A 4x4 object at rows/cols 2..5 of an 8x8 image: the band is every pixel whose 3x3 window sees both ids,
    # i.e. rows/cols 1..6 (36 pixels) minus the interior rows/cols 3..4 (4 pixels) = 32 pixels.
    instances = np.zeros((8, 8), dtype=np.uint8)
    instances[2:6, 2:6] = 1
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:7, 1:7] = True
    expected[3:5, 3:5] = False
    np.testing.assert_array_equal(synthetic.void_band(instances), expected)
    # The image edge is not a border: an object filling the left half has a band only along its right side.
    half = np.zeros((4, 6), dtype=np.uint8)
    half[:, :3] = 1
    assert synthetic.void_band(half)[:, [2, 3]].all() and synthetic.void_band(half).sum() == 8


def test_void_band_separates_all_labels(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    for image in summary["images"]:
        mask = _voc_mask(root, image["name"])
        assert (mask == 255).any()
        assert (mask == 255).mean() < 0.35
        # No two 8-connected labelled pixels carry different labels: void always lies between them.
        for a, b in (
            (mask[:, :-1], mask[:, 1:]),
            (mask[:-1, :], mask[1:, :]),
            (mask[:-1, :-1], mask[1:, 1:]),
            (mask[:-1, 1:], mask[1:, :-1]),
        ):
            labelled = (a != 255) & (b != 255)
            assert np.array_equal(a[labelled], b[labelled]), image["name"]


def test_images_vary_in_size_and_are_not_square(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    sizes = set()
    for image in summary["images"]:
        h, w = image["height"], image["width"]
        assert h != w and min(h, w) >= 64 and max(h, w) <= 96
        assert read_image(root / "JPEGImages" / f"{image['name']}.jpg").shape == (h, w, 3)
        assert _voc_mask(root, image["name"]).shape == (h, w)
        sizes.add((h, w))
    assert len(sizes) >= len(summary["images"]) // 2


def test_split_files_are_consistent(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    lists = {
        split: (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        for split in ("train_aug", "train", "val")
    }
    assert lists == summary["splits"]
    assert set(lists["train"]) <= set(lists["train_aug"])
    assert not set(lists["train_aug"]) & set(lists["val"])
    assert sorted(lists["train_aug"] + lists["val"]) == sorted(image["name"] for image in summary["images"])
    assert (len(lists["train_aug"]), len(lists["val"])) == (24, 8)
    assert len(lists["train"]) == round(0.14 * 24)  # = 3, VOC's train / train_aug ratio
    for name in lists["train_aug"] + lists["val"]:
        for folder, suffix in (("JPEGImages", "jpg"), ("SegmentationClassAug", "png"), ("Annotations", "xml")):
            assert (root / folder / f"{name}.{suffix}").is_file()


def test_class_styles_are_distinct() -> None:
    styles = synthetic.CLASS_STYLES
    assert tuple(styles) == VOC_CLASSES[1:]
    looks = {(s.shape, frozenset(s.colors), s.texture) for s in styles.values()}
    assert len(looks) == 20
    for style in styles.values():
        assert style.shape in synthetic.SHAPES and style.texture in synthetic.TEXTURES
        assert set(style.colors) <= set(synthetic.COLORS)


def test_objects_are_large_and_more_colourful_than_the_background(synthetic_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = synthetic_voc
    extents, object_sat, background_sat = [], [], []
    for image in summary["images"]:
        for obj in image["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            extents.append(max(x1 - x0 + 1, y1 - y0 + 1) / min(image["height"], image["width"]))
        rgb = read_image(root / "JPEGImages" / f"{image['name']}.jpg")
        saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float64)
        mask = _voc_mask(root, image["name"])
        object_sat.append(saturation[(mask > 0) & (mask < 255)].mean())
        background_sat.append(saturation[mask == 0].mean())
    # Visible extents (occlusion shrinks some): roughly 20–60 % of the short side on average.
    assert min(extents) >= 0.1 and 0.3 <= float(np.mean(extents)) <= 0.65
    # Muted backgrounds, saturated objects (white/black always come with a saturated colour).
    assert np.mean(object_sat) > 2.0 * np.mean(background_sat)


def test_render_scene_is_a_pure_function() -> None:
    first, second = synthetic.render_scene(7, 3, 48, 64), synthetic.render_scene(7, 3, 48, 64)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    # The label map is the instance map painted with class ids, void on the band.
    class_ids = np.array([0] + [obj.class_id for obj in first.objects])
    expected = np.where(first.band, 255, class_ids[first.instances])
    np.testing.assert_array_equal(first.label, expected)


def test_uncompressed_rle_known_answer() -> None:
    # Column-major [[0, 1], [1, 1], [0, 0]] is 0,1,0 | 1,1,0 -> runs 1 zero, 1 one, 1 zero, 2 ones, 1 zero.
    mask = np.array([[0, 1], [1, 1], [0, 0]], dtype=bool)
    assert synthetic.uncompressed_rle(mask) == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    # A mask starting with a one opens with an empty run of zeros.
    assert synthetic.uncompressed_rle(np.array([[1], [1], [0]], dtype=bool))["counts"] == [0, 2, 1]
    np.testing.assert_array_equal(segmentation_to_mask(synthetic.uncompressed_rle(mask), 3, 2), mask)


def test_coco_segmentation_uses_polygons_only_when_exact_enough() -> None:
    yy, xx = np.mgrid[0:40, 0:40]
    rho2 = (yy - 20) ** 2 + (xx - 20) ** 2
    for shape, expected_kind in ((rho2 <= 15**2, "polygon"), ((rho2 <= 15**2) & (rho2 >= 7**2), "rle")):
        band = synthetic.void_band(shape.astype(np.uint8))
        encoded = synthetic.coco_segmentation(shape, band, crowd=False)
        kind = "polygon" if isinstance(encoded["segmentation"], list) else "rle"
        assert kind == expected_kind  # the ring's hole cannot be a polygon
        decoded = segmentation_to_mask(encoded["segmentation"], 40, 40)
        assert not ((decoded != shape) & ~band).any()
        assert encoded["area"] == decoded.sum() and encoded["iscrowd"] == 0
    crowd = synthetic.coco_segmentation(rho2 <= 9, np.zeros((40, 40), bool), crowd=True)
    assert isinstance(crowd["segmentation"]["counts"], list) and crowd["iscrowd"] == 1


def test_coco_layout_has_the_official_structure(synthetic_coco: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    root, summary, _ = synthetic_coco
    kinds = set()
    annotation_ids = []
    for split in ("train", "val"):
        document = json.loads((root / "annotations" / f"instances_{split}2014.json").read_text())
        assert [(c["id"], c["name"]) for c in document["categories"]] == list(COCO_CATEGORIES)
        records = {image["name"]: image for image in summary["images"] if image["split"] == split}
        assert len(document["images"]) == len(records) == (24 if split == "train" else 8)
        images = {}
        for entry in document["images"]:
            assert set(entry) == {"id", "file_name", "height", "width"}
            assert re.fullmatch(rf"COCO_{split}2014_\d{{12}}\.jpg", entry["file_name"])
            path = root / "coco2014" / f"{split}2014" / entry["file_name"]
            assert read_image(path).shape == (entry["height"], entry["width"], 3)
            images[entry["id"]] = entry
        for ann in document["annotations"]:
            assert set(ann) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
            entry = images[ann["image_id"]]
            decoded = segmentation_to_mask(ann["segmentation"], entry["height"], entry["width"])
            assert ann["area"] == decoded.sum() > 0
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(decoded)
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert ann["category_id"] in COCO_ID_TO_LABEL
            annotation_ids.append(ann["id"])
            is_rle = isinstance(ann["segmentation"], dict)
            kinds.add("crowd" if ann["iscrowd"] else ("rle" if is_rle else "polygon"))
        # Annotations follow the generator's objects, in order, under their COCO names.
        for image_id, entry in images.items():
            names = [
                next(n for i, n in COCO_CATEGORIES if i == ann["category_id"])
                for ann in document["annotations"]
                if ann["image_id"] == image_id
            ]
            objects = records[Path(entry["file_name"]).stem]["objects"]
            assert names == [VOC_TO_COCO_NAME.get(o["class_name"], o["class_name"]) for o in objects]
    assert kinds == {"polygon", "rle", "crowd"}
    assert len(set(annotation_ids)) == len(annotation_ids)


def test_voc_and_coco_layouts_show_the_same_pictures(
    synthetic_voc: tuple[Path, dict[str, Any]], synthetic_coco: tuple[Path, dict[str, Any], dict[str, Any]]
) -> None:
    voc_root, voc_summary = synthetic_voc
    coco_root, coco_summary, _ = synthetic_coco
    for voc_image, coco_image in zip(voc_summary["images"], coco_summary["images"], strict=True):
        voc_jpeg = (voc_root / "JPEGImages" / f"{voc_image['name']}.jpg").read_bytes()
        coco_jpeg = (coco_root / "coco2014" / f"{coco_image['split']}2014" / f"{coco_image['name']}.jpg").read_bytes()
        assert voc_jpeg == coco_jpeg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": -1}, "num_val"),
        ({"layout": "cityscapes"}, "layout"),
        ({"min_size": 16}, "min_size"),
        ({"min_size": 64, "max_size": 64}, "max_size"),
        ({"workers": -2}, "workers"),
        ({"crowd_prob": 1.5}, "crowd_prob"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "out", **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        generate(tmp_path, **TINY)
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_cli_writes_the_requested_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / "coco"), "--layout", "coco", "--num-train", "3", "--num-val", "2", "--seed", "5"]
    assert make_synthetic.main([*args, "--min-size", "48", "--max-size", "60"]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert len(list((tmp_path / "coco" / "coco2014" / "train2014").glob("COCO_train2014_*.jpg"))) == 3
    assert len(list((tmp_path / "coco" / "coco2014" / "val2014").glob("COCO_val2014_*.jpg"))) == 2
    summary = json.loads((tmp_path / "coco" / "synthetic.json").read_text())
    assert (summary["layout"], summary["seed"], summary["num_images"]) == ("coco", 5, 5)
