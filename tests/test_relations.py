"""Tests for core/relations.py and tools/make_relations.py (SPEC §9: IRN relation labels)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from pydensecrf.utils import unary_from_labels

from core.camfile import read_cams
from core.relations import combine_relations, label_probabilities, relation_label, relation_unaries
from datasets import build_dataset
from tests.user_errors import user_error_line
from tools import make_relations
from utils.config import load_config, save_config
from utils.crf import dense_crf
from utils.io import read_image, read_label_png, save_npz

IGN = 255
# The SPEC §9 DenseCRF (irn.crf_* defaults) with few iterations, to keep the tests fast.
SPEC_CRF = {"gauss_sxy": 3.0, "gauss_compat": 3, "bilateral_sxy": 50.0, "bilateral_srgb": 5.0, "bilateral_compat": 10}
SPEC = {"fg_thre": 0.30, "bg_thre": 0.05, "gt_prob": 0.7}

# ----------------------------------------------------------------------------------------------------------------------
# The label unary
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_label_probabilities_are_the_label_unary_of_pydensecrf(n: int) -> None:
    label = np.random.default_rng(n).integers(0, n, size=(5, 7)).astype(np.uint8)
    prob = label_probabilities(label, n, 0.7)
    assert prob.shape == (n, 5, 7) and prob.dtype == np.float32
    expected = np.full((n, 5, 7), 0.3 / (n - 1))
    np.put_along_axis(expected, label[None].astype(np.int64), 0.7, axis=0)
    np.testing.assert_allclose(prob, expected, rtol=1e-7)
    unary = unary_from_labels(label, n, 0.7, zero_unsure=False).reshape(n, 5, 7)
    np.testing.assert_allclose(-np.log(prob), unary, rtol=1e-6)  # float32 precision (here: bit for bit)


def test_dense_crf_of_label_probabilities_is_the_label_unary_crf() -> None:
    # utils.crf.dense_crf on label_probabilities = pydensecrf set up by hand with unary_from_labels.
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(12, 10)).astype(np.uint8)
    image = rng.integers(0, 256, size=(12, 10, 3)).astype(np.uint8)
    params = {"iters": 3, **SPEC_CRF}
    crf = dcrf.DenseCRF2D(10, 12, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_labels(label, 3, 0.7, zero_unsure=False)))
    crf.addPairwiseGaussian(sxy=3.0, compat=3)
    crf.addPairwiseBilateral(sxy=50.0, srgb=5.0, rgbim=image, compat=10)
    expected = np.asarray(crf.inference(3), dtype=np.float32).reshape(3, 12, 10)
    np.testing.assert_allclose(dense_crf(image, label_probabilities(label, 3, 0.7), **params), expected, atol=1e-6)


def test_label_probabilities_of_one_label_and_bad_input() -> None:
    np.testing.assert_array_equal(label_probabilities(np.zeros((2, 3), np.int64), 1, 0.7), np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.1"):
        label_probabilities(np.full((2, 2), 2), 2, 0.7)
    with pytest.raises(ValueError, match=r"gt_prob must be in \(0, 1\)"):
        label_probabilities(np.zeros((2, 2), np.uint8), 2, 1.0)
    with pytest.raises(ValueError, match="integer"):
        label_probabilities(np.zeros((2, 2)), 2, 0.7)


# ----------------------------------------------------------------------------------------------------------------------
# Relation labels: known answers
# ----------------------------------------------------------------------------------------------------------------------


def _nested_squares(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """An image of a bright square (rows/cols 12..27) in a grey ring (8..31) on black, and its truth: class 7 in the
    square, the ignore band on the ring, background outside."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[8:32, 8:32] = 100
    image[12:28, 12:28] = 200
    truth = np.zeros((size, size), dtype=np.uint8)
    truth[8:32, 8:32] = IGN
    truth[12:28, 12:28] = 7
    return image, truth


def _square_cam(shift: int = 0) -> np.ndarray:
    """A CAM [1, 40, 40] over the squares of :func:`_nested_squares`, moved ``shift`` pixels up-left: 0.9 on the
    square (> 0.30: confident foreground), 0.15 on the ring (0.05 < 0.15 <= 0.30: foreground for the low plane
    only, so unsure), 0 outside (background for both)."""
    cam = np.zeros((1, 40, 40), dtype=np.float32)
    cam[0, 8 - shift : 32 - shift, 8 - shift : 32 - shift] = 0.15
    cam[0, 12 - shift : 28 - shift, 12 - shift : 28 - shift] = 0.9
    return cam


def test_relation_label_of_a_bright_square_known_answer() -> None:
    # The image follows the CAM's squares, so the CRF keeps them: 16·16 = 256 pixels of class 7, 24·24 − 256 = 320
    # ignored, 1600 − 576 = 1024 background.
    image, truth = _nested_squares()
    label = relation_label(_square_cam(), [7], image, **SPEC, crf_params={"iters": 2, **SPEC_CRF})
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, truth)
    assert (label == 7).sum() == 256 and (label == IGN).sum() == 320 and (label == 0).sum() == 1024


def test_relation_label_crf_snaps_a_shifted_cam_to_the_image() -> None:
    # The same CAM shifted 2 px up-left: without the CRF 2·(2·16) − 4 = 60 square pixels are missing and 60 extra
    # (and likewise on the ring); the label-unary CRF (unary −log 0.7 vs −log 0.3: 0.85 nats) follows the colour
    # edges exactly after 2 mean-field iterations.
    image, truth = _nested_squares()
    cam = _square_cam(shift=2)
    fg, bg = relation_unaries(cam, **SPEC)
    uncorrected = combine_relations(fg, bg, [7])  # the unaries' own arg-max: the shifted squares
    assert ((uncorrected == 7) != (truth == 7)).sum() == 120
    label = relation_label(cam, [7], image, **SPEC, crf_params={"iters": 2, **SPEC_CRF})
    np.testing.assert_array_equal(label, truth)


def test_relation_label_maps_slots_back_to_class_ids() -> None:
    # Two classes (ids 3 and 12) side by side, each CAM confident on its own half and weak (0.2: unsure) on the
    # other's; pixel columns 0..9 are class 3, 10..19 class 12. A weak 0.2 on an otherwise empty CAM would be the
    # ignore band, but here the other class is confident there, so every pixel is foreground.
    image = np.zeros((8, 20, 3), dtype=np.uint8)
    image[:, 10:] = (0, 0, 255)
    cam = np.full((2, 8, 20), 0.2, dtype=np.float32)
    cam[0, :, :10] = 0.8
    cam[1, :, 10:] = 0.8
    label = relation_label(cam, [3, 12], image, **SPEC, crf_params={"iters": 2, **SPEC_CRF})
    expected = np.where(np.arange(20) < 10, 3, 12)[None].repeat(8, axis=0)
    np.testing.assert_array_equal(label, expected)


def test_combine_relations_rule_and_ties() -> None:
    # Channel 0 = background; ties go to background, then to the first class.
    fg = np.array([[[0.5, 0.2, 0.2, 0.6]], [[0.5, 0.8, 0.4, 0.2]], [[0.0, 0.0, 0.4, 0.2]]], dtype=np.float32)
    bg = np.array([[[0.1, 0.1, 0.9, 0.1]], [[0.9, 0.9, 0.1, 0.1]], [[0.0, 0.0, 0.0, 0.8]]], dtype=np.float32)
    # pixel 0: fg tie -> bg, bg map fg -> ignore; 1: fg class 4; 2: fg tie between the classes -> class 4;
    # 3: fg bg, bg map class 9 -> ignore. A pixel bg in both:
    np.testing.assert_array_equal(combine_relations(fg, bg, [4, 9]), [[IGN, 4, 4, IGN]])
    both_bg = np.array([[[0.9]], [[0.1]]], dtype=np.float32)
    np.testing.assert_array_equal(combine_relations(both_bg, both_bg, [4], ignore_index=200), [[0]])
    np.testing.assert_array_equal(combine_relations(fg[:2], bg[:2], [4], ignore_index=200), [[200, 4, 4, 0]])


def test_no_present_class_is_all_background() -> None:
    image = np.zeros((6, 5, 3), dtype=np.uint8)
    label = relation_label(np.zeros((0, 6, 5), np.float32), [], image, **SPEC, crf_params={"iters": 1})
    np.testing.assert_array_equal(label, np.zeros((6, 5), np.uint8))
    fg, bg = relation_unaries(np.zeros((0, 6, 5), np.float32), **SPEC)
    np.testing.assert_array_equal(fg, np.ones((1, 6, 5)))
    np.testing.assert_array_equal(bg, np.ones((1, 6, 5)))
    with pytest.raises(ValueError, match=r"cam must be \[K=1"):
        relation_label(np.zeros((2, 6, 5), np.float32), [3], image, **SPEC, crf_params={"iters": 1})


# ----------------------------------------------------------------------------------------------------------------------
# The tool, on hand-made CAMs (no training needed: it reads only the config, RUN/cams and the images)
# ----------------------------------------------------------------------------------------------------------------------

FAST = ["irn.crf_iters=2", "eval.crf_workers=0"]


@pytest.fixture(scope="module")
def cam_run(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A run folder with config.yaml and RUN/cams/val made from the ground truth (the first id with no class);
    returns (run, ids)."""
    run = tmp_path_factory.mktemp("relations_run")
    cfg = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={run}"])
    save_config(cfg, run)
    dataset = build_dataset(cfg, "val", "eval")
    for index, name in enumerate(dataset.ids):
        item = dataset[index]
        mask = item["mask"].numpy()
        classes = (torch.nonzero(item["label"]).flatten() + 1).numpy() if index else np.zeros(0, np.int64)
        # CAM of class c: 0.9 on its pixels, 0.15 (the unsure band) on the 3 columns right of them, 0 elsewhere
        cam = np.zeros((len(classes), *mask.shape), dtype=np.float32)
        for k, c in enumerate(classes):
            own = mask == c
            near = np.zeros_like(own)
            for shift in (1, 2, 3):
                near[:, shift:] |= own[:, :-shift]
            cam[k] = np.where(own, 0.9, np.where(near, 0.15, 0.0))
        save_npz(run / "cams" / "val" / f"{name}.npz", {"classes": classes.astype(np.int16),
                 "cam": cam.astype(np.float16), "cam_aux": (cam / 2).astype(np.float16)})  # fmt: skip
    return run, list(dataset.ids)


def _outputs(run: Path) -> Path:
    return run / "relations" / "val"


def test_relation_crf_params_read_the_irn_keys(cam_run) -> None:
    run, _ = cam_run
    assert make_relations.relation_crf_params(load_config(run / "config.yaml")) == {"iters": 10, **SPEC_CRF}
    options = make_relations.Options.from_config(load_config(run / "config.yaml"))
    assert (options.fg_thre, options.bg_thre, options.gt_prob, options.cam_key) == (0.3, 0.05, 0.7, "cam")


def test_tool_matches_the_pure_function_and_resumes(cam_run, capsys) -> None:
    run, ids = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    summary = make_relations.make_relations(load_config(run / "config.yaml", FAST))
    assert (summary["processed"], summary["skipped"], summary["total"]) == (len(ids), 0, len(ids))
    cfg = load_config(run / "config.yaml")
    dataset = build_dataset(cfg, "val", "eval")
    counts = np.zeros(3, dtype=np.int64)  # foreground, background, ignored
    for index, name in enumerate(ids):
        label = read_label_png(_outputs(run) / f"{name}.png")
        cams = read_cams(run / "cams" / "val" / f"{name}.npz")
        image = read_image(dataset.image_paths[index])
        expected = relation_label(cams.cam, cams.classes, image, **SPEC, crf_params={"iters": 2, **SPEC_CRF})
        np.testing.assert_array_equal(label, expected)
        assert set(np.unique(label).tolist()) <= {0, IGN, *cams.classes.tolist()}
        if index == 0:  # no class: all background
            assert not label.any()
        counts += ((label != 0) & (label != IGN)).sum(), (label == 0).sum(), (label == IGN).sum()
    assert counts.min() > 0  # every kind of pixel occurs
    fractions = counts / counts.sum()
    assert [summary[k] for k in ("foreground", "background", "ignored")] == pytest.approx(fractions.tolist())
    # resume: everything is skipped, nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in _outputs(run).rglob("*")}
    again = make_relations.make_relations(load_config(run / "config.yaml", FAST))
    assert (again["processed"], again["skipped"]) == (0, len(ids))
    assert {p: p.stat().st_mtime_ns for p in _outputs(run).rglob("*")} == mtimes
    # other settings are refused, naming the key
    refused = _user_error(capsys, ["--run-dir", str(run), *FAST, "irn.fg_thre=0.4"])
    assert "holds outputs made with other settings" in refused and "fg_thre: 0.3 -> 0.4" in refused
    refused = _user_error(capsys, ["--run-dir", str(run), "irn.crf_iters=3", "eval.crf_workers=0"])
    assert "crf_params" in refused and "'iters': 2" in refused
    refused = _user_error(capsys, ["--run-dir", str(run), *FAST, "pseudo.cam_key=cam_aux"])
    assert "cam_key: 'cam' -> 'cam_aux'" in refused


def test_crf_stream_keeps_order_with_items_that_send_no_job() -> None:
    # Items without a class send no CRF job. Whatever the pool's look-ahead, every item comes out once, in input
    # order, with its own two refined maps.
    class EagerPool:  # submits every job before returning any result (maximal look-ahead)
        def imap(self, jobs):
            queued = list(jobs)
            for key, image, prob in queued:
                yield key, dense_crf(image, prob, iters=1)

    image = np.zeros((4, 4, 3), np.uint8)

    def item(name: str, classes: list[int]) -> make_relations.Item:
        maps = relation_unaries(np.random.default_rng(len(name)).random((len(classes), 4, 4)), **SPEC)
        return make_relations.Item(name, np.array(classes), image if classes else None, maps)

    items = [item("e0", []), item("a", [1]), item("e1", []), item("e2", []), item("bb", [2, 5]), item("ccc", [3]),
             item("e3", [])]  # fmt: skip
    expected = {i.name: [dense_crf(image, m, iters=1) for m in i.maps] for i in items if len(i.classes)}
    out = list(make_relations.crf_stream(iter(items), EagerPool()))
    assert [i.name for i in out] == ["e0", "a", "e1", "e2", "bb", "ccc", "e3"]
    for i in out:
        if i.name in expected:
            for got, want in zip(i.maps, expected[i.name], strict=True):
                np.testing.assert_array_equal(got, want)
        else:
            assert [m.shape for m in i.maps] == [(1, 4, 4)] * 2


def test_tool_errors_name_the_missing_cams_and_bad_settings(cam_run, tmp_path: Path, capsys) -> None:
    run, ids = cam_run
    other = tmp_path / "run"
    other.mkdir()
    shutil.copy(run / "config.yaml", other / "config.yaml")
    message = _user_error(capsys, ["--run-dir", str(other), *FAST])
    assert re.search(r"no CAM files in .*cams/val.*`python -m tools\.make_cam --run-dir .*` \(eval\.split=val\)",
                     message), message  # fmt: skip
    (other / "cams" / "val").mkdir(parents=True)
    shutil.copy(run / "cams" / "val" / f"{ids[0]}.npz", other / "cams" / "val")
    message = _user_error(capsys, ["--run-dir", str(other), *FAST])
    assert re.search(rf"{len(ids) - 1} id\(s\) .*no CAM file.*{ids[1]}", message), message
    assert not (other / "relations").exists()
    for name in ids[1:]:  # all CAM files, one of them (of a class) the wrong size
        shutil.copy(run / "cams" / "val" / f"{name}.npz", other / "cams" / "val")
    cams = read_cams(other / "cams" / "val" / f"{ids[1]}.npz")
    save_npz(other / "cams" / "val" / f"{ids[1]}.npz", {"classes": cams.classes.astype(np.int16),
             "cam": cams.cam[:, 1:].astype(np.float16), "cam_aux": cams.cam_aux[:, 1:].astype(np.float16)})  # fmt: skip
    message = _user_error(capsys, ["--run-dir", str(other), *FAST])
    assert re.search(rf"image .*{ids[1]}\.jpg .*CAM file .*{ids[1]}\.npz.* is \d+×\d+ but its CAMs are", message)
    message = _user_error(capsys, ["--run-dir", str(run), *FAST, "irn.fg_thre=0.05", "irn.bg_thre=0.3"])
    assert "irn.bg_thre (0.3) must not exceed irn.fg_thre (0.05)" in message


def _user_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the tool's main on ``argv``; it must fail as a user error (:func:`tests.user_errors.user_error_line`)."""
    return user_error_line(make_relations.main, argv, capsys)
