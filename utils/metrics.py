"""Segmentation metrics (SPEC §5.3): a dataset-level confusion matrix, mIoU & friends, and their table.

Every metric is derived from one int64 confusion matrix ``[C, C]`` (rows = ground truth, columns = prediction) over
the pixels whose ground truth is not the ignore index. Rates are fractions in [0, 1]; a rate whose denominator is
zero is ``None`` (JSON-friendly), never NaN. No config is read here, and no CAM is labelled here: the CAM threshold
sweep, which counts CAM labels into one matrix per threshold, lives with the CAM -> label rule in ``core/labels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from utils.dist import all_reduce_sum, is_distributed

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(array: ArrayLike, name: str) -> np.ndarray:
    """A numpy view/copy of ``array`` (torch tensors are detached and moved to the CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}")


def as_labels(array: ArrayLike, name: str) -> np.ndarray:
    """``array`` as an int64 numpy array; floats are rejected because a silent cast would hide a bug upstream."""
    array = to_numpy(array, name)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def check_range(values: np.ndarray, num_classes: int, name: str) -> None:
    """Raise if any value lies outside 0..num_classes-1, naming the first offending value."""
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} contains class id {bad}, outside the valid range 0..{num_classes - 1}")


def _reduce_device() -> torch.device:
    """Device for an all-reduce: NCCL only reduces CUDA tensors, gloo (and one process) works on the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_array(array: np.ndarray) -> np.ndarray:
    """Sum an int64 array over ranks (identity in one process) and return the reduced copy."""
    tensor = torch.from_numpy(array.copy()).to(_reduce_device())
    all_reduce_sum(tensor)
    return tensor.cpu().numpy()


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def compute_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """All SPEC §5.3 metrics of one confusion matrix.

    Args:
        matrix: int64 ``[C, C]``, rows = ground truth, columns = prediction.

    Returns:
        A JSON-serialisable dict: ``miou``, ``pixel_acc``, ``mean_acc`` (floats or None without pixels),
        per-class lists of length C ``iou``, ``precision``, ``recall``, ``fp_share``, ``fn_share`` (None where the
        denominator is zero), ``present`` (class ids with at least one GT pixel), ``num_pixels`` and ``num_classes``.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {matrix.shape}")
    tp = np.diag(matrix)
    gt_count = matrix.sum(axis=1)
    pred_count = matrix.sum(axis=0)
    fp = pred_count - tp
    fn = gt_count - tp
    union = tp + fp + fn
    present = gt_count > 0

    # SPEC §5.3: IoU (and thus mIoU) only exists for classes with ground truth; a class that is merely predicted
    # contributes its false positives to the other classes' unions but is not averaged in.
    iou = [_ratio(tp[c], union[c]) if present[c] else None for c in range(len(tp))]
    recall = [_ratio(tp[c], gt_count[c]) for c in range(len(tp))]
    precision = [_ratio(tp[c], pred_count[c]) for c in range(len(tp))]
    # IoU + FP share + FN share = 1 for every class with a non-empty union: the shares say which error dominates.
    fp_share = [_ratio(fp[c], union[c]) for c in range(len(tp))]
    fn_share = [_ratio(fn[c], union[c]) for c in range(len(tp))]
    total = int(gt_count.sum())
    return {
        "miou": _mean(iou),
        "pixel_acc": _ratio(tp.sum(), total),
        "mean_acc": _mean(recall),
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "fp_share": fp_share,
        "fn_share": fn_share,
        "present": [int(c) for c in np.flatnonzero(present)],
        "num_pixels": total,
        "num_classes": len(tp),
    }


class ConfusionMatrix:
    """Dataset-level confusion matrix (SPEC §5.3), int64 ``[C, C]``, rows = ground truth, columns = prediction.

    Args:
        num_classes: C, background included.
        ignore_index: ground-truth value whose pixels are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Accumulate one prediction.

        Args:
            pred: integer class ids ``[...]`` (e.g. ``[H, W]`` or ``[B, H, W]``), each in 0..C-1.
            gt: integer class ids of the same shape, 0..C-1 or ``ignore_index``.
        """
        pred_np = as_labels(pred, "pred")
        gt_np = as_labels(gt, "gt")
        if pred_np.shape != gt_np.shape:
            raise ValueError(f"pred and gt must have the same shape, got pred {pred_np.shape} and gt {gt_np.shape}")
        valid = gt_np != self.ignore_index
        gt_valid = gt_np[valid]
        pred_valid = pred_np[valid]
        check_range(gt_valid, self.num_classes, f"gt (besides ignore_index {self.ignore_index})")
        check_range(pred_valid, self.num_classes, "pred")
        # One bincount over the flat (gt, pred) index is much faster than np.add.at or a per-class loop.
        flat = gt_valid * self.num_classes + pred_valid
        self.matrix += np.bincount(flat, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same size into this one; returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over ranks (no-op in one process); every rank ends with the total. Returns ``self``."""
        self.matrix = all_reduce_array(self.matrix)
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self) -> dict[str, Any]:
        """The metrics of :func:`compute_metrics` for the accumulated matrix."""
        return compute_metrics(self.matrix)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def format_table(result: dict[str, Any], class_names: Sequence[str]) -> str:
    """A readable per-class table (percentages; ``-`` where undefined) followed by a summary line.

    Args:
        result: the dict of :func:`compute_metrics` / :meth:`ConfusionMatrix.compute`.
        class_names: C names, background first.
    """
    if len(class_names) != len(result["iou"]):
        raise ValueError(f"format_table got {len(class_names)} class names for {len(result['iou'])} classes")
    width = max(len("class"), *(len(name) for name in class_names))
    columns = ("IoU", "prec", "recall", "FP/U", "FN/U")
    lines = [f"{'class':<{width}}  " + "  ".join(f"{col:>7}" for col in columns)]
    for c, name in enumerate(class_names):
        values = (result["iou"][c], result["precision"][c], result["recall"][c])
        values += (result["fp_share"][c], result["fn_share"][c])
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(v):>7}" for v in values))
    lines.append(
        f"mIoU {_fmt(result['miou'])} over {len(result['present'])} classes with ground truth | "
        f"pixel acc {_fmt(result['pixel_acc'])} | mean acc {_fmt(result['mean_acc'])} | "
        f"{result['num_pixels']} pixels"
    )
    return "\n".join(lines)
