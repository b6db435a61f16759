"""IRN's boundary network (SPEC §9): its shapes and strides, frozen BatchNorm, the detached backbone, the flip-averaged
boundary map, its weight files; and its training as a task of the generic trainer (exact resume, the trained network
loaded back for the random walk, the validation metric's known answers)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from core.affinity import pair_index
from engine.boundary import BoundaryTask, balanced_accuracy, labels_at_stride, pair_accuracy_counts
from models import build_model
from models.boundary import STAGES, BoundaryNet, load_boundary_net
from tests.user_errors import user_error_line
from tools import train
from utils.checkpoint import read_checkpoint
from utils.config import ConfigError, load_config
from utils.errors import InputError
from utils.io import read_label_png, save_label_png
from utils.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ("irn.backbone=resnet10t", "irn.radius=3", "irn.branch_channels=8", "data.crop_size=32",
        "train.batch_size=2", "train.log_every=1", "run.num_threads=1")  # fmt: skip


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def relations(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Relation-like labels of train_aug: the ground-truth masks (0 background, class ids, their 255 band) with a
    further unknown stripe, as tools.make_relations leaves unknown what the two CRF maps disagree on."""
    folder = tmp_path_factory.mktemp("relations")
    for name in _ids(voc_root, "train_aug"):
        mask = read_label_png(voc_root / "SegmentationClassAug" / f"{name}.png").copy()
        mask[:, 10:14] = 255
        save_label_png(folder / f"{name}.png", mask)
    return folder


def _args(root: Path, out: Path, relations: Path | None, *overrides: str) -> list[str]:
    labels = [] if relations is None else [f"irn.relations={relations}"]
    return ["--config", "configs/voc.yaml", "--config", "configs/irn/demo.yaml", f"data.root={root}",
            f"run.out_dir={out}", *labels, *TINY, *overrides]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_five_stages_at_strides_4_4_8_16_16_fuse_into_one_logit_map_at_stride_4(name):
    channels = (64, 64, 128, 256, 512)  # both: a 64-channel stem (resnet10t's deep stem ends at 64 too)
    torch.manual_seed(0)
    net = BoundaryNet(name, branch_channels=8, detach_backbone=False)
    x = net.normalize(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    features = net.stage_features(x)
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 96 // s) for c, s in
                                                   zip(channels, (4, 4, 8, 16, 16), strict=True)]  # fmt: skip
    assert net(x).shape == (2, 16, 24)
    # odd sides: the stem rounds up (ceil(65 / 4) = 17, ceil(97 / 4) = 25), and every stage is brought to its size
    assert net(net.normalize(torch.zeros(1, 3, 65, 97, dtype=torch.uint8))).shape == (1, 17, 25)
    # layer4's first block: stride 1, no dilation
    assert all(m.stride == (1, 1) and m.dilation == (1, 1) for m in net.backbone.layer4.modules()
               if isinstance(m, torch.nn.Conv2d))  # fmt: skip
    assert [len(p) for p in net.branch] == [3] * len(STAGES) and net.fuse.in_channels == 5 * 8


def test_a_network_that_is_not_a_timm_resnet_is_refused_naming_the_key():
    with pytest.raises(InputError, match=r"irn\.backbone=test_vit is a timm VisionTransformer, not a timm ResNet"):
        BoundaryNet("test_vit")
    with pytest.raises(InputError, match=r"irn\.backbone=no_such_net is not a timm model name"):
        BoundaryNet("no_such_net")
    with pytest.raises(InputError, match=r"irn\.branch_channels must be a positive multiple of 4"):
        BoundaryNet("resnet10t", branch_channels=6)


def test_batchnorm_stays_frozen_in_training_mode():
    torch.manual_seed(0)
    net = BoundaryNet("resnet10t", branch_channels=8, detach_backbone=False).train()
    norms = [m for m in net.backbone.modules() if "BatchNorm" in type(m).__name__]
    assert norms and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in norms)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    x = net.normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    net(x).sum().backward()
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics and affine parameters unchanged
    assert all(not list(m.parameters()) for m in norms)  # nothing of a norm is a parameter, so nothing is optimised
    # the frozen norm is the eval-mode norm: training mode gives the eval-mode output
    assert torch.equal(net.train()(x), net.eval()(x))


def test_a_detached_backbone_gets_no_gradient_and_every_branch_parameter_does():
    torch.manual_seed(0)
    net = BoundaryNet("resnet10t", branch_channels=8, detach_backbone=True).train()
    x = net.normalize(torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8))
    net(x).square().mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in net.backbone.parameters())
    branch = [(n, p) for n, p in net.named_parameters() if not n.startswith("backbone.")]
    assert branch and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in branch)
    groups = net.param_groups(0.1, 1e-4)
    assert [g["name"] for g in groups] == ["branch", "branch_no_decay"]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and all(g["lr"] == 0.1 for g in groups)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for _, p in branch}
    # trained backbone: its convolutions join as their own group (its norms are frozen buffers, so no 1-d group)
    trained = BoundaryNet("resnet10t", branch_channels=8, detach_backbone=False)
    assert [g["name"] for g in trained.param_groups(0.1, 1e-4)] == ["backbone", "branch", "branch_no_decay"]


@pytest.mark.parametrize("side", [(32, 48), (33, 45)])
def test_the_flip_averaged_boundary_map_is_flip_equivariant_and_a_probability(side):
    torch.manual_seed(0)
    net = BoundaryNet("resnet10t", branch_channels=8, detach_backbone=False).train()
    images = torch.randint(0, 256, (2, 3, *side), dtype=torch.uint8)
    b = net.boundary(images)
    assert net.training  # the mode is restored
    assert b.dtype == torch.float32 and ((b >= 0) & (b <= 1)).all()
    assert torch.allclose(net.boundary(images.flip(-1)), b.flip(-1), atol=1e-6)
    # its definition: the sigmoid of the mean of the logits of the image and the un-flipped logits of its flip
    net.eval()
    x = net.normalize(images)
    expected = torch.sigmoid((net(x) + net(x.flip(-1)).flip(-1)) / 2)
    assert torch.allclose(b, expected, atol=1e-6)
    assert torch.allclose(net.boundary(images, flip=False), torch.sigmoid(net(x)), atol=1e-6)


def test_a_weight_file_loads_every_backbone_weight_and_a_missing_or_partial_one_is_an_error(tmp_path):
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", num_classes=10)  # as timm saves it: with the classifier
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    net = BoundaryNet("resnet18", weights=path, pretrained=True)
    own, ref = net.backbone.state_dict(), reference.state_dict()
    assert own and all(torch.equal(value, ref[key]) for key, value in own.items())
    with pytest.raises(FileNotFoundError, match=r"model\.weights for irn\.backbone=resnet18"):
        BoundaryNet("resnet18", weights=tmp_path / "none.pth")
    torch.save({k: v for k, v in ref.items() if not k.startswith("layer2.")}, path)
    with pytest.raises(InputError, match=r"resnet18\.pth do not fit irn\.backbone=resnet18: .* missing \[layer2\."):
        BoundaryNet("resnet18", weights=path)


# ----------------------------------------------------------------------------------------------------------------------
# The validation metric
# ----------------------------------------------------------------------------------------------------------------------


def test_labels_are_read_at_the_pixels_of_the_stride_4_grid():
    label = torch.arange(9 * 10).view(1, 9, 10)
    small = labels_at_stride(label, (3, 3))
    assert small[0].tolist() == [[0, 4, 8], [40, 44, 48], [80, 84, 88]]
    with pytest.raises(ValueError, match="boundary map is"):
        labels_at_stride(label, (2, 3))


def test_the_balanced_pair_accuracy_on_a_two_region_map():
    # a 1x4 strip: background | background | class 3 | class 3, radius 2 -> pairs (0,1), (1,2), (2,3), all horizontal
    index = pair_index(2)
    label = torch.tensor([[[0, 0, 3, 3]]])
    # a boundary of 1 at pixel 2: every pair that touches pixel 2 has affinity 0
    boundary = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])
    counts = pair_accuracy_counts(boundary, label, index, 255)
    # positive pairs (0,1) connected, (2,3) cut: 1 of 2 right; negative pair (1,2) cut: 1 of 1 right
    assert counts.tolist() == [1, 2, 1, 1]
    assert balanced_accuracy(counts) == {"affinity_accuracy": 0.75, "affinity_acc_pos": 0.5, "affinity_acc_neg": 1.0}
    # no boundary: positives right, the negative wrong; an unknown end makes no pair
    assert pair_accuracy_counts(torch.zeros(1, 1, 4), label, index, 255).tolist() == [2, 2, 0, 1]
    assert pair_accuracy_counts(torch.zeros(1, 1, 4), torch.tensor([[[0, 255, 3, 3]]]), index, 255).tolist() == [
        1,
        1,
        0,
        0,
    ]
    assert balanced_accuracy(np.array([1, 1, 0, 0]))["affinity_accuracy"] == 1.0
    assert balanced_accuracy(np.zeros(4))["affinity_accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Training through the generic trainer
# ----------------------------------------------------------------------------------------------------------------------


def test_irn_relations_unset_is_a_config_error_naming_the_key(voc_root, tmp_path, capsys):
    cfg = load_config(["configs/voc.yaml", "configs/irn/demo.yaml"], [f"data.root={voc_root}",
                                                                       f"run.out_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"irn\.relations must be set with task=irn"):
        BoundaryTask(cfg, torch.device("cpu"))
    line = user_error_line(train.main, _args(voc_root, tmp_path / "run", None), capsys)
    assert "irn.relations must be set" in line
    line = user_error_line(train.main, _args(voc_root, tmp_path / "run2", tmp_path / "nowhere"), capsys)
    assert "irn.relations: label folder" in line and "nowhere" in line
    (tmp_path / "empty").mkdir()
    line = user_error_line(train.main, _args(voc_root, tmp_path / "run3", tmp_path / "empty"), capsys)
    assert line.startswith("error: irn.relations:") and "make them with tools.make_relations" in line


def test_build_model_dispatches_task_irn(voc_root, tmp_path):
    cfg = load_config(["configs/voc.yaml", "configs/irn/demo.yaml"],
                      [f"data.root={voc_root}", f"run.out_dir={tmp_path}", *TINY])  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model, BoundaryNet) and model.backbone_name == "resnet10t" and not model.detach_backbone


@pytest.fixture(scope="module")
def straight(voc_root: Path, relations: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 SGD steps in one go, validating at step 4."""
    out = tmp_path_factory.mktemp("irn") / "straight"
    args = _args(voc_root, out, relations, "train.max_iters=4", "train.ckpt_every=4", "train.eval_every=4")
    assert train.main(args) == 0
    return out


@pytest.mark.smoke
def test_a_boundary_run_trains_validates_and_resumes_bit_for_bit(straight, voc_root, relations, tmp_path):
    """Smoke test of the training itself (finite losses logged, a validation, checkpoints), then the exact resume."""
    records = read_metrics(straight / "metrics.jsonl", kind="train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        parts = [record[f"loss_aff_{k}"] for k in ("bg_pos", "fg_pos", "neg")]
        assert all(math.isfinite(v) for v in parts)
        assert record["loss_aff"] == pytest.approx(0.5 * (0.5 * (parts[0] + parts[1]) + parts[2]), rel=1e-5)
        assert record["loss_total"] == pytest.approx(record["loss_aff"], rel=1e-6)
    (val,) = read_metrics(straight / "metrics.jsonl", kind="val")
    assert val["step"] == 4 and 0.0 <= val["affinity_accuracy"] <= 1.0
    assert val["affinity_accuracy"] == pytest.approx((val["affinity_acc_pos"] + val["affinity_acc_neg"]) / 2)
    assert (straight / "checkpoints" / "best_affinity_accuracy.pth").is_file()
    a = read_checkpoint(straight / "checkpoints" / "last.pth")
    assert type(a["optimizer"]["state"]) is dict and all(
        "momentum_buffer" in s for s in a["optimizer"]["state"].values()
    )
    resumed = tmp_path / "resumed"
    schedule = ("train.max_iters=4", "train.ckpt_every=4", "train.eval_every=4")
    assert train.main(_args(voc_root, resumed, relations, *schedule, "train.stop_iter=2")) == 0
    assert train.main(_args(voc_root, resumed, relations, *schedule, "train.resume=auto")) == 0
    b = read_checkpoint(resumed / "checkpoints" / "last.pth")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():  # same crops (sampler seeds), same SGD momentum (checkpointed)
        assert torch.equal(value, b["model"][key]), key
    first = read_checkpoint(resumed / "checkpoints" / "iter_000002.pth")
    assert any(not torch.equal(value, first["model"][key]) for key, value in a["model"].items())  # it did train
    assert read_metrics(resumed / "metrics.jsonl", kind="val")[-1]["affinity_accuracy"] == val["affinity_accuracy"]


def test_the_trained_network_loads_from_its_run_folder_or_checkpoint_for_the_random_walk(straight, voc_root, tmp_path):
    saved = read_checkpoint(straight / "checkpoints" / "last.pth")["model"]
    for source in (straight, straight / "checkpoints" / "iter_000004.pth"):
        net = load_boundary_net(source, "cpu")
        assert isinstance(net, BoundaryNet) and not net.training
        assert all(torch.equal(value, saved[key]) for key, value in net.state_dict().items())
    images = torch.randint(0, 256, (1, 3, 40, 52), dtype=torch.uint8)
    assert load_boundary_net(straight).boundary(images).shape == (1, 10, 13)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"rw\.checkpoint=.*empty: no last\.pth"):
        load_boundary_net(empty)
    with pytest.raises(FileNotFoundError, match=r"rw\.checkpoint=.*missing: not found"):
        load_boundary_net(tmp_path / "missing")
    # a run of another task
    other = tmp_path / "msfc"
    (other / "checkpoints").mkdir(parents=True)
    cfg = load_config(["configs/voc.yaml"], [f"data.root={voc_root}", f"run.out_dir={other}"])
    from utils.checkpoint import save_checkpoint
    from utils.config import save_config

    save_config(cfg, other)
    save_checkpoint(other / "checkpoints" / "last.pth", model=torch.nn.Linear(1, 1), step=1)
    with pytest.raises(ConfigError, match=r"rw\.checkpoint=.*msfc is not an IRN run \(its config says task=msfc\)"):
        load_boundary_net(other)


@pytest.mark.slow
@pytest.mark.parametrize("detach", ["true", "false"])
def test_two_gloo_processes_train_the_boundary_network_with_identical_weights(voc_root, relations, tmp_path, detach):
    """DDP over 2 processes, with the IRN recipe's detached backbone and with the demo's trained one: the trainer's
    rank check at the final checkpoint finds every parameter and buffer equal."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tools.train",
               *_args(voc_root, out, relations, "train.max_iters=2", "train.ckpt_every=2",
                      f"irn.detach_backbone={detach}")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_metrics(out / "metrics.jsonl", kind="sync") == [
        {"step": 2, "kind": "sync", "ranks_identical": True, "world_size": 2}
    ]
    assert "global batch 4 (2 per process x 1 accumulation x 2)" in (out / "train.log").read_text()
