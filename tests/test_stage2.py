"""The second stage (SPEC §10): its losses' known answers, the joint crop, the pseudo-label checks, and tiny trainings
through the generic trainer (exact resume, 2 gloo processes, the inference tools on the run folder)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from core.pseudo_labels import soft_label
from datasets.pseudo import TARGETS, PseudoLabelDataset
from datasets.transforms import apply_geometry, draw_geometry, scale_flip_crop
from engine.stage2 import read_soft_compact
from losses import HardCrossEntropy, SoftCrossEntropy
from models import build_model
from models.stage2 import Stage2Segmenter
from tests.user_errors import user_error_line
from tools import evaluate, infer_seg, train
from utils.checkpoint import read_checkpoint
from utils.config import ConfigError, load_config, rule_for
from utils.errors import InputError
from utils.io import read_image, read_label_png, save_label_png, save_npz
from utils.logging import read_metrics

REPO = Path(__file__).resolve().parent.parent
ENCODER = "tu-test_efficientnet"  # timm's tiny test network (130k parameters with the DeepLab-v2 head)
TINY = ("stage2.arch=DeepLabV2", f"stage2.encoder={ENCODER}", "stage2.output_stride=8", "data.crop_size=32",
        "train.batch_size=2", "train.warmup_iters=0", "train.log_every=1", "eval.scales=[1.0]")  # fmt: skip


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def labels(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pseudo labels of train_aug: the ground-truth masks as hard labels (their 255 band included) and, in soft/,
    the compact soft labels tools.make_pseudo_labels would write for them (uint8, 255 spread evenly)."""
    folder = tmp_path_factory.mktemp("stage2_labels")
    (folder / "soft").mkdir()
    for name in _ids(voc_root, "train_aug"):
        mask = read_label_png(voc_root / "SegmentationClassAug" / f"{name}.png")
        save_label_png(folder / f"{name}.png", mask)
        classes = np.array(sorted(set(np.unique(mask).tolist()) - {0, 255}), dtype=np.int64)
        channels = np.concatenate([[0], classes])
        prob = (mask[None] == channels[:, None, None]).astype(np.float32)
        prob[:, mask == 255] = 1.0 / len(channels)
        save_npz(folder / "soft" / f"{name}.npz", soft_label(prob, classes, "uint8"))
    return folder


def _args(root: Path, out: Path, labels: Path, *overrides: str) -> list[str]:
    return ["--config", "configs/voc.yaml", "--config", "configs/stage2/demo.yaml", f"data.root={root}",
            f"run.out_dir={out}", f"stage2.labels={labels}", *TINY, *overrides]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------


def test_soft_cross_entropy_on_one_hot_targets_equals_hard_cross_entropy_with_ignore():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, :2] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    # compact one-hot: per image the classes 0..4 in a shuffled order plus a padding slot (class 0, no mass)
    order = torch.tensor([[3, 1, 4, 0, 2, 0], [2, 4, 0, 1, 3, 0]])
    prob = (target[:, None] == order[:, :, None, None]).double()
    prob[:, -1] = 0.0
    soft = SoftCrossEntropy()(logits, prob, order)
    hard = HardCrossEntropy(255)(logits, target)
    assert soft.item() == pytest.approx(expected.item(), rel=1e-12)
    assert hard.item() == pytest.approx(expected.item(), rel=1e-12)


def test_soft_cross_entropy_gradient_is_softmax_minus_target_on_two_classes():
    # one image, 1x2 pixels, classes (0, 1): softmax (1/4, 3/4) at pixel 0 against target (1/2, 1/2); pixel 1 has no
    # mass (not counted). loss = -(ln 1/4 + ln 3/4) / 2; its gradient (softmax - q) / N with N = 1.
    logits = torch.tensor([[[[0.0, 5.0]], [[math.log(3.0), -2.0]]]], requires_grad=True)  # [1, 2, 1, 2]
    prob = torch.tensor([[[[0.5, 0.0]], [[0.5, 0.0]]]])
    loss = SoftCrossEntropy()(logits, prob, torch.tensor([[0, 1]]))
    loss.backward()
    assert loss.item() == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2, rel=1e-6)
    assert logits.grad[0, :, 0, 0].tolist() == pytest.approx([0.25 - 0.5, 0.75 - 0.5], abs=1e-6)
    assert logits.grad[0, :, 0, 1].tolist() == [0.0, 0.0]


def test_soft_targets_are_normalised_and_an_unlabelled_batch_is_zero_with_a_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    prob = torch.rand(1, 2, 2, 2)
    classes = torch.tensor([[2, 0]])
    # uint8-style mass that sums to 0.98: the loss is that of the renormalised distribution
    assert SoftCrossEntropy()(logits, prob * 0.98 / prob.sum(1, keepdim=True), classes).item() == pytest.approx(
        SoftCrossEntropy()(logits, prob / prob.sum(1, keepdim=True), classes).item(), rel=1e-6
    )
    for loss in (SoftCrossEntropy()(logits, torch.zeros(1, 2, 2, 2), classes),
                 HardCrossEntropy(255)(logits, torch.full((1, 2, 2), 255))):  # fmt: skip
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


# ----------------------------------------------------------------------------------------------------------------------
# The joint crop and the label files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_joint_crop_is_the_training_crop_of_stage_one(seed):
    image = np.random.default_rng(99).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected, box = scale_flip_crop(image, np.random.default_rng(seed), 48, (0.5, 2.0))
    geometry = draw_geometry(image.shape[:2], np.random.default_rng(seed), 48, (0.5, 2.0), 0.5)
    assert np.array_equal(apply_geometry(image, geometry, 48, 1, 0), expected)  # cv2.INTER_LINEAR = 1
    assert np.array_equal(geometry.img_box, box)


def test_labels_follow_the_image_through_the_crop(voc_root, labels):
    ids = _ids(voc_root, "train_aug")[:4]
    images = [voc_root / "JPEGImages" / f"{name}.jpg" for name in ids]
    hard = PseudoLabelDataset(ids, images, labels, "hard", 21, 64, (1.0, 1.0), flip_p=1.0)
    soft = PseudoLabelDataset(ids, images, labels, "soft", 21, 64, (1.0, 1.0), flip_p=1.0,
                              read_soft=lambda path: read_soft_compact(path, 21))  # fmt: skip
    for index, name in enumerate(ids):
        item, soft_item = hard[(index, 7)], soft[(index, 7)]
        assert torch.equal(soft_item["img"], item["img"]) and torch.equal(soft_item["img_box"], item["img_box"])
        # scale 1 and a certain flip: image and label crops are the same window of the mirrored image and label
        image, mask = read_image(images[index])[:, ::-1], read_label_png(labels / f"{name}.png")[:, ::-1]
        geometry = draw_geometry(mask.shape, np.random.default_rng(7), 64, (1.0, 1.0), 1.0)
        (sy, dy, ny), (sx, dx, nx) = geometry.rows, geometry.cols
        inside = np.zeros((64, 64), dtype=bool)
        inside[dy : dy + ny, dx : dx + nx] = True
        crop, target = item["img"].permute(1, 2, 0).numpy(), item["target"].numpy()
        assert np.array_equal(crop[inside].reshape(ny, nx, 3), image[sy : sy + ny, sx : sx + nx])
        assert np.array_equal(target[inside].reshape(ny, nx), mask[sy : sy + ny, sx : sx + nx])
        assert (target[~inside] == 255).all() and (crop[~inside] == 0).all()
        # soft: mass 1 on the image (uint8 rounding), 0 on the padding; its argmax is the hard label where labelled
        mass = soft_item["soft"].sum(0).numpy()
        assert np.allclose(mass[inside], 1.0, atol=0.02) and (mass[~inside] == 0).all()
        best = soft_item["soft_classes"].numpy()[soft_item["soft"].argmax(0).numpy()]
        labelled = target != 255
        assert labelled.any() and np.array_equal(best[labelled], target[labelled])
    # every item pads its classes to the most of any file: background + the foreground classes of the fullest mask
    most = max(1 + len(set(np.unique(read_label_png(labels / f"{name}.png")).tolist()) - {0, 255}) for name in ids)
    assert soft.max_classes == most and soft[(0, 0)]["soft"].shape == (most, 64, 64)


def _corrupt(labels: Path, tmp_path: Path, write) -> Path:
    """A copy of the label folder in which ``write(folder)`` damaged a file."""
    shutil.copytree(labels, tmp_path / "labels")
    write(tmp_path / "labels")
    return tmp_path / "labels"


def test_missing_and_ill_shaped_label_files_are_user_errors_naming_the_file(voc_root, labels, tmp_path, capsys):
    first, second = _ids(voc_root, "train_aug")[:2]
    cases = [
        ("hard", lambda d: (d / f"{first}.png").unlink(), [first, "1 of the", "no hard pseudo label"]),
        ("hard", lambda d: save_label_png(d / f"{first}.png", np.zeros((5, 7), np.uint8)),
         [f"{first}.png", "is 7x5 (WxH) but its image"]),
        ("soft", lambda d: save_npz(d / "soft" / f"{second}.npz", {"classes": np.array([0, 30], np.int16),
                                                                  "prob": np.zeros((2, 3, 3), np.uint8)}),
         [f"{second}.npz", "0..20", "is 3x3 (HxW)"]),
        ("soft", lambda d: save_npz(d / "soft" / f"{second}.npz", {"classes": np.array([0], np.int16),
                                                                  "prob": np.zeros((1, 3, 3), np.float32)}),
         [f"{second}.npz", "uint8 or float16"]),
    ]  # fmt: skip
    for index, (target, damage, expected) in enumerate(cases):
        folder = _corrupt(labels, tmp_path / str(index), damage)
        line = user_error_line(train.main, _args(voc_root, tmp_path / f"run{index}", folder,
                                                 f"stage2.target={target}"), capsys)  # fmt: skip
        assert all(text in line for text in expected), line


def test_a_bad_value_is_caught_when_the_label_is_loaded(voc_root, labels, tmp_path):
    name = _ids(voc_root, "train_aug")[0]
    folder = _corrupt(labels, tmp_path, lambda d: None)
    mask = read_label_png(folder / f"{name}.png")
    mask[0, 0] = 30
    save_label_png(folder / f"{name}.png", mask)
    dataset = PseudoLabelDataset([name], [voc_root / "JPEGImages" / f"{name}.jpg"], folder, "hard", 21, 32, (1, 1))
    with pytest.raises(InputError, match=rf"{name}\.png holds value\(s\) \[30\]"):
        dataset[(0, 0)]


def test_config_mistakes_are_one_line_naming_the_key(voc_root, labels, tmp_path, capsys):
    line = user_error_line(train.main, _args(voc_root, tmp_path / "a", labels, "stage2.labels=null"), capsys)
    assert "stage2.labels must be set" in line
    line = user_error_line(train.main, _args(voc_root, tmp_path / "b", labels, "data.crop_size=36"), capsys)
    assert "data.crop_size must be a multiple of the output stride 8" in line and "32 or 40" in line
    line = user_error_line(train.main, _args(voc_root, tmp_path / "c", labels, "model.pretrained=true",
                                             f"model.weights={tmp_path / 'none.pth'}"), capsys)  # fmt: skip
    assert "encoder weights file not found" in line and "none.pth" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("task=stage3", "task must be one of ('msfc', 'stage2', 'irn'), got 'stage3'"),
        ("stage2.target=both", "stage2.target must be one of ('hard', 'soft'), got 'both'"),
        ("stage2.output_stride=4", "stage2.output_stride must be one of 8, 16, 32, got 4"),
        ("stage2.aspp_rates=[0]", "stage2.aspp_rates must be a non-empty list of positive integers, got [0]"),
        ("stage2.encodr=x", "did you mean 'stage2.encoder'?"),
    ],
)
def test_stage_two_keys_are_checked_when_the_config_loads(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(["configs/voc.yaml", "configs/stage2/demo.yaml"], ["data.root=/x", "run.out_dir=/y", override])


def test_the_config_choices_are_those_the_code_accepts():
    assert rule_for("stage2.target").text == f"one of {TARGETS}"
    assert rule_for("task").text == f"one of {tuple(train.TASKS)}"
    # a stage-2 crop need not tile into ViT patches: 40 is no multiple of 16, and fine for an output stride of 8
    cfg = load_config(["configs/voc.yaml", "configs/stage2/demo.yaml"], ["data.root=/x", "run.out_dir=/y",
                                                                          "data.crop_size=40"])  # fmt: skip
    assert cfg.data.crop_size == 40


def test_local_encoder_weights_are_loaded_and_an_incomplete_file_is_refused(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("test_efficientnet", num_classes=10)
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": reference.state_dict()}, path)  # with its classifier, as timm saves it
    model = Stage2Segmenter("DeepLabV2", ENCODER, 21, pretrained=True, weights=path)
    loaded = model.net.encoder.model.state_dict()
    assert loaded and all(torch.equal(value, reference.state_dict()[key]) for key, value in loaded.items())
    partial = {k: v for k, v in reference.state_dict().items() if not k.startswith("blocks.0.")}
    torch.save(partial, path)
    with pytest.raises(InputError, match=r"encoder\.pth do not fit .* weights missing \[blocks\.0\."):
        Stage2Segmenter("DeepLabV2", ENCODER, 21, weights=path)


# ----------------------------------------------------------------------------------------------------------------------
# Training through the generic trainer, and the inference tools on the run folder
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(voc_root: Path, labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps on soft labels in one go, validating at step 4 (best_seg.pth)."""
    out = tmp_path_factory.mktemp("stage2") / "straight"
    args = _args(voc_root, out, labels, "stage2.target=soft", "train.max_iters=4", "train.ckpt_every=4",
                 "train.eval_every=4")  # fmt: skip
    assert train.main(args) == 0
    return out


@pytest.mark.smoke
def test_a_stage_two_run_trains_validates_and_resumes_bit_for_bit(straight, voc_root, labels, tmp_path):
    records = read_metrics(straight / "metrics.jsonl", kind="train")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss_seg"]) for r in records)
    (val,) = read_metrics(straight / "metrics.jsonl", kind="val")
    assert val["step"] == 4 and 0.0 <= val["seg_miou"] <= 1.0
    assert (straight / "checkpoints" / "best_seg.pth").is_file()
    resumed = tmp_path / "resumed"
    schedule = ("stage2.target=soft", "train.max_iters=4", "train.ckpt_every=4", "train.eval_every=4")
    assert train.main(_args(voc_root, resumed, labels, *schedule, "train.stop_iter=2")) == 0
    assert train.main(_args(voc_root, resumed, labels, *schedule, "train.resume=auto")) == 0
    a = read_checkpoint(straight / "checkpoints" / "last.pth")
    b = read_checkpoint(resumed / "checkpoints" / "last.pth")
    assert a["step"] == b["step"] == 4
    # exact: same crops (sampler seeds), same dropout stream (checkpointed), same BatchNorm statistics
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert any("running_mean" in key for key in a["model"])
    assert read_metrics(resumed / "metrics.jsonl", kind="val")[-1]["seg_miou"] == val["seg_miou"]


def test_the_inference_tools_score_a_stage_two_run_folder(straight, capsys):
    run = str(straight)
    assert infer_seg.main(["--run-dir", run, "eval.crf=true", "eval.num_overlays=1"]) == 0
    for source in ("seg", "seg_crf"):
        assert evaluate.main(["--run-dir", run, "--source", source]) == 0
    scored = {s: json.loads((straight / "eval" / f"{s}_val.json").read_text()) for s in ("seg", "seg_crf")}
    assert all(0.0 <= scored[s]["miou"] <= 1.0 for s in scored)
    # the tools load last.pth into the same network and run the same inference as the validation at step 4
    (val,) = read_metrics(straight / "metrics.jsonl", kind="val")
    assert scored["seg"]["miou"] == pytest.approx(val["seg_miou"], abs=1e-12)
    assert len(list((straight / "seg" / "val").glob("*.png"))) == len(
        list((straight / "seg_crf" / "val").glob("*.png"))
    )


def test_build_model_dispatches_on_the_task(voc_root, labels, tmp_path):
    cfg = load_config(["configs/voc.yaml", "configs/stage2/demo.yaml"],
                      [f"data.root={voc_root}", f"run.out_dir={tmp_path}", f"stage2.labels={labels}"])  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model, Stage2Segmenter) and model.patch_size == 16
    logits = model.eval()(model.normalize(torch.zeros(1, 3, 48, 64, dtype=torch.uint8))).seg_logits
    assert logits.shape == (1, 21, 48, 64)


@pytest.mark.slow
def test_two_gloo_processes_keep_weights_and_batchnorm_statistics_identical(voc_root, labels, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tools.train",
               *_args(voc_root, out, labels, "train.max_iters=3", "train.ckpt_every=3")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_metrics(out / "metrics.jsonl", kind="sync") == [
        {"step": 3, "kind": "sync", "ranks_identical": True, "world_size": 2}
    ]
    assert "global batch 4 (2 per process x 1 accumulation x 2)" in (out / "train.log").read_text()
