"""What the trainer needs from a method (:class:`Task`), and MSFC's answer (:class:`MSFCTask`).

``engine.trainer.Trainer`` owns the loop, the run folder, DDP, checkpoints and resume; a task owns everything that is
the method's: the model and its parameter groups, the loss of a micro-batch, the curriculum's phases (which heads
train), what follows an optimiser step (EMA teacher, memory bank) and validation. A second-stage segmenter is another
task trained by the same loop (docs/design.md, "How to extend").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from datasets import build_dataset
from engine.step import TrainStep
from engine.validate import OVERLAY_PANELS, validate
from models import build_model
from utils.checkpoint import unwrap

# Term-specific heads of MSFC and the terms that train each; a head is frozen while none of its terms is active.
HEAD_TERMS = {"decoder": ("seg", "reg"), "proj_head": ("ctc",)}
# MSFC's validation metrics whose best checkpoint is kept (best_cam.pth, best_seg.pth).
MSFC_METRICS = ("cam_miou", "seg_miou")


class Task(Protocol):
    """The method a :class:`engine.trainer.Trainer` trains. Constructed as ``make_task(cfg, device)``.

    Attributes:
        metrics: validation metrics whose best checkpoint is kept (``best_file(metric)``), higher is better.
        local_state: prefixes of buffers that may legitimately differ between ranks (skipped by the rank check).
    """

    metrics: tuple[str, ...]
    local_state: tuple[str, ...]

    def describe(self) -> str:
        """A few words for the set-up log line (e.g. the method and its backbone)."""

    def dataset(self, split: str, mode: str) -> Dataset:
        """The dataset of ``split``: ``mode`` "train" or "eval" (what :meth:`validate` receives).

        A train dataset is indexed by ``(index, seed)`` pairs from ``utils.sampler.InfiniteSampler`` (the seed drives
        that sample's augmentation, so a resumed run sees the same crops) and batched by the default collate. Every
        rank calls it. An eval dataset with ``image_paths`` / ``mask_paths`` has its files checked at start-up.
        """

    def build_model(self) -> nn.Module:
        """The model, on the CPU (the trainer moves it)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (each with its ``lr``)."""

    def phase(self, step: int) -> Hashable:
        """The phase of ``step``; when it changes, :meth:`enter_phase` runs and DDP is rebuilt over what trains."""

    def enter_phase(self, model: nn.Module, phase: Hashable) -> None:
        """Freeze / unfreeze what the phase does not / does train."""

    def loss(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss for backward, scalars to log) of one micro-batch; ``model`` may be DDP-wrapped.

        ``batch`` is on the device, with the loader's CPU batch under ``"host"``: a value needed on the host is read
        there (a device read would synchronise). Each host read of a device value costs a synchronisation per
        micro-step on CUDA; MSFC's step makes one (its logged numbers, ``losses.combine``).
        """

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Runs on every rank after the optimiser step ``step`` (EMA updates, banks, ...)."""

    def validate(self, model: nn.Module, dataset: Any) -> tuple[dict[str, float], list[np.ndarray]]:
        """(metrics, the same on every rank; overlay images of rank 0) on ``dataset``."""

    def tracked_metrics(self, step: int) -> list[str]:
        """Which of :attr:`metrics` a validation after training step ``step`` may improve."""


def heads_in_use(schedule: Any, step: int) -> dict[str, bool]:
    """Which of MSFC's term-specific heads receive gradient at ``step`` (``schedule``: a ``losses.TermSchedule``)."""
    active = set(schedule.active(step))
    return {head: any(term in active for term in terms) for head, terms in HEAD_TERMS.items()}


class MSFCTask:
    """MSFC (SPEC §3–§6) as a :class:`Task`: the train step of ``engine/step.py``, the curriculum's head phases, the
    EMA teacher and the memory bank after each optimiser step, CAM / aux-CAM / seg validation."""

    metrics = MSFC_METRICS
    # Named in the TensorBoard tag of each validation overlay: "val/<i> (image | CAM | CAM label | ...)".
    overlay_panels = OVERLAY_PANELS
    # The memory bank's accumulators differ between ranks until its next all-reduce.
    local_state = ("memory.acc_",)

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.step = TrainStep(cfg, device)

    def describe(self) -> str:
        return f"MSFC {self.cfg.model.backbone}"

    def dataset(self, split: str, mode: str) -> Dataset:
        return build_dataset(self.cfg, split, mode)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        tc = self.cfg.train
        return unwrap(model).param_groups(float(tc.lr), float(tc.head_lr_mult), float(tc.weight_decay))

    def phase(self, step: int) -> dict[str, bool]:
        return heads_in_use(self.step.schedule, step)

    def enter_phase(self, model: nn.Module, phase: Mapping[str, bool]) -> None:
        bare = unwrap(model)
        for head, trainable in phase.items():
            bare.set_head_trainable(head, trainable)

    def loss(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.step(model, batch, step, generator)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.step.after_optimizer_step(model, step)

    def validate(self, model: nn.Module, dataset: Any) -> tuple[dict[str, float], list[np.ndarray]]:
        return validate(model, dataset, self.cfg, self.device)

    def tracked_metrics(self, step: int) -> list[str]:
        # a decoder that has not trained yet would set a meaningless best_seg
        return ["cam_miou", "seg_miou"] if self.phase(step)["decoder"] else ["cam_miou"]
