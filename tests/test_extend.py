"""The extension points of docs/design.md ("How to extend"), each exercised by something plugged in from outside:
a test-only loss term, a test-only second-stage task trained by the generic trainer, and a test-only dataset layout.
(Other backbone families through timm: tests/test_backbone_families.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

import datasets
from datasets import build_dataset
from datasets.base import Layout
from datasets.voc import VOC_LAYOUT
from engine.step import StepContext, TrainStep
from engine.task import MSFCTask
from engine.trainer import Trainer
from losses import TERMS, TermSchedule
from models import build_model
from utils.checkpoint import read_checkpoint
from utils.config import ConfigError, load_config
from utils.logging import read_metrics

CROP = 64


def _cfg(*overrides: str):
    return load_config("configs/smoke.yaml", ["data.root=/unused", "run.out_dir=/unused", *overrides])


def _batch(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    labels = torch.zeros(b, 20)
    labels[:, 3] = 1
    return {
        "img": torch.randint(0, 256, (b, 3, CROP, CROP), dtype=torch.uint8, generator=g),
        "g2": torch.randint(0, 256, (b, 3, CROP, CROP), dtype=torch.uint8, generator=g),
        "img_box": torch.tensor([(0, CROP, 0, CROP)] * b),
        "label": labels,
    }


# ----------------------------------------------------------------------------------------------------------------------
# A new loss term: a method on the step, its name in the schedule
# ----------------------------------------------------------------------------------------------------------------------

TOKEN_L2_WEIGHT = 0.25


class StepWithTokenL2(TrainStep):
    """MSFC's step plus a test-only term: the mean squared final patch token, weight 0.25 from step 0."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        s = self.schedule
        self.schedule = TermSchedule({**s.weights, "token_l2": TOKEN_L2_WEIGHT}, s.start_iters, s.ramps,
                                     terms=(*TERMS, "token_l2"))  # fmt: skip
        self.terms["token_l2"] = self._token_l2

    def _token_l2(self, ctx: StepContext) -> torch.Tensor:
        return ctx.outs["main"].tokens.float().pow(2).mean()


def test_a_new_loss_term_is_computed_weighted_logged_and_trains_the_model():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    device = torch.device("cpu")
    total, logs = TrainStep(cfg, device)(model, _batch(), 0, torch.Generator().manual_seed(0))
    total_new, logs_new = StepWithTokenL2(cfg, device)(model, _batch(), 0, torch.Generator().manual_seed(0))
    # same views (same generator), so every other term is identical and the total grows by exactly w · L
    assert logs_new["loss_token_l2"] > 0
    assert {k: v for k, v in logs_new.items() if k not in ("loss_token_l2", "loss_total")} == {
        k: v for k, v in logs.items() if k != "loss_total"
    }
    assert total_new.item() == pytest.approx(total.item() + TOKEN_L2_WEIGHT * logs_new["loss_token_l2"], rel=1e-5)
    total_new.backward()
    assert model.backbone.vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_a_new_term_must_be_named_in_the_schedule():
    step = TrainStep(_cfg(), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown loss term 'token_l2'"):
        step.schedule.combine({"cls": torch.tensor(1.0), "token_l2": torch.tensor(1.0)}, 0)


class MSFCWithTokenL2(MSFCTask):
    """The MSFC task with the extended step: the whole trainer runs it unchanged."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.step = StepWithTokenL2(cfg, device)


def test_the_trainer_trains_a_task_with_a_new_term(voc_root: Path, tmp_path: Path):
    cfg = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, MSFCWithTokenL2)
    try:
        trainer.fit()
    finally:
        trainer.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", kind="train")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss_token_l2"] > 0 for r in records)


# ----------------------------------------------------------------------------------------------------------------------
# A second-stage model: a task of its own, trained by the same loop
# ----------------------------------------------------------------------------------------------------------------------


class TwoTone(Dataset):
    """Images whose left half is dark (class 0) and right half bright (class 1), plus noise; masks to match."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.masks = torch.zeros(n, 16, 16, dtype=torch.long)
        self.masks[:, :, 8:] = 1
        self.images = self.masks[:, None].float() * 0.6 + 0.2 + 0.1 * torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, _seed = key  # the trainer's sampler yields (index, per-sample seed)
        return {"img": self.images[index], "mask": self.masks[index]}


class PixelSegmenterTask:
    """A test-only second-stage segmenter: a 1×1 convolution trained with cross-entropy on masks, scored by mIoU."""

    metrics = ("seg_miou",)
    local_state = ()

    def __init__(self, cfg, device) -> None:
        self.cfg, self.device, self.after_steps = cfg, device, []

    def describe(self) -> str:
        return "pixel segmenter"

    def dataset(self, split: str, mode: str) -> Dataset:
        return TwoTone(8, seed=0 if mode == "train" else 1)

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Conv2d(3, 2, 1)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": list(model.parameters()), "lr": float(self.cfg.train.lr)}]

    def phase(self, step: int) -> str:
        return "all"

    def enter_phase(self, model: nn.Module, phase: str) -> None:
        pass

    def loss(self, model, batch, step, generator):
        loss = F.cross_entropy(model(batch["img"]), batch["mask"])
        return loss, {"loss_total": float(loss.detach())}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.after_steps.append(step)

    @torch.no_grad()
    def validate(self, model, dataset):
        prediction = model(dataset.images).argmax(1)
        ious = [((prediction == c) & (dataset.masks == c)).sum() / ((prediction == c) | (dataset.masks == c)).sum()
                for c in (0, 1)]  # fmt: skip
        return {"seg_miou": float(torch.stack(ious).mean())}, []

    def tracked_metrics(self, step: int) -> list[str]:
        return ["seg_miou"]


def test_a_second_stage_task_trains_checkpoints_and_validates_through_the_generic_trainer(tmp_path: Path):
    out = tmp_path / "stage2"
    cfg = load_config("configs/smoke.yaml", ["data.root=/unused", f"run.out_dir={out}", "train.max_iters=30",
                                             "train.lr=0.05", "train.eval_every=15", "train.ckpt_every=30",
                                             "train.warmup_iters=0", "train.batch_size=4"])  # fmt: skip
    trainer = Trainer(cfg, PixelSegmenterTask)
    try:
        best = trainer.fit()
        after_steps = trainer.task.after_steps
    finally:
        trainer.close()
    assert after_steps == list(range(30))  # the hook ran after every optimiser step
    records = read_metrics(out / "metrics.jsonl", kind="train")
    assert records[-1]["loss_total"] < 0.5 * records[0]["loss_total"]  # it learned
    val = read_metrics(out / "metrics.jsonl", kind="val")
    assert [r["step"] for r in val] == [15, 30] and val[-1]["seg_miou"] > 0.9
    assert best["seg_miou"]["score"] == pytest.approx(max(r["seg_miou"] for r in val))
    saved = read_checkpoint(out / "checkpoints" / "best_seg.pth")
    assert set(saved["model"]) == {"weight", "bias"}  # the task's model, not MSFC


# ----------------------------------------------------------------------------------------------------------------------
# A new dataset layout: a Layout registered under a data.name of its own
# ----------------------------------------------------------------------------------------------------------------------


def test_a_new_dataset_layout_is_read_through_the_registry(voc_root: Path, tmp_path: Path, monkeypatch):
    """A flat layout (images/, masks/, splits/<split>.txt) filled from the synthetic VOC data: same ids, same labels."""
    flat = tmp_path / "flat"
    ids = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()[:6]
    (flat / "images").mkdir(parents=True)
    (flat / "masks").mkdir()
    (flat / "splits").mkdir()
    for name in ids:
        shutil.copy(voc_root / "JPEGImages" / f"{name}.jpg", flat / "images" / f"{name}.jpg")
        shutil.copy(voc_root / "SegmentationClass" / f"{name}.png", flat / "masks" / f"{name}.png")
    (flat / "splits" / "val.txt").write_text("\n".join(ids) + "\n")
    layout = Layout(name="flat", description="flat/{images/<id>.jpg, masks/<id>.png, splits/<split>.txt}",
                    image_dir="images", mask_dirs=("masks",), list_file="splits/{split}.txt",
                    class_names=VOC_LAYOUT.class_names)  # fmt: skip
    monkeypatch.setitem(datasets.LAYOUTS, "flat", layout)
    cfg = load_config("configs/smoke.yaml", [f"data.root={flat}", "data.name=flat", f"run.out_dir={tmp_path / 'r'}"])
    mine = build_dataset(cfg, "val", "eval")
    voc = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={tmp_path / 'v'}"])
    reference = build_dataset(voc, "val", "eval")
    assert mine.ids == ids
    for index, name in enumerate(ids):
        item, expected = mine[index], reference[reference.ids.index(name)]
        assert torch.equal(item["label"], expected["label"])
        assert np.array_equal(np.asarray(item["mask"]), np.asarray(expected["mask"]))
        assert np.array_equal(np.asarray(item["mask"]), np.asarray(Image.open(flat / "masks" / f"{name}.png")))


def test_an_unregistered_layout_is_a_config_error_listing_the_layouts(tmp_path: Path):
    cfg = load_config("configs/smoke.yaml", [f"data.root={tmp_path}", "data.name=flat", f"run.out_dir={tmp_path}"])
    expected = r"data.name must be one of the dataset layouts \['coco', 'voc'\], got 'flat'"
    with pytest.raises(ConfigError, match=expected):
        build_dataset(cfg, "val", "eval")
