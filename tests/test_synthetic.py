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
# The heldout family at its own image sizes (112..192): its objects are smaller, so it is not run at base's TINY sizes.
TINY_HELDOUT: dict[str, Any] = {"num_train": 5, "num_val": 2, "family": "heldout"}
TINY_OF = {"base": TINY, "heldout": TINY_HELDOUT}
# The heldout twin of conftest's session dataset (same counts and seed, the family's own sizes).
HELDOUT_ARGS: dict[str, Any] = {"num_train": 24, "num_val": 8, "seed": 0, "family": "heldout"}
FAMILY_NAMES = ("base", "heldout")

# Recorded with the generator as it was before families existed (commit f629eb5), by hashing what it drew: the base
# family must keep drawing exactly these, or the demo's and the ablations' numbers no longer hold for it.
# render_scene(seed, index, min_size, max_size) -> sha256 of image, instances, label, band (bytes then shape each)
# and the JPEG quality; and sha256 of the scene's JPEG bytes.
BASE_SCENE_HASHES: dict[tuple[int, int, int, int], tuple[str, str]] = {
    (0, 0, 96, 160): ("1a83d6e15337018e0654246ab4b3535da08afec4c5fe9b2d04ba47f5e5eb5f62",
                      "1743d63589ef232c82c5c458b5359a4e7643ca209b049090456a707c0f05148f"),
    (0, 7, 96, 160): ("1a0c26d10841440098232455ea33be59d3a5563993528c70fa4482e482a43bb5",
                      "9f24f1077b30732fd7a102390e41f8af9d32b754868ea79615c5d5638badd7fb"),
    (1, 3, 96, 160): ("52595921c4884fb3b328b7e717a487ff0f64c594182c024f2a0f8a4a0c4ade41",
                      "2ed7d5d467eb36f1263b8648d330f669510d850221b20dda0d81342a2c6c29b9"),
    (3, 11, 48, 64): ("e30105225f637c3a7e5d37ee24a68bc5fe07acd24174ddbb8914f2ab272fe448",
                      "a8003a8458fafa9db8bb76e503e24bfbdf98c73bb9ff864f559b1a2218adcfe4"),
    (5, 2, 64, 96): ("5d73b79eb019f6c90f50bbac6784cd9c6f3592c9c6c4f75f560704f6ad9c1708",
                     "ef79032fd88e27fbf8000441893c9b093681466bf02eff6e7f9d9dfc384045a8"),
    (0, 123, 96, 160): ("538ac78985cc09e7fa3546a4f877054254b8e1d443f8654e4c5dd1f85690576b",
                        "17df9719a46ad704c5b2f2f6dfb39e3b29a5c041ddc6b9e821af72de1d1d6249"),
}  # fmt: skip
# One digest of every file of a small dataset (BASE_TREE_ARGS; synthetic.json without its new "family" key).
BASE_TREE_ARGS: dict[str, Any] = {"num_train": 6, "num_val": 3, "seed": 2, "min_size": 64, "max_size": 96}
BASE_TREE_HASHES = {
    "voc": "45c6ddcd4721b10d3204915e45ee4a3634e6942583905a07518a1e697cf5b755",  # with num_test=2
    "coco": "d069c4ccbb408d04e67dc6f913a01765d4fd5ffaaa97afcf249224043c37e5d7",  # with crowd_prob=0.3
}


def _hash_tree(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _voc_mask(root: Path, name: str) -> np.ndarray:
    return read_label_png(root / "SegmentationClassAug" / f"{name}.png")


def _scene_digest(scene: synthetic.Scene) -> str:
    digest = hashlib.sha256()
    for array in (scene.image, scene.instances, scene.label, scene.band):
        digest.update(array.tobytes())
        digest.update(str(array.shape).encode())
    digest.update(str(scene.jpeg_quality).encode())
    return digest.hexdigest()


def _tree_digest(root: Path) -> str:
    """One sha256 over the files of ``root``; synthetic.json is hashed without its ``family`` key, which the summary
    gained with the families (the recorded digests predate it)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "synthetic.json":
                summary = json.loads(data)
                summary.pop("family")
                data = json.dumps(summary, indent=1).encode()
            digests[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def heldout_voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(root, summary) of a small heldout-family dataset in the VOC layout."""
    root = tmp_path_factory.mktemp("heldout_voc") / "VOC2012"
    return root, generate(root, layout="voc", **HELDOUT_ARGS)


@pytest.fixture(params=FAMILY_NAMES)
def family_voc(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any]]:
    """The session's base dataset (conftest) and its heldout twin: the invariants hold for every family."""
    return request.getfixturevalue("synthetic_voc" if request.param == "base" else "heldout_voc")


def test_datasets_package_is_ours() -> None:
    # A PyPI package called `datasets` would shadow ours and break every import of datasets.*.
    assert Path(datasets.__file__).resolve().parent == REPO / "datasets"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path: Path, family: str) -> None:
    generate(tmp_path / "serial", seed=3, workers=0, **TINY_OF[family])
    generate(tmp_path / "pooled", seed=3, workers=2, **TINY_OF[family])
    generate(tmp_path / "again", seed=3, workers=0, **TINY_OF[family])
    serial, pooled = _hash_tree(tmp_path / "serial"), _hash_tree(tmp_path / "pooled")
    # 7 JPEGs + 7 Aug masks + 7 XMLs + SegmentationClass for train (round(0.14 * 5) = 1) and val (2) = 3,
    # + 3 split lists + synthetic.json = 28 files.
    assert len(serial) == 28
    assert serial == pooled == _hash_tree(tmp_path / "again")
    assert json.loads((tmp_path / "serial" / "synthetic.json").read_text())["family"] == family


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_different_seed_changes_every_image(tmp_path: Path, family: str) -> None:
    generate(tmp_path / "seed0", seed=0, **TINY_OF[family])
    generate(tmp_path / "seed1", seed=1, **TINY_OF[family])
    first, second = _hash_tree(tmp_path / "seed0"), _hash_tree(tmp_path / "seed1")
    jpegs = [key for key in first if key.endswith(".jpg")]
    assert len(jpegs) == 7
    assert all(first[key] != second[key] for key in jpegs)


def test_every_recorded_object_is_in_the_mask(family_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = family_voc
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


def test_dataset_uses_many_classes_and_up_to_max_objects(family_voc: tuple[Path, dict[str, Any]]) -> None:
    _, summary = family_voc
    counts = [len(image["objects"]) for image in summary["images"]]
    # base: up to 3 objects, heldout: up to 4
    assert min(counts) >= 1 and max(counts) == synthetic.FAMILIES[summary["family"]].max_objects
    assert sum(1 for n in summary["class_counts"].values() if n > 0) >= 15
    assert summary["num_objects"] == sum(counts)


def test_xml_lists_exactly_the_mask_classes(family_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = family_voc
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


def test_masks_are_voc_palette_pngs(family_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = family_voc
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


def test_void_band_separates_all_labels(family_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = family_voc
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


def test_images_vary_in_size_and_are_not_square(family_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = family_voc
    sizes = set()
    for image in summary["images"]:
        h, w = image["height"], image["width"]
        # conftest's 64..96 for base, the family's default 112..192 for heldout
        assert h != w and min(h, w) >= summary["min_size"] and max(h, w) <= summary["max_size"]
        assert read_image(root / "JPEGImages" / f"{image['name']}.jpg").shape == (h, w, 3)
        assert _voc_mask(root, image["name"]).shape == (h, w)
        sizes.add((h, w))
    assert len(sizes) >= len(summary["images"]) // 2


def test_split_files_are_consistent(family_voc: tuple[Path, dict[str, Any]]) -> None:
    root, summary = family_voc
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


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_class_styles_are_distinct(family: str) -> None:
    look = synthetic.FAMILIES[family]
    styles = look.styles
    assert tuple(styles) == VOC_CLASSES[1:]
    looks = {(s.shape, frozenset(s.colors), s.texture) for s in styles.values()}
    assert len(looks) == 20
    for style in styles.values():
        assert style.shape in synthetic.SHAPES and style.texture in synthetic.TEXTURES
        assert set(style.colors) <= set(look.colors)
    assert synthetic.FAMILIES["base"].styles is synthetic.CLASS_STYLES


def test_heldout_styles_share_nothing_with_base() -> None:
    base, heldout = synthetic.FAMILIES["base"], synthetic.FAMILIES["heldout"]
    base_shapes = {s.shape for s in base.styles.values()}
    base_textures = {s.texture for s in base.styles.values()}
    assert not base_shapes & {s.shape for s in heldout.styles.values()}
    assert not base_textures & {s.texture for s in heldout.styles.values()}
    assert not set(base.colors) & set(heldout.colors)
    # Every heldout colour pair is its own, and classes sharing a shape differ in both colours and the texture.
    pairs = [frozenset(s.colors) for s in heldout.styles.values()]
    assert len(set(pairs)) == 20 and all(len(pair) == 2 for pair in pairs)
    rows = list(heldout.styles.values())
    for i, first in enumerate(rows):
        for second in rows[i + 1 :]:
            if first.shape == second.shape:
                assert not set(first.colors) & set(second.colors) and first.texture != second.texture


def test_base_family_draws_what_it_drew_before_families_existed(tmp_path: Path) -> None:
    for (seed, index, min_size, max_size), (scene_hash, jpeg_hash) in BASE_SCENE_HASHES.items():
        scene = synthetic.render_scene(seed, index, min_size, max_size)
        assert _scene_digest(scene) == scene_hash, (seed, index)
        assert hashlib.sha256(synthetic.encode_jpeg(scene.image, scene.jpeg_quality)).hexdigest() == jpeg_hash
        assert _scene_digest(synthetic.render_scene(seed, index, min_size, max_size, family="base")) == scene_hash
    # The defaults are base's 96..160.
    assert _scene_digest(synthetic.render_scene(0, 7)) == BASE_SCENE_HASHES[(0, 7, 96, 160)][0]
    generate(tmp_path / "voc", num_test=2, **BASE_TREE_ARGS)
    generate(tmp_path / "coco", layout="coco", crowd_prob=0.3, **BASE_TREE_ARGS)
    for layout, expected in BASE_TREE_HASHES.items():
        assert json.loads((tmp_path / layout / "synthetic.json").read_text())["family"] == "base"
        assert _tree_digest(tmp_path / layout) == expected, layout


def test_heldout_differs_from_base_for_the_same_seed_and_index() -> None:
    for seed, index in ((0, 0), (0, 7), (1, 3), (5, 2)):
        base = synthetic.render_scene(seed, index)
        heldout = synthetic.render_scene(seed, index, family="heldout")
        assert base.image.shape != heldout.image.shape or not np.array_equal(base.image, heldout.image)
        h, w = heldout.label.shape
        assert min(h, w) >= 112 and max(h, w) <= 192 and h != w
        assert all(obj.style is synthetic.HELDOUT_STYLES[VOC_CLASSES[obj.class_id]] for obj in heldout.objects)
        # At the same size the two families still draw other pictures (independent streams, other looks).
        base_same = synthetic.render_scene(seed, index, 112, 192)
        assert base_same.image.shape != heldout.image.shape or not np.array_equal(base_same.image, heldout.image)


def test_every_heldout_class_appears_in_a_200_image_train_split(tmp_path: Path) -> None:
    summary = generate(tmp_path / "heldout", num_train=200, num_val=0, seed=1, family="heldout")
    assert summary["family"] == "heldout" and len(summary["splits"]["train_aug"]) == 200
    assert (summary["min_size"], summary["max_size"]) == (112, 192)
    train = [image for image in summary["images"] if image["split"] == "train"]
    counts = dict.fromkeys(VOC_CLASSES[1:], 0)
    for image in train:
        for obj in image["objects"]:
            counts[obj["class_name"]] += 1
    assert counts == summary["class_counts"]
    assert min(counts.values()) > 0, counts


def test_heldout_voc_and_coco_layouts_show_the_same_pictures(tmp_path: Path) -> None:
    voc = generate(tmp_path / "voc", seed=4, **TINY_HELDOUT)
    coco = generate(tmp_path / "coco", seed=4, layout="coco", **TINY_HELDOUT)
    for voc_image, coco_image in zip(voc["images"], coco["images"], strict=True):
        voc_jpeg = (tmp_path / "voc" / "JPEGImages" / f"{voc_image['name']}.jpg").read_bytes()
        split = coco_image["split"]
        coco_jpeg = (tmp_path / "coco" / "coco2014" / f"{split}2014" / f"{coco_image['name']}.jpg").read_bytes()
        assert voc_jpeg == coco_jpeg


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


@pytest.mark.parametrize(("family", "sizes"), [("base", (48, 64)), ("heldout", (112, 192))])
def test_render_scene_is_a_pure_function(family: str, sizes: tuple[int, int]) -> None:
    first, second = (synthetic.render_scene(7, 3, *sizes, family=family) for _ in range(2))
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
        ({"family": "voc"}, "family"),
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
    assert summary["family"] == "base"


def test_cli_writes_the_heldout_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_synthetic.main([str(tmp_path / "h"), "--family", "heldout", "--num-train", "3", "--num-val", "1"]) == 0
    assert "of the heldout family" in capsys.readouterr().out
    summary = json.loads((tmp_path / "h" / "synthetic.json").read_text())
    assert (summary["family"], summary["min_size"], summary["max_size"]) == ("heldout", 112, 192)
    # The CLI and generate() draw the same pictures.
    direct = generate(tmp_path / "direct", num_train=3, num_val=1, family="heldout")
    assert _hash_tree(tmp_path / "h") == _hash_tree(tmp_path / "direct") and direct == summary
