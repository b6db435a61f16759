"""Segmentation metrics (SPEC §5.3): a dataset-level confusion matrix, mIoU & friends, and the CAM threshold sweep.

Every metric is derived from one int64 confusion matrix ``[C, C]`` (rows = ground truth, columns = prediction) over
the pixels whose ground truth is not the ignore index. Rates are fractions in [0, 1]; a rate whose denominator is
zero is ``None`` (JSON-friendly), never NaN. No config is read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from utils.dist import all_reduce_sum, is_distributed

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(array: ArrayLike, name: str) -> np.ndarray:
    """A numpy view/copy of ``array`` (torch tensors are detached and moved to the CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if isinstance(array, np.ndarray):
        return array
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}")


def _as_labels(array: ArrayLike, name: str) -> np.ndarray:
    """``array`` as an int64 numpy array; floats are rejected because a silent cast would hide a bug upstream."""
    array = _to_numpy(array, name)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_range(values: np.ndarray, num_classes: int, name: str) -> None:
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


def _all_reduce_array(array: np.ndarray) -> np.ndarray:
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
        pred_np = _as_labels(pred, "pred")
        gt_np = _as_labels(gt, "gt")
        if pred_np.shape != gt_np.shape:
            raise ValueError(f"pred and gt must have the same shape, got pred {pred_np.shape} and gt {gt_np.shape}")
        valid = gt_np != self.ignore_index
        gt_valid = gt_np[valid]
        pred_valid = pred_np[valid]
        _check_range(gt_valid, self.num_classes, f"gt (besides ignore_index {self.ignore_index})")
        _check_range(pred_valid, self.num_classes, "pred")
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
        self.matrix = _all_reduce_array(self.matrix)
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


def _max_and_class(cams: ArrayLike, classes: ArrayLike, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max CAM value and the class id of the argmax.

    Args:
        cams: float ``[K, H, W]``, the present classes only (K may be 0).
        classes: int ``[K]``, their class ids (1..C_fg).
        image_shape: ``(H, W)``; the output shape, needed when K = 0.

    Returns:
        ``(value float64 [H, W], class_id int64 [H, W])``; with K = 0 the value is -inf and the class 0, so the
        pixel is background at every threshold. float64 so that both the sweep and the single-threshold path compare
        against the threshold in the same precision (a float16 CAM compared with a Python float would otherwise be
        compared in float16).
    """
    cams_np = _to_numpy(cams, "cams")
    classes_np = _as_labels(classes, "classes").reshape(-1)
    height, width = (int(s) for s in image_shape)
    if cams_np.ndim != 3 or cams_np.shape[0] != classes_np.shape[0] or cams_np.shape[1:] != (height, width):
        raise ValueError(
            f"cams must be [K, H, W] with K = len(classes) = {classes_np.shape[0]} and (H, W) = {(height, width)}, "
            f"got cams of shape {cams_np.shape}"
        )
    if not np.issubdtype(cams_np.dtype, np.floating):
        raise TypeError(f"cams must be floating point, got dtype {cams_np.dtype}")
    if classes_np.size and classes_np.min() < 1:
        raise ValueError(f"classes must be foreground ids >= 1, got {int(classes_np.min())}")
    if classes_np.size == 0:
        return np.full((height, width), -np.inf), np.zeros((height, width), dtype=np.int64)
    if not np.isfinite(cams_np).all():
        raise ValueError("cams contain NaN or inf values")
    index = cams_np.argmax(axis=0)
    value = np.take_along_axis(cams_np, index[None], axis=0)[0].astype(np.float64)
    return value, classes_np[index]


def cam_to_label(cams: ArrayLike, classes: ArrayLike, threshold: float, image_shape: tuple[int, int]) -> np.ndarray:
    """Hard label from CAMs with a constant background plane: argmax over ``[threshold, cams...]``.

    Background wins ties: a pixel is foreground iff its max CAM value is strictly greater than ``threshold``, and
    then takes the class id of the argmax (the first of equal maxima).

    Args:
        cams: float ``[K, H, W]`` of the present classes (K may be 0), numpy or torch.
        classes: int ``[K]`` class ids in 1..C_fg.
        threshold: background score.
        image_shape: ``(H, W)`` of the output (must match the CAMs).

    Returns:
        uint8 ``[H, W]`` class ids (0 = background).
    """
    value, class_id = _max_and_class(cams, classes, image_shape)
    if class_id.size and class_id.max() > 254:
        raise ValueError(f"class ids must fit a uint8 label map below the ignore index 255, got {class_id.max()}")
    return np.where(value > np.float64(threshold), class_id, 0).astype(np.uint8)


class CamThresholdSweep:
    """Confusion matrices of CAM pseudo-labels for many background thresholds in one pass (SPEC §5.3).

    At threshold t a pixel is the argmax class when its max CAM value v > t, else background (as
    :func:`cam_to_label`). Each pixel falls in bin b = #{thresholds < v} (``np.searchsorted``, side left) of the
    sorted thresholds, so it is foreground exactly at thresholds 0..b-1. Counting pixels per (gt, argmax class, bin)
    and taking suffix sums over the bins gives every threshold's confusion matrix exactly.

    Args:
        num_classes: C, background included.
        thresholds: background thresholds; stored sorted ascending without duplicates (``self.thresholds``), and
            every per-threshold output follows that order.
        ignore_index: ground-truth value whose pixels are skipped.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float], ignore_index: int = 255) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + a class), got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (0..{num_classes - 1})")
        thresholds_np = np.unique(np.asarray(list(thresholds), dtype=np.float64))
        if thresholds_np.size == 0 or not np.isfinite(thresholds_np).all():
            raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {list(thresholds)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.thresholds = thresholds_np
        # counts[g, c, b]: pixels with ground truth g, argmax class c and bin b (b = 0..T).
        self.counts = np.zeros((num_classes, num_classes, thresholds_np.size + 1), dtype=np.int64)

    def update(self, cams: ArrayLike, classes: ArrayLike, gt: ArrayLike) -> None:
        """Accumulate one image.

        Args:
            cams: float ``[K, H, W]`` CAMs of the present classes only (K may be 0), numpy or torch.
            classes: int ``[K]`` their class ids (1..C_fg).
            gt: int ``[H, W]`` ground truth (0..C-1 or ignore_index).
        """
        gt_np = _as_labels(gt, "gt")
        if gt_np.ndim != 2:
            raise ValueError(f"gt must be [H, W], got shape {gt_np.shape}")
        value, class_id = _max_and_class(cams, classes, gt_np.shape)
        _check_range(class_id, self.num_classes, "classes")
        valid = gt_np != self.ignore_index
        gt_valid = gt_np[valid]
        _check_range(gt_valid, self.num_classes, f"gt (besides ignore_index {self.ignore_index})")
        bins = np.searchsorted(self.thresholds, value[valid], side="left")
        num_bins = self.counts.shape[2]
        flat = (gt_valid * self.num_classes + class_id[valid]) * num_bins + bins
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def merge(self, other: CamThresholdSweep) -> CamThresholdSweep:
        """Add another sweep with the same classes and thresholds; returns ``self``."""
        if other.num_classes != self.num_classes or not np.array_equal(other.thresholds, self.thresholds):
            raise ValueError("cannot merge sweeps with different num_classes or thresholds")
        self.counts += other.counts
        return self

    def all_reduce(self) -> CamThresholdSweep:
        """Sum the counts over ranks (no-op in one process). Returns ``self``."""
        self.counts = _all_reduce_array(self.counts)
        return self

    def confusions(self) -> np.ndarray:
        """int64 ``[T, C, C]``: the confusion matrix at each (sorted) threshold."""
        # suffix[g, c, i] = pixels in bins >= i; at threshold i the foreground pixels are those in bins > i.
        suffix = np.cumsum(self.counts[:, :, ::-1], axis=2)[:, :, ::-1]
        foreground = suffix[:, :, 1:].transpose(2, 0, 1).copy()  # [T, C, C]
        row_total = self.counts.sum(axis=(1, 2))  # [C] ground-truth pixels per class
        # Column 0 only ever holds K = 0 pixels (bin 0, never foreground); everything not foreground is background.
        foreground[:, :, 0] = 0
        foreground[:, :, 0] = row_total[None, :] - foreground.sum(axis=2)
        return foreground

    def results(self) -> list[dict[str, Any]]:
        """:func:`compute_metrics` per threshold, each with its ``threshold`` added."""
        return [
            {"threshold": float(t), **compute_metrics(matrix)}
            for t, matrix in zip(self.thresholds, self.confusions(), strict=True)
        ]

    def best(self) -> tuple[float, dict[str, Any]]:
        """The threshold with the highest mIoU (the lowest such threshold on ties) and its result."""
        results = self.results()
        if results[0]["num_pixels"] == 0:
            raise ValueError("CamThresholdSweep.best(): no labelled pixels were accumulated")
        best = max(results, key=lambda r: r["miou"])  # max keeps the first maximum, i.e. the lowest threshold
        return best["threshold"], best
