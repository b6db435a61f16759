"""Tests for core/pseudo_labels.py and tools/make_pseudo_labels.py (SPEC §2.4, §2.5)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.camfile import cam_arrays, read_cams
from core.labels import cam_label, online_seg_labels
from core.pseudo_labels import (
    dual_label,
    hard_label,
    load_soft_label,
    pseudo_label,
    score_stacks,
    soft_label,
    stack_probabilities,
)
from core.random_walk import grid_size, propagate
from datasets import build_dataset
from models.par import PAR
from tests.user_errors import user_error_line
from tools import make_pseudo_labels
from utils.config import config_from_args, load_config, save_config
from utils.io import load_npz, read_label_png, save_label_png, save_npz, voc_palette
from utils.outputs import check_settings

IGN = 255
NUM_CLASSES = 21  # VOC, background included (configs/smoke.yaml inherits it)

# ----------------------------------------------------------------------------------------------------------------------
# Hard labels: known answers
# ----------------------------------------------------------------------------------------------------------------------


def test_single_threshold_known_answer_with_ties_to_background() -> None:
    # Two present classes (3, 7) on a 1×5 strip, background plane at 0.5:
    #   px0 max 0.2 ≤ 0.5 → 0;  px1 max 0.7 (class 7) → 7;  px2 0.5 ties the plane → 0 (background wins ties);
    #   px3 max 0.9 (class 3) → 3;  px4 0.8 = 0.8 ties between classes → the first, 3.
    cam = np.array([[[0.2, 0.6, 0.5, 0.9, 0.8]], [[0.1, 0.7, 0.5, 0.3, 0.8]]], dtype=np.float32)
    expected = np.array([[0, 7, 0, 3, 3]], dtype=np.uint8)
    label = pseudo_label(cam, [3, 7], bkg_thre=0.5)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(label, cam_label(cam, np.array([3, 7]), 0.5))  # the one rule, as CAM evaluation


def test_dual_threshold_band_is_ignored() -> None:
    # high 0.7, low 0.25, one class (id 4). v ≤ low → 0 (0.25 ties low: background in both stacks); low < v ≤ high
    # → 255 (label_h background, label_l foreground; 0.7 ties high: background in label_h); v > high → 4.
    cam = np.array([[[0.1, 0.25, 0.3, 0.5, 0.7, 0.71, 1.0]]], dtype=np.float32)
    expected = np.array([[0, 0, IGN, IGN, IGN, 4, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(pseudo_label(cam, [4], high=0.7, low=0.25, dual=True), expected)
    np.testing.assert_array_equal(pseudo_label(cam, [4], high=0.7, low=0.25, dual=True, ignore_index=254),
                                  np.where(expected == IGN, 254, expected))  # data.ignore_index  # fmt: skip


def test_dual_label_rule() -> None:
    label_h = np.array([[0, 0, 5, 5]], dtype=np.uint8)
    label_l = np.array([[0, 5, 5, 6]], dtype=np.uint8)
    # foreground of label_h wins; both background → 0; label_h background but label_l not → 255
    np.testing.assert_array_equal(dual_label(label_h, label_l), [[0, IGN, 5, 5]])


def test_class_masking_keeps_only_present_classes() -> None:
    # cam_arrays (core.camfile, the file tools.make_cam writes) keeps the channels of the image's labels only: the
    # absent class 2 has the largest scores everywhere, yet no pixel may take its id; the present class 4 (index 3)
    # wins where it beats 0.5.
    cam = torch.zeros(4, 2, 3)
    cam[1] = 1.0  # absent class id 2
    cam[3, 0] = 0.8  # present class id 4, first row
    label = torch.tensor([0.0, 0.0, 0.0, 1.0])
    arrays = cam_arrays(cam, cam.clone(), label)
    assert arrays["classes"].tolist() == [4] and arrays["cam"].shape == (1, 2, 3)
    out = pseudo_label(arrays["cam"].astype(np.float32), arrays["classes"], bkg_thre=0.5)
    np.testing.assert_array_equal(out, [[4, 4, 4], [0, 0, 0]])


def test_no_present_class_is_all_background() -> None:
    empty = np.zeros((0, 3, 4), dtype=np.float32)
    for dual in (False, True):
        np.testing.assert_array_equal(pseudo_label(empty, [], dual=dual), np.zeros((3, 4), np.uint8))
    # refinement is skipped (nothing to refine), so no image is needed
    np.testing.assert_array_equal(pseudo_label(empty, [], par=PAR((1,), 1)), np.zeros((3, 4), np.uint8))


def test_hard_label_labels_refined_stacks_by_their_background_channel() -> None:
    # probs [S=2, K+1=2, 1, 4]: stack 0 (high) and stack 1 (low); ties go to the background channel.
    probs = np.array([[[[0.6, 0.5, 0.3, 0.2]], [[0.4, 0.5, 0.7, 0.8]]],
                      [[[0.2, 0.5, 0.1, 0.1]], [[0.8, 0.5, 0.9, 0.9]]]], dtype=np.float32)  # fmt: skip
    cam = np.zeros((1, 1, 4), np.float32)  # not used when probs are given
    np.testing.assert_array_equal(hard_label(cam, [6], (0.7,), False, probs), [[0, 0, 6, 6]])
    np.testing.assert_array_equal(hard_label(cam, [6], (0.7, 0.25), True, torch.from_numpy(probs)), [[IGN, 0, 6, 6]])
    with pytest.raises(ValueError, match="dual needs 2 stacks"):
        hard_label(cam, [6], (0.7,), True)


def test_pseudo_label_rejects_mismatched_classes() -> None:
    with pytest.raises(ValueError, match=r"K=2"):
        pseudo_label(np.zeros((1, 2, 2)), [1, 2])


# ----------------------------------------------------------------------------------------------------------------------
# Refinement
# ----------------------------------------------------------------------------------------------------------------------


def _square_scene(size: int = 32, lo: int = 8, hi: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A crisp CAM (1 inside a square, 0 outside) and an image whose colours follow the same square."""
    cam = np.zeros((1, size, size), dtype=np.float32)
    cam[0, lo:hi, lo:hi] = 1.0
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 2] = 200  # blue background
    image[lo:hi, lo:hi] = (220, 30, 30)  # red square
    return cam, image


def test_par_keeps_a_crisp_label_crisp() -> None:
    # The square's edges lie on even pixels, so the ×0.5 downsampling of the §2.4 recipe is exact, and PAR never
    # averages across the colour edge: the refined label equals the unrefined one pixel for pixel.
    # Margin: at a square corner, bilinear upsampling mixes 9/16 of the inside probability with 7/16 of the outside
    # one. With a plane at t, p_fg = σ(1 − t) inside and σ(−t) outside; t = 0.5 gives 9/16·0.622 + 7/16·0.378 = 0.515
    # > ½ (t = 0.7 would give 0.468 < ½, losing the four corner pixels to the recipe's upsampling, not to PAR).
    cam, image = _square_scene()
    par = PAR((1, 2, 4, 8, 12, 24), 10)
    for dual in (False, True):
        plain = pseudo_label(cam, [5], bkg_thre=0.5, high=0.5, low=0.25, dual=dual)
        refined = pseudo_label(cam, [5], image, bkg_thre=0.5, high=0.5, low=0.25, dual=dual, par=par)
        assert set(np.unique(plain)) == {0, 5}
        np.testing.assert_array_equal(refined, plain)


def test_refinement_snaps_a_shifted_cam_to_the_image_edges() -> None:
    # The CAM square is shifted 2 px up-left of the image's red square: unrefined, 2·(2·16) − 4 = 60 pixels are
    # missing and 60 extra (120 wrong). DenseCRF's bilateral kernel (weak unaries: σ(±0.5) = 0.62 / 0.38) pulls the
    # label onto the colour edges exactly; PAR (convex averaging over similar colours) fixes almost all of it.
    _, image = _square_scene()
    cam = np.zeros((1, 32, 32), dtype=np.float32)
    cam[0, 6:22, 6:22] = 1.0
    truth = np.zeros((32, 32), dtype=np.uint8)
    truth[8:24, 8:24] = 5
    assert (pseudo_label(cam, [5], bkg_thre=0.5) != truth).sum() == 120
    params = {"iters": 5, "gauss_sxy": 1.0, "gauss_compat": 1, "bilateral_sxy": 20.0, "bilateral_srgb": 5.0,
              "bilateral_compat": 4}  # fmt: skip
    np.testing.assert_array_equal(pseudo_label(cam, [5], image, bkg_thre=0.5, crf_params=params), truth)
    with_par = pseudo_label(cam, [5], image, bkg_thre=0.5, par=PAR((1, 2, 4, 8, 12, 24), 10))
    assert (with_par != truth).sum() <= 8


def test_dual_par_matches_online_seg_labels() -> None:
    # The offline dual + PAR path is the §2.4 recipe: on one image with its full box it must agree with
    # core.labels.online_seg_labels, the online implementation used in training.
    gen = torch.Generator().manual_seed(0)
    num_fg, h, w = 6, 24, 20
    present = [1, 4]  # class ids 2 and 5
    cam_full = torch.zeros(1, num_fg, h, w)
    # random maps fading to 0 on the left, so background, ignore band and both classes all occur
    cam_full[0, present] = torch.rand(len(present), h, w, generator=gen) * torch.linspace(0, 1, w)
    labels = torch.zeros(1, num_fg)
    labels[0, present] = 1
    image = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    image01 = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    par = PAR((1, 2, 4), 3)
    online = online_seg_labels(cam_full, labels, image01, torch.tensor([[0, h, 0, w]]), par, high=0.6, low=0.3)
    offline = pseudo_label(cam_full[0, present], [2, 5], image, high=0.6, low=0.3, dual=True, par=par)
    np.testing.assert_array_equal(offline, online[0].numpy())
    assert {0, 2, 5, IGN} <= set(np.unique(offline))  # the comparison covers every kind of label


def test_stack_probabilities_sum_to_one() -> None:
    cam = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(1))
    image01 = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(2))
    for par in (None, PAR((1, 2), 2)):
        probs = stack_probabilities(cam, (0.7, 0.25), image01, par)
        assert probs.shape == (2, 4, 10, 12)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, 10, 12))


def test_refinement_needs_the_image() -> None:
    with pytest.raises(ValueError, match="needs the image"):
        pseudo_label(np.ones((1, 4, 4), np.float32), [1], par=PAR((1,), 1))


# ----------------------------------------------------------------------------------------------------------------------
# Soft labels
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [("uint8", 1 / 255), ("float16", 1e-3)])
def test_soft_label_round_trip(tmp_path: Path, dtype: str, tol: float) -> None:
    classes = [3, 17]
    prob = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(3)).softmax(0)
    arrays = soft_label(prob, classes, dtype)
    # compact: K+1 = 3 channels, background first, never all 21 classes
    assert arrays["classes"].dtype == np.int16 and arrays["classes"].tolist() == [0, 3, 17]
    assert arrays["prob"].shape == (3, 9, 7) and arrays["prob"].dtype == np.dtype(dtype)
    save_npz(tmp_path / "x.npz", arrays)
    assert load_npz(tmp_path / "x.npz")["prob"].shape == (3, 9, 7)
    full = load_soft_label(tmp_path / "x.npz", NUM_CLASSES)
    assert full.shape == (NUM_CLASSES, 9, 7) and full.dtype == np.float32
    assert np.abs(full[[0, 3, 17]] - prob.numpy()).max() <= tol
    others = np.setdiff1d(np.arange(NUM_CLASSES), [0, 3, 17])
    assert not full[others].any()


def test_load_soft_label_rejects_out_of_range_class(tmp_path: Path) -> None:
    save_npz(tmp_path / "bad.npz", soft_label(np.full((2, 2, 2), 0.5), [30]))
    with pytest.raises(ValueError, match=r"bad\.npz.*0\.\.20"):
        load_soft_label(tmp_path / "bad.npz", NUM_CLASSES)


def test_check_settings_refuses_a_changed_resume(tmp_path: Path) -> None:
    check_settings(tmp_path, {"dual": True, "scales": (1.0, 0.5)}, write=True)
    save_label_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))  # an output made with these settings
    check_settings(tmp_path, {"dual": True, "scales": (1.0, 0.5)}, write=True)  # same settings: fine
    with pytest.raises(ValueError, match=r"dual: True -> False"):
        check_settings(tmp_path, {"dual": False, "scales": (1.0, 0.5)}, write=False)


# ----------------------------------------------------------------------------------------------------------------------
# The tool, on hand-made CAMs (no training needed: it reads only the config and RUN/cams)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cam_run(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A run folder with config.yaml and RUN/cams/val built from the ground truth; returns (run, {id: gt mask})."""
    run = tmp_path_factory.mktemp("pseudo_run")
    cfg = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={run}"])
    save_config(cfg, run)
    dataset = build_dataset(cfg, "val", "eval")
    folder = run / "cams" / "val"
    masks = {}
    for index, name in enumerate(dataset.ids):
        item = dataset[index]
        mask = item["mask"].numpy()
        classes = (torch.nonzero(item["label"]).flatten() + 1).numpy()
        # CAM of class c: 0.9 on its pixels, 0.05 elsewhere, so a 0.5 background plane reproduces the mask (with
        # void pixels as background); cam_aux adds a 0.5 band, inside the dual ignore band (0.25, 0.7].
        cam = np.stack([np.where(mask == c, 0.9, 0.05) for c in classes]).reshape(-1, *mask.shape)
        cam_aux = np.maximum(cam, 0.5 * (np.arange(mask.shape[1]) % 7 == 0))
        save_npz(folder / f"{name}.npz", {"classes": classes.astype(np.int16), "cam": cam.astype(np.float16),
                                          "cam_aux": cam_aux.astype(np.float16)})  # fmt: skip
        masks[name] = mask
    return run, masks


def _outputs(run: Path) -> Path:
    return run / "pseudo_labels" / "val"


def test_tool_single_threshold_reproduces_the_known_labels(cam_run) -> None:
    run, masks = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    assert make_pseudo_labels.main(["--run-dir", str(run), "pseudo.dual=false"]) == 0
    for name, mask in masks.items():
        path = _outputs(run) / f"{name}.png"
        with Image.open(path) as image:
            assert image.mode == "P"
            palette = np.array(image.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
            np.testing.assert_array_equal(palette, voc_palette())
        np.testing.assert_array_equal(read_label_png(path), np.where(mask == IGN, 0, mask))


def test_tool_dual_par_soft_matches_the_pure_functions_and_resumes(cam_run, capsys) -> None:
    run, masks = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    args = ["--run-dir", str(run), "pseudo.cam_key=cam_aux", "pseudo.refine=[par]", "pseudo.soft=true"]
    summary = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse(args)))
    assert summary["processed"] == len(masks) and summary["skipped"] == 0
    cfg = load_config(run / "config.yaml")
    par = PAR(tuple(cfg.par.dilations), int(cfg.par.num_iter))
    dataset = build_dataset(cfg, "val", "eval")
    seen = set()
    for index, name in enumerate(dataset.ids):
        label = read_label_png(_outputs(run) / f"{name}.png")
        seen |= set(np.unique(label).tolist())
        cams = read_cams(run / "cams" / "val" / f"{name}.npz")
        classes, cam_aux = cams.classes, cams.cam_aux
        image = dataset[index]["img"].permute(1, 2, 0).numpy()
        high, low = float(cfg.cam.high_thre), float(cfg.cam.low_thre)
        expected = pseudo_label(cam_aux, classes, image, high=high, low=low, dual=True, par=par)
        np.testing.assert_array_equal(label, expected)
        soft = load_npz(_outputs(run) / "soft" / f"{name}.npz")
        assert soft["classes"].tolist() == [0, *classes.tolist()]  # K+1 channels only
        assert soft["prob"].shape == (len(classes) + 1, *label.shape) and soft["prob"].dtype == np.uint8
    assert seen <= set(range(NUM_CLASSES)) | {IGN} and IGN in seen and len(seen) > 2
    mtimes = {p: p.stat().st_mtime_ns for p in _outputs(run).rglob("*.*")}
    again = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse(args)))
    assert again["processed"] == 0 and again["skipped"] == len(masks)
    assert {p: p.stat().st_mtime_ns for p in _outputs(run).rglob("*.*")} == mtimes
    # the same folder with other settings is refused, not silently mixed
    assert "soft_dtype: 'uint8' -> 'float16'" in _user_error(capsys, [*args, "pseudo.soft_dtype=float16"])
    refused = _user_error(capsys, ["--run-dir", str(run), "pseudo.cam_key=cam_aux", "pseudo.refine=[]"])
    assert "refine: ['par'] -> []" in refused


def test_tool_crf_path_matches_the_pure_function(cam_run) -> None:
    run, _ = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    args = ["--run-dir", str(run), "pseudo.dual=false", "pseudo.refine=[crf]", "eval.crf_workers=0", "crf.iters=2"]
    assert make_pseudo_labels.main(args) == 0
    cfg = load_config(run / "config.yaml", ["crf.iters=2"])
    params = dict(cfg.crf)
    dataset = build_dataset(cfg, "val", "eval")
    for index, name in enumerate(dataset.ids[:3]):
        cams = read_cams(run / "cams" / "val" / f"{name}.npz")
        classes, cam = cams.classes, cams.cam
        image = dataset[index]["img"].permute(1, 2, 0).numpy()
        expected = pseudo_label(cam, classes, image, bkg_thre=float(cfg.cam.bkg_thre), crf_params=params)
        np.testing.assert_array_equal(read_label_png(_outputs(run) / f"{name}.png"), expected)


class _EagerPool:
    """A stand-in for CRFPool that submits every job before returning any result (maximal look-ahead)."""

    def __init__(self, params: dict) -> None:
        self.params = params

    def imap(self, jobs):
        from utils.crf import dense_crf

        queued = list(jobs)
        for key, image, prob in queued:
            yield key, dense_crf(image, prob, **self.params)


def test_crf_stream_keeps_order_with_items_that_send_no_job(cam_run) -> None:
    # Items with K = 0 send no CRF job; with dual + soft every other item sends 3. Whatever the pool's look-ahead,
    # the stream must yield every item once, in input order, with its own refined stacks.
    run, _ = cam_run
    cfg = load_config(run / "config.yaml", ["pseudo.refine=[crf]", "pseudo.soft=true", "crf.iters=1"])
    opts = make_pseudo_labels.Options.from_config(cfg)
    pipeline = make_pseudo_labels.Pipeline(cfg, opts, torch.device("cpu"))
    empty = make_pseudo_labels.Prepared(-1, "empty", np.zeros(0, np.int64), torch.ones(0, 4, 4), None, None)
    image = np.zeros((4, 4, 3), np.uint8)
    probs = [torch.rand(3, 2, 4, 4).softmax(1) for _ in range(3)]
    full = [make_pseudo_labels.Prepared(i, f"x{i}", np.array([i + 1]), torch.rand(1, 4, 4), p, image)
            for i, p in enumerate(probs)]  # fmt: skip
    items = [empty, full[0], empty, empty, full[1], full[2], empty]
    out = list(pipeline.crf_stream(iter(items), _EagerPool(dict(cfg.crf))))
    assert [item.name for item in out] == [item.name for item in items]
    for item in out:
        if item.name == "empty":
            assert item.probs is None
        else:
            assert np.asarray(item.probs).shape == (3, 2, 4, 4) and isinstance(item.probs, np.ndarray)  # refined


def test_tool_errors_name_the_missing_cams(cam_run, tmp_path: Path, capsys) -> None:
    run, masks = cam_run
    other = tmp_path / "run"
    other.mkdir()
    shutil.copy(run / "config.yaml", other / "config.yaml")
    message = _user_error(capsys, ["--run-dir", str(other)])
    assert re.search(r"no CAM files in .*cams/val.*tools\.make_cam --run", message), message
    first, second = sorted(masks)[:2]
    (other / "cams" / "val").mkdir(parents=True)
    shutil.copy(run / "cams" / "val" / f"{first}.npz", other / "cams" / "val")
    message = _user_error(capsys, ["--run-dir", str(other)])
    assert re.search(rf"{len(masks) - 1} id\(s\) .*no CAM file.*{second}", message), message
    with pytest.raises(FileNotFoundError, match="no CAM file"):  # the work function itself raises
        make_pseudo_labels.make_pseudo_labels(load_config(other / "config.yaml", [f"run.out_dir={other}"]))


def _copy_config(run: Path, dest: Path) -> Path:
    """A run folder with ``run``'s config only (no CAMs, no labels)."""
    (dest / "cams" / "val").mkdir(parents=True)
    cfg = load_config(run / "config.yaml", [f"run.out_dir={dest}"])
    save_config(cfg, dest)
    return dest


def test_tool_reads_uint8_cam_files_like_float16_ones(cam_run, tmp_path: Path) -> None:
    """cam.file_dtype=uint8 folders: the known CAM values (0.9, 0.5, 0.05) quantise to 230, 128 and 13 / 255, on the
    same side of every threshold (demo: 0.45, 0.25, 0.15), so the dual labels equal those of the float16 files."""
    run, masks = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    assert make_pseudo_labels.main(["--run-dir", str(run), "pseudo.cam_key=cam_aux"]) == 0
    other = _copy_config(run, tmp_path / "uint8")
    for name in masks:
        cams = read_cams(run / "cams" / "val" / f"{name}.npz")
        arrays = {"classes": cams.classes.astype(np.int16)}
        arrays.update({key: np.rint(cams.maps(key) * 255).astype(np.uint8) for key in ("cam", "cam_aux")})
        save_npz(other / "cams" / "val" / f"{name}.npz", arrays)
    assert make_pseudo_labels.main(["--run-dir", str(other), "pseudo.cam_key=cam_aux"]) == 0
    foreground = 0
    for name in masks:
        a, b = (read_label_png(_outputs(folder) / f"{name}.png") for folder in (run, other))
        np.testing.assert_array_equal(a, b)
        foreground += int(((a > 0) & (a != IGN)).sum())
    assert foreground > 0


def test_two_shards_need_only_their_own_cams_and_write_disjoint_halves(cam_run, tmp_path: Path, capsys) -> None:
    run, _ = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    assert make_pseudo_labels.main(["--run-dir", str(run)]) == 0  # one machine, the reference
    ids = build_dataset(load_config(run / "config.yaml"), "val", "eval").ids
    machines = [_copy_config(run, tmp_path / f"machine{i}") for i in range(2)]
    for index, machine in enumerate(machines):  # each machine holds the CAM files of its own shard only
        for name in ids[index::2]:
            shutil.copy(run / "cams" / "val" / f"{name}.npz", machine / "cams" / "val" / f"{name}.npz")
        args = ["--run-dir", str(machine), "run.num_shards=2", f"run.shard_index={index}"]
        summary = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse(args)))
        assert (summary["processed"], summary["shard"]) == (len(ids[index::2]), f"{index}/2")
        assert summary["total"] == len(ids)
        assert sorted(p.stem for p in _outputs(machine).glob("*.png")) == sorted(ids[index::2])
    # shard 1's CAMs are not on machine 0: its shard 1 is refused, naming the shard and the ids
    message = _user_error(capsys, ["--run-dir", str(machines[0]), "run.num_shards=2", "run.shard_index=1"])
    assert re.search(rf"{len(ids[1::2])} id\(s\) of shard 1/2 of split 'val' have no CAM file.*{ids[1]}", message)
    assert "run.num_shards=2 run.shard_index=1`" in message
    shutil.copytree(_outputs(machines[1]), _outputs(machines[0]), dirs_exist_ok=True)  # the merge
    merged, single = _outputs(machines[0]), _outputs(run)
    assert sorted(p.name for p in merged.glob("*.png")) == sorted(p.name for p in single.glob("*.png"))
    for path in single.glob("*.png"):
        np.testing.assert_array_equal(read_label_png(merged / path.name), read_label_png(path))


def test_settings_recorded_before_pseudo_refine_resume_as_the_list_they_mean(cam_run, capsys) -> None:
    """A folder whose settings.json the tool wrote before pseudo.refine (booleans par / crf) resumes as refine=[]."""
    run, masks = cam_run
    shutil.rmtree(_outputs(run), ignore_errors=True)
    assert make_pseudo_labels.main(["--run-dir", str(run), "pseudo.dual=false"]) == 0
    path = _outputs(run) / "settings.json"
    recorded = json.loads(path.read_text())
    assert recorded["refine"] == []
    old = {k: v for k, v in recorded.items() if k != "refine"} | {"par": False, "crf": False}  # the old tool's record
    path.write_text(json.dumps(old))
    args = ["--run-dir", str(run), "pseudo.dual=false"]
    again = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse(args)))
    assert (again["processed"], again["skipped"]) == (0, len(masks))
    assert json.loads(path.read_text()) == recorded  # rewritten as the current record
    path.write_text(json.dumps(old | {"par": True}))  # made with PAR: not what refine=[] makes
    assert "refine: ['par'] -> []" in _user_error(capsys, args)


# ----------------------------------------------------------------------------------------------------------------------
# The random walk (pseudo.refine=[rw]) with a stand-in boundary network
# ----------------------------------------------------------------------------------------------------------------------


def _wall(image_hw: tuple[int, int]) -> torch.Tensor:
    """Stride-4 boundary map of an image: 1 on the middle grid column (a vertical wall), 0 elsewhere; [h, w]."""
    boundary = torch.zeros(grid_size(image_hw))
    boundary[:, boundary.shape[1] // 2] = 1.0
    return boundary


class WallNet(torch.nn.Module):
    """Stands in for models.boundary.BoundaryNet: ``boundary(images [B, 3, H, W], flip) -> [B, h, w]`` is
    :func:`_wall` for every image; records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.dtype, tuple[int, ...], bool]] = []

    def boundary(self, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
        self.calls.append((images.dtype, tuple(images.shape), flip))
        return _wall(tuple(images.shape[-2:]))[None].expand(images.shape[0], -1, -1)


@pytest.fixture
def rw_run(cam_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(run, masks, IRN folder, the stand-in network, loads): ``cam_run``'s config with CAMs that are 0 right of the
    wall (4 · the wall's grid column onwards), an IRN run folder holding a checkpoint file, and
    ``load_boundary_net`` replaced by one returning :class:`WallNet` (``loads`` lists the sources it was given)."""
    source, masks = cam_run
    run = _copy_config(source, tmp_path / "run")
    for name in masks:
        cams = read_cams(source / "cams" / "val" / f"{name}.npz")
        wall_x = 4 * (grid_size(cams.cam.shape[-2:])[1] // 2)
        cam = cams.cam.copy()
        cam[:, :, wall_x:] = 0.0
        save_npz(run / "cams" / "val" / f"{name}.npz", {"classes": cams.classes.astype(np.int16),
                                                        "cam": cam.astype(np.float16),
                                                        "cam_aux": cams.cam_aux.astype(np.float16)})  # fmt: skip
    irn = tmp_path / "irn"
    (irn / "checkpoints").mkdir(parents=True)
    (irn / "checkpoints" / "last.pth").write_bytes(b"boundary network v1")
    net, loads = WallNet(), []

    def load(source_arg, device):
        loads.append(str(source_arg))
        return net

    monkeypatch.setattr(make_pseudo_labels, "load_boundary_net", load)
    return run, masks, irn, net, loads


def _walked(run: Path, name: str, **walk) -> tuple[np.ndarray, torch.Tensor]:
    """(classes, the walked scores [K, H, W] on the wall) of one CAM file, computed directly."""
    cams = read_cams(run / "cams" / "val" / f"{name}.npz")
    cam = torch.from_numpy(cams.cam)
    return cams.classes, propagate(cam, _wall(tuple(cam.shape[-2:])), **walk)


def test_rw_labels_are_the_walked_scores_labelled_directly_and_do_not_cross_the_wall(rw_run) -> None:
    run, masks, irn, net, loads = rw_run
    cfg = load_config(run / "config.yaml")
    assert cfg.pseudo.dual  # dual is on, and does not apply to the walked scores
    walk = {"radius": int(cfg.rw.radius), "beta": float(cfg.rw.beta), "exp_times": int(cfg.rw.exp_times)}
    args = ["--run-dir", str(run), "pseudo.refine=[rw]", f"rw.checkpoint={irn}", "rw.flip=false", "pseudo.soft=true"]
    summary = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse(args)))
    folder = run / "pseudo_labels_rw" / "val"
    assert summary["folder"] == str(folder) and summary["refine"] == ["rw"] and summary["processed"] == len(masks)
    assert not (run / "pseudo_labels").exists()
    assert loads == [str(irn)]  # loaded once for the whole split
    assert net.calls and all(dtype == torch.uint8 and shape[:2] == (1, 3) and flip is False
                             for dtype, shape, flip in net.calls)  # fmt: skip
    crossed = wall_foreground = 0
    for name in masks:
        classes, walked = _walked(run, name, **walk)
        label = read_label_png(folder / f"{name}.png")
        np.testing.assert_array_equal(label, hard_label(walked, classes, (float(cfg.rw.bkg_thre),), False))
        wall_x = 4 * (grid_size(label.shape)[1] // 2)
        assert (label[:, wall_x + 4 :] == 0).all()  # nothing right of the wall: it received no score
        wall_foreground += int((label[:, :wall_x] > 0).sum())
        # without the wall the same walk does carry the scores across
        free = propagate(torch.from_numpy(read_cams(run / "cams" / "val" / f"{name}.npz").cam),
                         torch.zeros(grid_size(label.shape)), **walk)  # fmt: skip
        crossed += int((hard_label(free, classes, (float(cfg.rw.bkg_thre),), False)[:, wall_x + 4 :] > 0).sum())
        soft = load_npz(folder / "soft" / f"{name}.npz")  # the single-threshold stack of the walked scores
        expected = score_stacks(walked, (float(cfg.rw.bkg_thre),))[0].softmax(dim=0).numpy()
        np.testing.assert_allclose(soft["prob"] / 255.0, expected, atol=1 / 510 + 1e-6)
    assert wall_foreground > 0 and crossed > 0
    log = (run / "make_pseudo_labels.log").read_text()
    assert "pseudo.dual=true does not apply to the random walk's scores" in log and "refine rw" in log
    recorded = json.loads((folder / "settings.json").read_text())
    assert recorded["refine"] == ["rw"] and recorded["dual"] is False and recorded["bkg_thre"] == cfg.rw.bkg_thre
    assert recorded["rw_params"] == {**walk, "bkg_thre": cfg.rw.bkg_thre, "flip": False, "mode": "sparse"}
    digest = hashlib.sha256(b"boundary network v1").hexdigest()
    assert recorded["rw_checkpoint"] == {"sha256": digest, "bytes": len(b"boundary network v1")}


def test_rw_resume_needs_the_same_walk_and_network(rw_run, tmp_path: Path, capsys) -> None:
    run, masks, irn, _, _ = rw_run
    args = ["--run-dir", str(run), "pseudo.refine=[rw]", f"rw.checkpoint={irn}"]
    assert make_pseudo_labels.main(args) == 0
    again = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse(args)))
    assert (again["processed"], again["skipped"]) == (0, len(masks))
    refused = _user_error(capsys, [*args, "rw.beta=8"])
    assert "rw_params:" in refused and "'beta': 10.0" in refused and "'beta': 8.0" in refused
    # the same network elsewhere (its file copied, a folder moved) resumes; another network is refused
    copy = tmp_path / "copy.pth"
    shutil.copy(irn / "checkpoints" / "last.pth", copy)
    again = make_pseudo_labels.make_pseudo_labels(config_from_args(_parse([*args, f"rw.checkpoint={copy}"])))
    assert again["processed"] == 0
    copy.write_bytes(b"boundary network v2")
    assert "rw_checkpoint:" in _user_error(capsys, [*args, f"rw.checkpoint={copy}"])


def test_rw_then_par_and_crf_refine_the_walked_scores(rw_run) -> None:
    run, _, irn, _, _ = rw_run
    overrides = ["pseudo.refine=[rw, par, crf]", f"rw.checkpoint={irn}", "eval.crf_workers=0", "crf.iters=2",
                 "pseudo.folder=rw_par_crf"]  # fmt: skip
    assert make_pseudo_labels.main(["--run-dir", str(run), *overrides]) == 0
    cfg = load_config(run / "config.yaml", ["crf.iters=2"])
    walk = {"radius": int(cfg.rw.radius), "beta": float(cfg.rw.beta), "exp_times": int(cfg.rw.exp_times)}
    par = PAR(tuple(cfg.par.dilations), int(cfg.par.num_iter))
    dataset = build_dataset(cfg, "val", "eval")
    for index, name in enumerate(dataset.ids[:3]):
        classes, walked = _walked(run, name, **walk)
        image = dataset[index]["img"].permute(1, 2, 0).numpy()
        expected = pseudo_label(walked, classes, image, bkg_thre=float(cfg.rw.bkg_thre), par=par,
                                crf_params=dict(cfg.crf))  # fmt: skip
        np.testing.assert_array_equal(read_label_png(run / "rw_par_crf" / "val" / f"{name}.png"), expected)


def test_rw_with_a_real_boundary_network_walks_on_its_maps(cam_run, voc_root: Path, tmp_path: Path) -> None:
    """An untrained resnet10t BoundaryNet saved as an IRN run: the tool's labels are those of its flip-averaged maps
    (on images whose sides need not be multiples of 4), and the folder records its checkpoint's sealed SHA-256."""
    from models.boundary import build_boundary_model, load_boundary_net
    from utils.checkpoint import read_seal, save_checkpoint

    source, masks = cam_run
    run = _copy_config(source, tmp_path / "run")
    for name in masks:
        shutil.copy(source / "cams" / "val" / f"{name}.npz", run / "cams" / "val")
    irn = tmp_path / "irn"
    irn_cfg = load_config(["configs/voc.yaml", "configs/irn/demo.yaml"],
                          [f"data.root={voc_root}", f"run.out_dir={irn}", "irn.backbone=resnet10t",
                           "irn.branch_channels=8"])  # fmt: skip
    save_config(irn_cfg, irn)
    torch.manual_seed(0)
    save_checkpoint(irn / "checkpoints" / "last.pth", model=build_boundary_model(irn_cfg), step=1)
    assert make_pseudo_labels.main(["--run-dir", str(run), "pseudo.refine=[rw]", f"rw.checkpoint={irn}"]) == 0
    cfg = load_config(run / "config.yaml")
    net = load_boundary_net(irn, "cpu")
    dataset = build_dataset(cfg, "val", "eval")
    sizes = set()
    for index, name in enumerate(dataset.ids):
        image = dataset[index]["img"]  # uint8 [3, H, W]
        sizes.add(tuple(image.shape[-2:]))
        cams = read_cams(run / "cams" / "val" / f"{name}.npz")
        boundary = net.boundary(image[None], flip=True)[0]
        walk = {"radius": int(cfg.rw.radius), "beta": float(cfg.rw.beta), "exp_times": int(cfg.rw.exp_times)}
        walked = propagate(torch.from_numpy(cams.cam), boundary, **walk)
        expected = hard_label(walked, cams.classes, (float(cfg.rw.bkg_thre),), False)
        np.testing.assert_array_equal(read_label_png(run / "pseudo_labels_rw" / "val" / f"{name}.png"), expected)
    assert any(h % 4 or w % 4 for h, w in sizes)
    recorded = json.loads((run / "pseudo_labels_rw" / "val" / "settings.json").read_text())
    checkpoint = irn / "checkpoints" / "last.pth"
    assert recorded["rw_checkpoint"] == {"sha256": read_seal(checkpoint).sha256, "bytes": checkpoint.stat().st_size}


def test_rw_without_a_checkpoint_is_one_error_naming_the_key(rw_run, tmp_path: Path, capsys) -> None:
    run, *_ = rw_run
    message = _user_error(capsys, ["--run-dir", str(run), "pseudo.refine=[rw]"])
    assert "rw.checkpoint is not set" in message
    message = _user_error(capsys, ["--run-dir", str(run), "pseudo.refine=[rw]", f"rw.checkpoint={tmp_path / 'none'}"])
    assert message.startswith(f"error: rw.checkpoint={tmp_path / 'none'}: ")
    assert not (run / "pseudo_labels_rw").exists()


def _user_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the tool's main on ``argv``; it must fail as a user error (:func:`tests.user_errors.user_error_line`)."""
    return user_error_line(make_pseudo_labels.main, argv, capsys)


def _parse(args: list[str]):
    import argparse

    from utils.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(args)
