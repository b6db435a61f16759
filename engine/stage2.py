"""The second stage (SPEC §10) as a :class:`engine.task.Task`: a segmentation network trained on pseudo labels.

``tools/train.py`` trains it with the same :class:`engine.trainer.Trainer` as MSFC when the config says
``task: stage2`` (``configs/stage2/``): run folder and lock, DDP, bf16 on CUDA, gradient accumulation, atomic
checkpoints, exact resume, TensorBoard, validation with segmentation mIoU and ``best_seg.pth``. The task brings:

- the data: the images of ``data.train_split`` (``datasets.build_dataset``) with their pseudo labels from
  ``stage2.labels`` (``datasets.pseudo.PseudoLabelDataset``: hard PNGs or compact soft labels, checked at start-up);
- the model: ``models.build_model`` (``task: stage2`` builds ``models.stage2.Stage2Segmenter``), whose
  ``data.crop_size`` must be a multiple of its output stride;
- the loss: ``losses.HardCrossEntropy`` or ``losses.SoftCrossEntropy`` (``stage2.target``), logged as ``loss_seg``
  through ``losses.combine`` (its one host read per step is also the finiteness check);
- BatchNorm across ranks: SyncBatchNorm on CUDA (``stage2.sync_bn``); otherwise the running statistics are averaged
  over the ranks after every optimiser step, so the ranks hold identical weights and statistics (the trainer checks
  it at every checkpoint);
- validation: segmentation mIoU on ``data.val_split`` with the ``eval.*`` multi-scale + flip inference of
  ``engine.inference.predict_seg_logits`` (what ``tools/infer_seg.py`` runs), fp32 as stage 1's validation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from core.pseudo_labels import load_soft_label
from datasets import build_dataset, build_label_dataset, collate_eval
from engine.inference import autocast, predict_seg_logits
from losses import HardCrossEntropy, SoftCrossEntropy, TermSchedule
from models import build_model
from models.stage2 import SMP_DEEPLABS
from utils import dist
from utils.checkpoint import unwrap
from utils.config import ConfigError
from utils.errors import InputError
from utils.logging import progress_bar
from utils.metrics import ConfusionMatrix
from utils.visualize import overlay, side_by_side

logger = logging.getLogger(__name__)

STAGE2_METRICS = ("seg_miou",)
# The stage's one loss term, weight 1 from step 0 (losses.combine logs it as loss_seg).
SCHEDULE = TermSchedule({"seg": 1.0}, {"seg": 0}, {"seg": 0}, terms=("seg",))
OVERLAY_PANELS = ("image", "prediction", "ground truth")
_NORM_STATISTICS = ("running_mean", "running_var")


def read_soft_compact(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One soft label as ``(classes int64 [K], prob float32 [K, H, W])``: the classes that hold mass somewhere.

    Read by the format's owner, :func:`core.pseudo_labels.load_soft_label` (which expands to all C classes; its
    errors name the file and become user errors here).
    """
    try:
        full = load_soft_label(path, num_classes)
    except ValueError as err:
        raise InputError(str(err)) from err
    classes = np.flatnonzero(full.reshape(num_classes, -1).max(axis=1) > 0)
    return classes, full[classes]


def average_norm_statistics(model: nn.Module) -> None:
    """Average every BatchNorm running mean / variance over the ranks, in place (one all-reduce; no-op alone)."""
    buffers = [b for name, b in unwrap(model).named_buffers() if name.endswith(_NORM_STATISTICS)]
    if dist.get_world_size() == 1 or not buffers:
        return
    flat = dist.all_reduce_mean(torch.cat([b.detach().reshape(-1).float() for b in buffers]))
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


@torch.no_grad()
def validate_segmentation(
    model: nn.Module, dataset: Any, cfg: DictConfig, device: torch.device
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Segmentation mIoU of ``model`` on ``dataset`` (eval items with masks), sharded over ranks, fp32.

    The inference is ``eval.*`` (scales, flip, fusions, resize) through ``predict_seg_logits``; the confusion matrix
    is all-reduced, so every rank returns the same number. Also returns up to ``train.num_vis`` overlays
    (image | prediction | ground truth) of rank 0's first images.
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    matrix = ConfusionMatrix(int(cfg.data.num_classes), int(cfg.data.ignore_index))
    loader = DataLoader(Subset(dataset, dist.shard(range(len(dataset)))), batch_size=1,
                        num_workers=int(cfg.data.num_workers), collate_fn=collate_eval)  # fmt: skip
    ev, overlays = cfg.eval, []
    for item in progress_bar(loader, desc="validate", disable=not dist.is_main_process(), leave=False):
        image = item["img"][0].to(device)[None]
        logits = predict_seg_logits(bare, image, tuple(ev.scales), bool(ev.flip), str(ev.flip_fusion),
                                    str(ev.scale_fusion), ev.resize, resize_mode=str(ev.resize_mode))  # fmt: skip
        prediction = logits[0].argmax(0).to(torch.uint8).cpu().numpy()
        gt = item["mask"][0].numpy()
        matrix.update(prediction, gt)
        if dist.is_main_process() and len(overlays) < int(cfg.train.num_vis):
            rgb = item["img"][0].permute(1, 2, 0).numpy()
            overlays.append(side_by_side([rgb, overlay(rgb, prediction), overlay(rgb, gt.astype(np.uint8))]))
    bare.train(was_training)
    return {"seg_miou": float(matrix.all_reduce().compute()["miou"] or 0.0)}, overlays


class Stage2Task:
    """The second stage as a :class:`engine.task.Task` (module docstring). Constructed as ``Stage2Task(cfg, device)``.

    Raises:
        ConfigError: ``stage2.labels`` unset, or a batch that smp's DeepLab decoders cannot train on.
    """

    metrics = STAGE2_METRICS
    local_state: tuple[str, ...] = ()  # every parameter and buffer (BatchNorm statistics too) must agree across ranks
    overlay_panels = OVERLAY_PANELS

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        s = cfg.stage2
        if s.labels is None:
            raise ConfigError(
                "stage2.labels must be set with task=stage2: the folder of pseudo labels to train on, e.g. "
                "stage2.labels=RUN/pseudo_labels/train_aug of a stage-1 run (docs/stage2.md)"
            )
        if str(s.arch) in SMP_DEEPLABS and int(cfg.train.batch_size) < 2:
            raise ConfigError(
                f"train.batch_size must be at least 2 with stage2.arch={s.arch}: its ASPP image-pooling branch "
                "normalises a 1x1 map with BatchNorm, which needs 2 images per process"
            )
        self.cfg, self.device = cfg, device
        self.target, self.labels = str(s.target), Path(str(s.labels))
        self.precision = str(cfg.train.precision)
        self.sync_bn = bool(s.sync_bn) and device.type == "cuda" and dist.get_world_size() > 1
        ignore = int(cfg.data.ignore_index)
        self.criterion = HardCrossEntropy(ignore) if self.target == "hard" else SoftCrossEntropy()

    def describe(self) -> str:
        s = self.cfg.stage2
        return f"stage 2 {s.arch} / {s.encoder} on {self.target} pseudo labels ({self.labels})"

    def dataset(self, split: str, mode: str) -> Dataset:
        if mode != "train":
            return build_dataset(self.cfg, split, "eval")
        read_soft = partial(read_soft_compact, num_classes=int(self.cfg.data.num_classes))
        return build_label_dataset(self.cfg, split, self.labels, self.target, read_soft=read_soft)

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg)
        crop, stride = int(self.cfg.data.crop_size), model.patch_size
        if crop % stride:
            below = crop // stride * stride
            raise ConfigError(
                f"data.crop_size must be a multiple of the output stride {stride} of stage2.arch="
                f"{self.cfg.stage2.arch} / stage2.encoder={self.cfg.stage2.encoder}, got {crop}; e.g. "
                f"{' or '.join(str(v) for v in (below, below + stride) if v > 0)}"
            )
        if self.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        tc = self.cfg.train
        return unwrap(model).param_groups(float(tc.lr), float(tc.head_lr_mult), float(tc.weight_decay))

    def phase(self, step: int) -> str:
        return "all"  # one phase: everything trains from the first step

    def enter_phase(self, model: nn.Module, phase: str) -> None:
        pass

    def loss(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = unwrap(model).normalize(batch["img"])
        with autocast(self.device, self.precision):
            logits = model(x).seg_logits
        if self.target == "hard":
            term = self.criterion(logits, batch["target"])
        else:
            term = self.criterion(logits, batch["soft"], batch["soft_classes"])
        return SCHEDULE.combine({"seg": term}, step)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if not self.sync_bn:
            average_norm_statistics(model)

    def validate(self, model: nn.Module, dataset: Any) -> tuple[dict[str, float], list[np.ndarray]]:
        return validate_segmentation(model, dataset, self.cfg, self.device)

    def tracked_metrics(self, step: int) -> list[str]:
        return list(STAGE2_METRICS)
