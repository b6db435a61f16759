"""IRN's boundary network (SPEC §9) as a :class:`engine.task.Task`: trained on relation labels by the generic trainer.

``tools/train.py`` trains it when the config says ``task: irn`` (``configs/irn/``), with everything the trainer brings
(run folder and lock, DDP, bf16 on CUDA, accumulation, atomic checkpoints, exact resume, TensorBoard, validation and
``best_affinity_accuracy.pth``). The task brings:

- the data: the images of ``data.train_split`` with their relation labels from ``irn.relations`` (label PNGs: 0
  background, class ids, 255 unknown; ``tools.make_relations``), cropped together by
  ``datasets.pseudo.PseudoLabelDataset`` (``data.crop_size``, ``data.scale_range``, flip);
- the model: ``models.build_model`` (``task: irn`` builds ``models.boundary.BoundaryNet``);
- the loss: the boundary map ``B = sigmoid(logits)`` (fp32) at stride 4; the relation label read at the same grid (the
  crop's pixel ``(4y, 4x)``; the crop's padding is 255, so it makes no pair); the pairs within ``irn.radius``
  (``core.affinity.pair_labels``: background-positive, foreground-positive, negative); their affinity
  ``a = 1 − max B`` on the path (``core.affinity.path_max_affinity``); ``losses.AffinityLoss``. Logged as
  ``loss_aff`` with its three means ``loss_aff_bg_pos`` / ``loss_aff_fg_pos`` / ``loss_aff_neg`` through
  ``losses.combine`` (one host read per step, also the finiteness check);
- no BatchNorm statistics to keep in step across ranks: the backbone's BatchNorm is frozen;
- validation on ``data.val_split`` (whose masks are the ground truth): ``affinity_accuracy``, the balanced accuracy of
  ``a > 0.5`` on the ground-truth mask's pairs within ``irn.radius`` at stride 4 (the mean of the accuracy on positive
  pairs and on negative pairs), from the flip-averaged boundary map the random walk uses (``rw.flip``), fp32, at the
  images' full resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from core.affinity import PairIndex, pair_index, pair_labels, path_max_affinity
from datasets import build_dataset, build_label_dataset, collate_eval
from engine.inference import autocast
from losses import AffinityLoss, TermSchedule
from models import build_model
from utils import dist
from utils.checkpoint import unwrap
from utils.config import ConfigError
from utils.logging import progress_bar
from utils.metrics import all_reduce_array
from utils.visualize import overlay, side_by_side

logger = logging.getLogger(__name__)

IRN_METRICS = ("affinity_accuracy",)
# The task's one loss term, weight 1 from step 0 (logged as loss_aff; its three means as loss_aff_<part>).
SCHEDULE = TermSchedule({"aff": 1.0}, {"aff": 0}, {"aff": 0}, terms=("aff",))
OVERLAY_PANELS = ("image", "boundary", "ground truth")
# The boundary map's stride: a relation / ground-truth label is read at the pixel (STRIDE·y, STRIDE·x).
STRIDE = 4
# A pair counts as connected when its affinity is above this (validation).
CONNECTED = 0.5


def labels_at_stride(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label map ``[B, H, W]`` at the boundary map's grid: the pixels ``(4y, 4x)``, ``[B, h, w]`` = ``size``.

    Raises:
        ValueError: the grid of ``label[:, ::4, ::4]`` is not ``size`` (a network whose stem is not stride 4).
    """
    small = label[:, ::STRIDE, ::STRIDE]
    if tuple(small.shape[-2:]) != tuple(size):
        raise ValueError(
            f"labels_at_stride: a {tuple(label.shape[-2:])} label read every {STRIDE} pixels is "
            f"{tuple(small.shape[-2:])}, but the boundary map is {tuple(size)}"
        )
    return small


def pair_accuracy_counts(
    boundary: torch.Tensor, label: torch.Tensor, index: PairIndex, ignore_index: int
) -> np.ndarray:
    """Counts for the balanced pair accuracy of a boundary map against a label map at the same grid.

    Args:
        boundary: ``[B, h, w]`` probabilities in [0, 1].
        label: int ``[B, h, w]`` (0 background, class ids, ``ignore_index``).
        index: the pairs (``core.affinity.pair_index``).
        ignore_index: the unknown label.

    Returns:
        int64 ``[4]``: positive pairs (both ends the same label) with ``a > 0.5``, positive pairs, negative pairs with
        ``a <= 0.5``, negative pairs.
    """
    affinity, _ = path_max_affinity(boundary.float(), index)
    bg_pos, fg_pos, neg = pair_labels(label, index, ignore_index)
    connected = affinity > CONNECTED
    positive = bg_pos | fg_pos
    counts = torch.stack([(connected & positive).sum(), positive.sum(), (~connected & neg).sum(), neg.sum()])
    return counts.cpu().numpy().astype(np.int64)


def balanced_accuracy(counts: np.ndarray) -> dict[str, float]:
    """``affinity_accuracy`` (the mean of the accuracies of the kinds that occur; 0 when none does) and the two
    accuracies (``affinity_acc_pos`` / ``affinity_acc_neg``; 0 for a kind without pairs) of
    :func:`pair_accuracy_counts`' totals."""
    right_pos, pos, right_neg, neg = (int(v) for v in counts)
    parts = [right / total for right, total in ((right_pos, pos), (right_neg, neg)) if total > 0]
    return {
        "affinity_accuracy": float(np.mean(parts)) if parts else 0.0,
        "affinity_acc_pos": right_pos / pos if pos else 0.0,
        "affinity_acc_neg": right_neg / neg if neg else 0.0,
    }


def boundary_panel(boundary: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A ``[h, w]`` boundary map as a grey uint8 ``[H, W]`` picture at the image's ``size`` (white = boundary)."""
    up = F.interpolate(boundary[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def validate_boundary(
    model: nn.Module, dataset: Any, index: PairIndex, *, flip: bool, ignore_index: int, num_workers: int,
    num_vis: int, device: torch.device,
) -> tuple[dict[str, float], list[np.ndarray]]:  # fmt: skip
    """``affinity_accuracy`` (and its two parts) of ``model`` on ``dataset`` (eval items with masks), sharded over
    ranks, the counts all-reduced (every rank returns the same numbers); up to ``num_vis`` overlays (image | boundary |
    ground truth) of rank 0's first images.

    Args:
        model: a ``BoundaryNet`` (or its DDP wrapper); its mode is restored.
        dataset: eval items ``img`` uint8 ``[3, H, W]``, ``mask`` int64 ``[H, W]``.
        index: the pairs scored.
        flip: the boundary map of the image and its flip (``rw.flip``).
        ignore_index: the masks' unknown label.
        num_workers: loader workers.
        num_vis: overlays to return.
        device: where the network runs.
    """
    bare = unwrap(model)
    counts = np.zeros(4, dtype=np.int64)
    loader = DataLoader(Subset(dataset, dist.shard(range(len(dataset)))), batch_size=1, num_workers=num_workers,
                        collate_fn=collate_eval)  # fmt: skip
    overlays = []
    for item in progress_bar(loader, desc="validate", disable=not dist.is_main_process(), leave=False):
        image = item["img"][0].to(device)[None]
        boundary = bare.boundary(image, flip=flip)  # eval mode, fp32; the mode is restored
        mask = item["mask"][0].to(device)[None]
        counts += pair_accuracy_counts(boundary, labels_at_stride(mask, boundary.shape[-2:]), index, ignore_index)
        if dist.is_main_process() and len(overlays) < num_vis:
            rgb = item["img"][0].permute(1, 2, 0).numpy()
            gt = item["mask"][0].numpy().astype(np.uint8)
            overlays.append(side_by_side([rgb, boundary_panel(boundary[0], rgb.shape[:2]), overlay(rgb, gt)]))
    return balanced_accuracy(all_reduce_array(counts)), overlays


class BoundaryTask:
    """IRN's boundary network as a :class:`engine.task.Task` (module docstring). Constructed as
    ``BoundaryTask(cfg, device)``.

    Raises:
        ConfigError: ``irn.relations`` unset.
    """

    metrics = IRN_METRICS
    local_state: tuple[str, ...] = ()  # frozen BatchNorm: every parameter and buffer agrees across ranks
    overlay_panels = OVERLAY_PANELS

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        irn = cfg.irn
        if irn.relations is None:
            raise ConfigError(
                "irn.relations must be set with task=irn: the folder of relation labels to train on, e.g. "
                "irn.relations=RUN/relations/train_aug of a stage-1 run (tools.make_relations)"
            )
        self.cfg, self.device = cfg, device
        self.relations = Path(str(irn.relations)).expanduser()
        self.index = pair_index(int(irn.radius))
        self.precision = str(cfg.train.precision)
        self.ignore_index = int(cfg.data.ignore_index)
        self.criterion = AffinityLoss()

    def describe(self) -> str:
        irn = self.cfg.irn
        backbone = "detached" if bool(irn.detach_backbone) else "trained"
        return f"IRN boundary network {irn.backbone} ({backbone} backbone) on relation labels {self.relations}"

    def dataset(self, split: str, mode: str) -> Dataset:
        if mode != "train":
            return build_dataset(self.cfg, split, "eval")
        return build_label_dataset(self.cfg, split, self.relations, "hard", key="irn.relations",
                                   maker=f"tools.make_relations --run-dir RUN eval.split={split}")  # fmt: skip

    def build_model(self) -> nn.Module:
        return build_model(self.cfg)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        tc = self.cfg.train
        return unwrap(model).param_groups(float(tc.lr), float(tc.weight_decay))

    def phase(self, step: int) -> str:
        return "all"  # one phase: what trains, trains from the first step

    def enter_phase(self, model: nn.Module, phase: str) -> None:
        pass

    def loss(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = unwrap(model).normalize(batch["img"])
        with autocast(self.device, self.precision):
            logits = model(x)
        boundary = torch.sigmoid(logits.float())
        label = labels_at_stride(batch["target"], boundary.shape[-2:])
        bg_pos, fg_pos, neg = pair_labels(label, self.index, self.ignore_index)
        affinity, _ = path_max_affinity(boundary, self.index)
        term, parts = self.criterion(affinity, bg_pos, fg_pos, neg)
        return SCHEDULE.combine({"aff": term}, step, extra={f"loss_aff_{name}": v for name, v in parts.items()})

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        pass

    def validate(self, model: nn.Module, dataset: Any) -> tuple[dict[str, float], list[np.ndarray]]:
        cfg = self.cfg
        return validate_boundary(
            model, dataset, self.index, flip=bool(cfg.rw.flip), ignore_index=self.ignore_index,
            num_workers=int(cfg.data.num_workers), num_vis=int(cfg.train.num_vis), device=self.device,
        )  # fmt: skip

    def tracked_metrics(self, step: int) -> list[str]:
        return list(IRN_METRICS)
