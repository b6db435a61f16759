"""CAM -> label rules (SPEC §2.3, §2.4, §2.5, §4.5, §5.3).

Training (pure, batched tensor functions; int64 label maps):

- :func:`token_labels` and :func:`pair_labels` (§2.3) for PTC and the memory contrast;
- :func:`prototype_labels` (§4.5) for the memory bank's accumulation;
- :func:`online_seg_labels` (§2.4), the segmentation head's online labels.

Offline tools and validation (numpy, one image; uint8 label maps):

- :func:`cam_label`, the one "CAMs + background plane -> hard label" rule: CAM evaluation, validation and the
  offline pseudo labels (raw CAMs at a threshold, or refined probabilities whose channel 0 is the plane) all use it;
- :class:`CamThresholdSweep` (§5.3): the confusion matrices of :func:`cam_label` at many thresholds in one pass.

Label maps hold 0 = background, 1..C_fg = classes and ``ignore_index`` (255 by default, ``data.ignore_index``) =
ignore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.cam import box_mask, check_4d, check_box, resize_bilinear
from utils.errors import debug_enabled
from utils.metrics import ArrayLike, all_reduce_array, as_labels, check_range, compute_metrics, to_numpy

# ----------------------------------------------------------------------------------------------------------------------
# §2.3 Token labels and pair matrices, §4.5 prototype labels
# ----------------------------------------------------------------------------------------------------------------------


def token_labels(
    scores: Tensor,
    img_box: Tensor,
    image_size: tuple[int, int],
    high: float,
    low: float,
    ignore_index: int = 255,
    bg_scores: Tensor | None = None,
) -> Tensor:
    """Dual-threshold token labels (SPEC §2.3).

    With v the max over classes and c = argmax + 1: v > high → c; low < v ≤ high → ignore; v ≤ low → 0 (background);
    tokens whose cell centre lies outside ``img_box`` → ignore. With ``bg_scores`` the background test reads
    v_bg = the max of ``bg_scores`` instead (v_bg ≤ low → 0, where v ≤ high); the foreground test still reads v
    (:func:`agreement_pair` gives the pair of the agreement rule).

    Args:
        scores: class-masked scores at token resolution, [B, C_fg, h, w] (see :func:`resize_to_tokens`).
        img_box: [B, 4] (y0, y1, x0, x1) in pixels of ``image_size``.
        image_size: (H, W) of the crop the box refers to.
        high: foreground threshold.
        low: background threshold.
        ignore_index: label of ignored tokens.
        bg_scores: optional [B, C_fg, h, w] scores of the background test (None: ``scores``).

    Returns:
        int64 [B, h, w].
    """
    check_4d(scores, "token_labels: scores")
    check_box(img_box, scores.shape[0])
    if low > high:
        raise ValueError(f"token_labels: low ({low}) must not exceed high ({high})")
    value, index = scores.max(dim=1)
    bg_value = value if bg_scores is None else _bg_value(bg_scores, scores, "token_labels")
    labels = torch.full_like(index, ignore_index)
    labels = torch.where(bg_value <= low, torch.zeros_like(labels), labels)
    labels = torch.where(value > high, index + 1, labels)
    inside = box_mask(img_box.to(scores.device), scores.shape[-2:], image_size)
    return labels.masked_fill(~inside, ignore_index)


def agreement_pair(cam: Tensor, cam_aux: Tensor) -> tuple[Tensor, Tensor]:
    """The two maps of the agreement label rule (``cam.label_agreement``): (min, max) of the final and auxiliary CAM.

    A label rule reads its foreground test from the min (both branches are above the threshold) and its background
    test from the max (both are at or below it); where the branches disagree the label is ignore. Published rules
    read one map for both tests (SPEC §2.3–§2.5). Shapes: two equal [B, C, H, W] maps -> two [B, C, H, W] maps.
    """
    if cam.shape != cam_aux.shape:
        raise ValueError(f"agreement_pair: cam {tuple(cam.shape)} and cam_aux {tuple(cam_aux.shape)} differ in shape")
    return torch.minimum(cam, cam_aux), torch.maximum(cam, cam_aux)


def _bg_value(bg_scores: Tensor, scores: Tensor, name: str) -> Tensor:
    """Max over classes of the background-test map, [B, C, h, w] -> [B, h, w] (same shape as ``scores`` required)."""
    if bg_scores.shape != scores.shape:
        raise ValueError(f"{name}: the background map {tuple(bg_scores.shape)} must match {tuple(scores.shape)}")
    return bg_scores.max(dim=1).values


def pair_labels(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Token pair matrix of each image (SPEC §2.3).

    Args:
        labels: token labels [B, h, w] (from :func:`token_labels`).
        ignore_index: label of ignored tokens.

    Returns:
        uint8 [B, N, N], N = h·w (row-major tokens): 1 for equal labels (background pairs included), 0 for different
        labels, 255 when either token is ignored and on the diagonal.
    """
    if labels.dim() != 3:
        raise ValueError(f"pair_labels: labels must be [B, h, w], got shape {tuple(labels.shape)}")
    flat = labels.flatten(1)  # [B, N]
    pairs = (flat[:, :, None] == flat[:, None, :]).to(torch.uint8)
    ignored = flat == ignore_index
    pairs = pairs.masked_fill(ignored[:, :, None] | ignored[:, None, :], 255)
    eye = torch.eye(flat.shape[1], dtype=torch.bool, device=flat.device)
    return pairs.masked_fill(eye[None], 255)


def prototype_labels(
    cam: Tensor,
    img_box: Tensor,
    image_size: tuple[int, int],
    bkg_thre: float,
    ignore_index: int = 255,
    bg_cam: Tensor | None = None,
) -> Tensor:
    """Token labels for the memory prototypes (SPEC §4.5): argmax + 1, background where max ≤ bkg_thre.

    With ``bg_cam`` (the agreement rule, :func:`agreement_pair`) a token is background only where the max of
    ``bg_cam`` is ≤ bkg_thre too; a token that is neither (the two maps disagree) is ignored.

    Args:
        cam: class-masked multi-scale CAM at token resolution, [B, C_fg, h, w] (see :func:`resize_to_tokens`).
        img_box: [B, 4] (y0, y1, x0, x1) in pixels of ``image_size``.
        image_size: (H, W) of the crop.
        bkg_thre: background threshold.
        ignore_index: label of tokens outside the box (and, with ``bg_cam``, of disagreeing tokens).
        bg_cam: optional [B, C_fg, h, w] map of the background test (None: ``cam``).

    Returns:
        int64 [B, h, w]: 0 background, 1..C_fg class, ``ignore_index`` outside the box.
    """
    check_4d(cam, "prototype_labels: cam")
    check_box(img_box, cam.shape[0])
    value, index = cam.max(dim=1)
    background = torch.zeros_like(index)
    if bg_cam is not None:
        background = background.masked_fill(_bg_value(bg_cam, cam, "prototype_labels") > bkg_thre, ignore_index)
    labels = torch.where(value > bkg_thre, index + 1, background)
    inside = box_mask(img_box.to(cam.device), cam.shape[-2:], image_size)
    return labels.masked_fill(~inside, ignore_index)


# ----------------------------------------------------------------------------------------------------------------------
# §2.4 Online segmentation labels
# ----------------------------------------------------------------------------------------------------------------------


def max_present(labels: Tensor) -> int:
    """The largest number of present classes (``labels > 0``) of an image: multi-hot [B, C_fg] -> int (0 for B = 0).

    A host read of ``labels``: on a device tensor that is a synchronisation; pass the loader's CPU labels instead.
    """
    return int(labels.gt(0).sum(dim=1).max().item()) if labels.shape[0] > 0 else 0


def _present_slots(labels: Tensor, most_present: int | None = None) -> tuple[Tensor, Tensor]:
    """Compact per-image class slots: background first, then the present classes in class order.

    Args:
        labels: multi-hot [B, C_fg].
        most_present: :func:`max_present` of ``labels`` when the caller knows it on the host; None reads it from
            ``labels`` (a device sync on CUDA).

    Returns:
        ids int64 [B, K] (channel index into [background, classes...], i.e. the class id) and valid bool [B, K];
        K = 1 + the largest number of present classes in the batch; padding slots have id 0 and valid False.
    """
    present = labels > 0
    if most_present is None:
        most_present = max_present(labels)
    elif debug_enabled() and most_present < (actual := max_present(labels)):
        raise ValueError(f"online_seg_labels: most_present={most_present}, but an image has {actual} classes")
    # A stable sort of "absent" flags lists each image's present classes first, in class order.
    order = torch.argsort((~present).to(torch.uint8), dim=1, stable=True)[:, :most_present]
    valid_fg = torch.gather(present, 1, order)
    background = torch.zeros(labels.shape[0], 1, dtype=torch.int64, device=labels.device)
    ids = torch.cat([background, (order + 1).masked_fill(~valid_fg, 0)], dim=1)
    valid = torch.cat([torch.ones_like(background, dtype=torch.bool), valid_fg], dim=1)
    return ids, valid


def _slot_argmax(scores: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Class id of the best valid slot: scores [B, K, H, W] → int64 [B, H, W]."""
    masked = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    slot = masked.argmax(dim=1)
    return torch.gather(ids, 1, slot.flatten(1)).view_as(slot)


@torch.no_grad()
def online_seg_labels(
    cam: Tensor,
    labels: Tensor,
    images01: Tensor,
    img_box: Tensor,
    par: Callable[[Tensor, Tensor], Tensor],
    high: float,
    low: float,
    ignore_index: int = 255,
    most_present: int | None = None,
    bg_cam: Tensor | None = None,
) -> Tensor:
    """Online segmentation pseudo labels with a dual-threshold ignore band (SPEC §2.4).

    Two stacks prepend a constant background plane at ``high`` and at ``low`` to the class-masked CAM; both are
    downsampled ×0.5, soft-maxed over background + the image's present classes, refined by PAR (on the image
    downsampled ×0.5), upsampled to H × W and arg-maxed into label_h and label_l. Final label: label_h where it is
    foreground, 0 where label_h and label_l are both background, ignore otherwise and outside ``img_box``.

    Images with different class sets share one batched PAR call: each image's classes are gathered into K slots
    (K = 1 + the most classes any image has), unused slots get probability 0, which PAR keeps at 0.

    Args:
        cam: class-masked multi-scale CAM, [B, C_fg, H, W] in [0, 1].
        labels: multi-hot image labels, [B, C_fg].
        images01: de-normalised RGB crops in [0, 1], [B, 3, H, W].
        img_box: [B, 4] (y0, y1, x0, x1) in crop pixels.
        par: a :class:`models.par.PAR` (any callable ``par(images01, masks) -> refined masks``).
        high: background plane of the first stack (SPEC §2.2 ``high_thre``).
        low: background plane of the second stack (``low_thre``).
        ignore_index: label of ignored pixels.
        most_present: :func:`max_present` of ``labels``, the number of slots K - 1, when the caller knows it on the
            host (the training step takes it from the loader's CPU labels); None reads it from ``labels``, which on
            CUDA is a device synchronisation. A value below the true one would drop classes (checked with
            ``MSFC_DEBUG=1``).
        bg_cam: optional [B, C_fg, H, W] map of the second (``low``) stack, which decides background (None: ``cam``);
            the agreement rule passes the max of CAM and CAM_aux here and their min as ``cam`` (:func:`agreement_pair`).

    Returns:
        int64 [B, H, W]: 0 background, 1..C_fg class, ``ignore_index`` ignored. Never an absent class.
    """
    check_4d(cam, "online_seg_labels: cam")
    check_4d(images01, "online_seg_labels: images01", channels=3)
    batch, num_fg, height, width = cam.shape
    if labels.shape != (batch, num_fg):
        raise ValueError(f"online_seg_labels: labels must be [B={batch}, C_fg={num_fg}], got {tuple(labels.shape)}")
    if images01.shape[0] != batch or images01.shape[-2:] != cam.shape[-2:]:
        raise ValueError(f"online_seg_labels: images01 {tuple(images01.shape)} must match cam {tuple(cam.shape)}")
    check_box(img_box, batch)
    if bg_cam is not None and bg_cam.shape != cam.shape:
        raise ValueError(f"online_seg_labels: bg_cam {tuple(bg_cam.shape)} must match cam {tuple(cam.shape)}")

    ids, valid = _present_slots(labels.to(cam.device), most_present)
    num_slots = ids.shape[1]
    index = ids[:, :, None, None].expand(-1, -1, height, width)
    stacks = []
    for plane, maps in ((high, cam), (low, cam if bg_cam is None else bg_cam)):
        full = torch.cat([torch.full_like(maps[:, :1], plane), maps], dim=1)  # [B, C, H, W], channel = class id
        stacks.append(torch.gather(full, 1, index))  # [B, K, H, W]
    half = (max(1, height // 2), max(1, width // 2))
    logits = resize_bilinear(torch.cat(stacks, dim=1).float(), half)
    logits = logits.masked_fill(~valid.repeat(1, 2)[:, :, None, None], float("-inf"))
    probs = torch.cat([part.softmax(dim=1) for part in logits.split(num_slots, dim=1)], dim=1)
    refined = resize_bilinear(par(resize_bilinear(images01.float(), half), probs), (height, width))
    label_h, label_l = (_slot_argmax(part, ids, valid) for part in refined.split(num_slots, dim=1))

    out = torch.full_like(label_h, ignore_index)
    out = torch.where((label_h == 0) & (label_l == 0), torch.zeros_like(out), out)
    out = torch.where(label_h > 0, label_h, out)
    inside = box_mask(img_box.to(cam.device), (height, width), (height, width))
    return out.masked_fill(~inside, ignore_index)


# ----------------------------------------------------------------------------------------------------------------------
# §2.5, §5.3 CAMs + background plane -> hard label (offline tools, validation)
# ----------------------------------------------------------------------------------------------------------------------


def max_and_class(cams: ArrayLike, classes: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max CAM value and the class id of the argmax (the first of equal maxima).

    Args:
        cams: float [K, H, W] of the present classes only (K may be 0), numpy or torch.
        classes: int [K], their class ids (>= 1).

    Returns:
        (value float64 [H, W], class_id int64 [H, W]); with K = 0 the value is -inf and the class 0, so the pixel is
        background whatever the plane. float64 holds every float16 / float32 value exactly, so a comparison with a
        Python float threshold is exact (a float16 CAM compared in float16 would round the threshold instead).
    """
    cams_np = to_numpy(cams, "cams")
    classes_np = as_labels(classes, "classes").reshape(-1)
    if cams_np.ndim != 3 or cams_np.shape[0] != classes_np.shape[0]:
        raise ValueError(
            f"cams must be [K, H, W] with K = len(classes) = {classes_np.shape[0]}, got cams of shape {cams_np.shape}"
        )
    if not np.issubdtype(cams_np.dtype, np.floating):
        raise TypeError(f"cams must be floating point, got dtype {cams_np.dtype}")
    if classes_np.size and classes_np.min() < 1:
        raise ValueError(f"classes must be foreground ids >= 1, got {int(classes_np.min())}")
    shape = cams_np.shape[1:]
    if classes_np.size == 0:
        return np.full(shape, -np.inf), np.zeros(shape, dtype=np.int64)
    if not np.isfinite(cams_np).all():
        raise ValueError("cams contain NaN or inf values")
    index = cams_np.argmax(axis=0)
    value = np.take_along_axis(cams_np, index[None], axis=0)[0].astype(np.float64)
    return value, classes_np[index]


def cam_label(
    cams: ArrayLike, classes: ArrayLike, background: float | ArrayLike, ignore_index: int = 255
) -> np.ndarray:
    """Hard label of one image: arg-max over ``[background, cams...]``, background winning ties.

    A pixel is foreground iff its max CAM value is strictly greater than its background score, and then takes the
    class id of the argmax (the first of equal maxima). The comparison is exact (float64).

    Args:
        cams: float [K, H, W] of the present classes (K may be 0), numpy or torch; raw CAMs, or the class channels of
            a probability stack.
        classes: int [K] class ids in 1..C_fg.
        background: the background plane: a constant threshold (``cam.bkg_thre``, ``pseudo.bkg_thre``, ...) or a
            float [H, W] score per pixel (channel 0 of a probability stack).
        ignore_index: the label map's ignore value (``data.ignore_index``); no class may take it.

    Returns:
        uint8 [H, W] class ids (0 = background).
    """
    value, class_id = max_and_class(cams, classes)
    classes_np = np.asarray(classes).reshape(-1)
    if classes_np.size and (classes_np.max() > 255 or ignore_index in classes_np):
        raise ValueError(
            f"class ids must fit a uint8 label map and differ from the ignore index {ignore_index}, "
            f"got {sorted(int(c) for c in classes_np)}"
        )
    if isinstance(background, (np.ndarray, torch.Tensor)):
        plane = to_numpy(background, "background").astype(np.float64)
        if plane.ndim and plane.shape != value.shape:
            raise ValueError(f"background must be a number or [H, W] = {value.shape}, got shape {plane.shape}")
    else:
        plane = np.float64(background)
    return np.where(value > plane, class_id, 0).astype(np.uint8)


class CamThresholdSweep:
    """Confusion matrices of :func:`cam_label` for many background thresholds in one pass (SPEC §5.3).

    At threshold t a pixel with max CAM value v (float64, :func:`max_and_class`) is its argmax class when v > t, else
    background — the rule of :func:`cam_label`. Each pixel falls in bin b = #{thresholds < v} (``np.searchsorted``,
    side left) of the sorted thresholds, so it is foreground exactly at thresholds 0..b-1. Counting pixels per
    (gt, argmax class, bin) and taking suffix sums over the bins gives every threshold's confusion matrix exactly.

    Args:
        num_classes: C, background included.
        thresholds: background thresholds; stored sorted ascending without duplicates (``self.thresholds``), and
            every per-threshold output follows that order.
        ignore_index: ground-truth value whose pixels are skipped (``data.ignore_index``).
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
            cams: float [K, H, W] CAMs of the present classes only (K may be 0), numpy or torch.
            classes: int [K] their class ids (1..C_fg).
            gt: int [H, W] ground truth (0..C-1 or ignore_index).
        """
        gt_np = as_labels(gt, "gt")
        if gt_np.ndim != 2:
            raise ValueError(f"gt must be [H, W], got shape {gt_np.shape}")
        value, class_id = max_and_class(cams, classes)
        if value.shape != gt_np.shape:
            raise ValueError(f"cams are [K, {value.shape[0]}, {value.shape[1]}] but gt is {gt_np.shape} ([H, W])")
        check_range(class_id, self.num_classes, "classes")
        valid = gt_np != self.ignore_index
        gt_valid = gt_np[valid]
        check_range(gt_valid, self.num_classes, f"gt (besides ignore_index {self.ignore_index})")
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
        self.counts = all_reduce_array(self.counts)
        return self

    def confusions(self) -> np.ndarray:
        """int64 [T, C, C]: the confusion matrix at each (sorted) threshold."""
        # suffix[g, c, i] = pixels in bins >= i; at threshold i the foreground pixels are those in bins > i.
        suffix = np.cumsum(self.counts[:, :, ::-1], axis=2)[:, :, ::-1]
        foreground = suffix[:, :, 1:].transpose(2, 0, 1).copy()  # [T, C, C]
        row_total = self.counts.sum(axis=(1, 2))  # [C] ground-truth pixels per class
        # Column 0 only ever holds K = 0 pixels (bin 0, never foreground); everything not foreground is background.
        foreground[:, :, 0] = 0
        foreground[:, :, 0] = row_total[None, :] - foreground.sum(axis=2)
        return foreground

    def results(self) -> list[dict[str, Any]]:
        """:func:`utils.metrics.compute_metrics` per threshold, each with its ``threshold`` added."""
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
