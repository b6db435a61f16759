"""Offline pseudo labels from saved CAMs (SPEC §2.5): pure functions shared by tools/make_pseudo_labels.py and the
tests.

Files (docs/design.md, "Run folder"):

- ``RUN/cams/<split>/<id>.npz``: the CAMs of the present classes, read with :func:`core.camfile.read_cams`;
- ``RUN/pseudo_labels/<split>/soft/<id>.npz``: ``classes`` int16 [K+1] (0 = background first, then the present ids),
  ``prob`` [K+1, H, W] uint8 (``round(p·255)``) or float16 — written from :func:`soft_label`, expanded back to all C
  classes with :func:`load_soft_label`.

Probabilities come from *score stacks*: a constant background plane prepended to the present classes' CAMs,
``[K+1, H, W]`` with channel 0 = background and channel k = ``classes[k-1]``. Every hard label is made by
:func:`core.labels.cam_label` (background wins ties): from the raw CAMs and a threshold when nothing is refined, from
a stack's class channels and its background channel when PAR / DenseCRF refined the probabilities (:func:`hard_label`).
:func:`pseudo_label` is the whole recipe for one image; the tool runs the same steps, streaming DenseCRF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.labels import cam_label
from utils.crf import dense_crf
from utils.io import load_npz

SOFT_DTYPES = ("uint8", "float16")
# uint8 soft labels store round(p · 255); loading divides by the same number.
_UINT8_SCALE = 255.0
# uint8 RGB -> [0, 1]
_RGB_SCALE = 255.0


# ----------------------------------------------------------------------------------------------------------------------
# Score stacks and refinement
# ----------------------------------------------------------------------------------------------------------------------


def _as_tensor(x: Tensor | np.ndarray, device: torch.device | None = None) -> Tensor:
    tensor = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    return tensor.to(device=device if device is not None else tensor.device, dtype=torch.float32)


def _check_cam(cam: Tensor, classes: np.ndarray) -> None:
    if cam.dim() != 3 or cam.shape[0] != len(classes):
        raise ValueError(f"cam must be [K={len(classes)}, H, W] (K = len(classes)), got shape {tuple(cam.shape)}")


def score_stacks(cam: Tensor | np.ndarray, thresholds: Sequence[float]) -> Tensor:
    """Prepend a constant background plane at each threshold to the CAMs (SPEC §2.4, §2.5).

    Args:
        cam: class-masked CAMs of the present classes, [K, H, W].
        thresholds: background scores, one stack each.

    Returns:
        float32 [S, K+1, H, W], S = len(thresholds); channel 0 is the background plane.
    """
    cam = _as_tensor(cam)
    if cam.dim() != 3:
        raise ValueError(f"score_stacks: cam must be [K, H, W], got shape {tuple(cam.shape)}")
    planes = torch.tensor([float(t) for t in thresholds], dtype=cam.dtype, device=cam.device)
    background = planes[:, None, None, None].expand(-1, 1, *cam.shape[-2:])
    return torch.cat([background, cam[None].expand(len(planes), -1, -1, -1)], dim=1)


def rgb01(image: np.ndarray, device: torch.device) -> Tensor:
    """uint8 RGB [H, W, 3] -> float32 [3, H, W] in [0, 1] on ``device`` (PAR's input)."""
    return torch.from_numpy(image).to(device).permute(2, 0, 1).float() / _RGB_SCALE


def stack_probabilities(
    cam: Tensor | np.ndarray,
    thresholds: Sequence[float],
    image01: Tensor | None = None,
    par: torch.nn.Module | None = None,
) -> Tensor:
    """Softmax over background + present classes of each score stack, optionally refined by PAR (SPEC §2.4 recipe).

    Without PAR the softmax is taken at full resolution. With PAR, as in §2.4: the stacks are downsampled ×0.5
    (bilinear), soft-maxed, refined by ``par`` on the image downsampled ×0.5 (PAR runs at half resolution, §1.3) and
    upsampled back. All stacks share one PAR call, so its affinities are computed once per image. PAR is a convex
    averaging and bilinear resizing preserves sums, so every pixel still sums to 1.

    Args:
        cam: [K, H, W] CAMs of the present classes.
        thresholds: one background plane per stack.
        image01: RGB image in [0, 1], [3, H, W] (:func:`rgb01`); required with ``par``.
        par: a :class:`models.par.PAR`, or None.

    Returns:
        float32 [S, K+1, H, W] probabilities.
    """
    stacks = score_stacks(cam, thresholds)
    num_stacks, channels, height, width = stacks.shape
    if par is None:
        return stacks.softmax(dim=1)
    if image01 is None or image01.dim() != 3 or image01.shape[0] != 3 or tuple(image01.shape[-2:]) != (height, width):
        shape = None if image01 is None else tuple(image01.shape)
        raise ValueError(f"stack_probabilities: PAR needs image01 [3, {height}, {width}] in [0, 1], got {shape}")
    half = (max(1, height // 2), max(1, width // 2))
    small = F.interpolate(stacks, size=half, mode="bilinear", align_corners=False).softmax(dim=1)
    image_small = F.interpolate(image01[None].to(stacks), size=half, mode="bilinear", align_corners=False)
    refined = par(image_small, small.reshape(1, num_stacks * channels, *half))
    refined = F.interpolate(refined.float(), size=(height, width), mode="bilinear", align_corners=False)
    return refined.reshape(num_stacks, channels, height, width)


def crf_refine(probs: Tensor | np.ndarray, image: np.ndarray, crf_params: Mapping[str, Any]) -> np.ndarray:
    """DenseCRF on each stack of probabilities (in this process; the tool streams the same jobs through CRFPool).

    Args:
        probs: [S, K+1, H, W] probabilities.
        image: uint8 [H, W, 3] RGB.
        crf_params: keyword arguments of :func:`utils.crf.dense_crf` (the ``crf.*`` config keys).

    Returns:
        float32 [S, K+1, H, W] refined marginals.
    """
    probs_np = probs.detach().cpu().numpy() if isinstance(probs, Tensor) else np.asarray(probs)
    return np.stack([dense_crf(image, stack, **dict(crf_params)) for stack in probs_np])


def check_image(image: np.ndarray, size: tuple[int, int], where: str) -> None:
    """Raise unless ``image`` is uint8 [H, W, 3] with (H, W) == ``size``; ``where`` names the file or caller."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image must be uint8 [H, W, 3], got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")  # fmt: skip
    if tuple(image.shape[:2]) != tuple(size):
        raise ValueError(f"{where}: image is {image.shape[0]}×{image.shape[1]} but its CAMs are {size[0]}×{size[1]}")


# ----------------------------------------------------------------------------------------------------------------------
# Hard labels
# ----------------------------------------------------------------------------------------------------------------------


def label_thresholds(bkg_thre: float, high: float, low: float, dual: bool) -> tuple[float, ...]:
    """Background planes of the hard label: (high, low) for the dual band, else (bkg_thre,)."""
    return (float(high), float(low)) if dual else (float(bkg_thre),)


def dual_label(label_h: np.ndarray, label_l: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """SPEC §2.4 ignore band: label_h where it is foreground, 0 where both are background, ``ignore_index`` else.

    Args:
        label_h: [H, W] label of the stack with its background plane at ``high_thre``.
        label_l: [H, W] label of the stack with its background plane at ``low_thre``.
        ignore_index: the label of the band (``data.ignore_index``).

    Returns:
        uint8 [H, W].
    """
    if label_h.shape != label_l.shape:
        raise ValueError(f"dual_label: label_h {label_h.shape} and label_l {label_l.shape} differ in shape")
    out = np.full(label_h.shape, ignore_index, dtype=np.uint8)
    out[(label_h == 0) & (label_l == 0)] = 0
    return np.where(label_h > 0, label_h, out).astype(np.uint8)


def hard_label(
    cam: Tensor | np.ndarray,
    classes: Sequence[int] | np.ndarray,
    thresholds: Sequence[float],
    dual: bool,
    probs: Tensor | np.ndarray | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Hard pseudo label of one image, each stack labelled by :func:`core.labels.cam_label`.

    Args:
        cam: [K, H, W] CAMs of the present classes; labelled at each threshold when ``probs`` is None.
        classes: the K present class ids.
        thresholds: the planes of :func:`label_thresholds` first ((high, low) when ``dual``, else (bkg_thre,));
            further entries are not used.
        dual: apply the ignore band of :func:`dual_label`.
        probs: [S, K+1, H, W] probabilities of the stacks at ``thresholds`` (refined by PAR / DenseCRF; channel 0 =
            background), or None for the raw CAMs.
        ignore_index: the label of the dual band (``data.ignore_index``).

    Returns:
        uint8 [H, W] in {0} ∪ classes (∪ {ignore_index} when dual).
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    count = 2 if dual else 1
    stacks = len(thresholds) if probs is None else len(probs)
    if stacks < count:
        raise ValueError(f"hard_label: {'dual needs 2 stacks (high, low)' if dual else 'needs 1 stack'}, got {stacks}")
    if probs is None:
        labels = [cam_label(cam, classes, float(t), ignore_index) for t in thresholds[:count]]
    else:
        labels = [cam_label(stack[1:], classes, stack[0], ignore_index) for stack in probs[:count]]
    return dual_label(labels[0], labels[1], ignore_index) if dual else labels[0]


def pseudo_label(
    cam: Tensor | np.ndarray,
    classes: Sequence[int] | np.ndarray,
    image: np.ndarray | None = None,
    bkg_thre: float = 0.5,
    high: float = 0.7,
    low: float = 0.25,
    dual: bool = False,
    par: torch.nn.Module | None = None,
    crf_params: Mapping[str, Any] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Hard pseudo label of one image from its class-masked CAMs (SPEC §2.5): the recipe of the tool, in one call.

    Without refinement :func:`hard_label` labels the raw CAMs at each plane (as CAM evaluation does for one
    threshold). With ``par`` and/or ``crf_params`` it labels the softmax probabilities of :func:`stack_probabilities`,
    refined by PAR, then by DenseCRF. Images without a present class (K = 0) are all background.

    Args:
        cam: [K, H, W] CAMs of the present classes, in [0, 1].
        classes: [K] class ids (1..C_fg).
        image: uint8 RGB [H, W, 3]; required with ``par`` or ``crf_params``.
        bkg_thre: background plane of the single-threshold label.
        high: background plane of label_h (dual).
        low: background plane of label_l (dual).
        dual: use the ignore band of §2.4 instead of a single threshold.
        par: a :class:`models.par.PAR`, or None.
        crf_params: ``dense_crf`` keyword arguments, or None for no CRF.
        ignore_index: the label of the dual band (``data.ignore_index``).

    Returns:
        uint8 [H, W]: 0 background, class ids, ``ignore_index`` (dual only).
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    cam_t = _as_tensor(cam)
    _check_cam(cam_t, classes)
    thresholds = label_thresholds(bkg_thre, high, low, dual)
    probs: Tensor | np.ndarray | None = None
    if (par is not None or crf_params is not None) and len(classes):
        if image is None:
            raise ValueError("pseudo_label: PAR / CRF refinement needs the image (uint8 [H, W, 3])")
        check_image(image, tuple(cam_t.shape[-2:]), "pseudo_label")
        probs = stack_probabilities(cam_t, thresholds, rgb01(image, cam_t.device), par)
        if crf_params is not None:
            probs = crf_refine(probs, image, crf_params)
    return hard_label(cam_t, classes, thresholds, dual, probs, ignore_index)


# ----------------------------------------------------------------------------------------------------------------------
# Soft labels
# ----------------------------------------------------------------------------------------------------------------------


def soft_label(prob: Tensor | np.ndarray, classes: Sequence[int] | np.ndarray, dtype: str = "uint8") -> dict:
    """Compact soft label of one image: background + present classes only (SPEC §2.5), never all C classes.

    Args:
        prob: [K+1, H, W] probabilities in [0, 1], channel 0 = background.
        classes: the K present class ids (channels 1..K).
        dtype: ``uint8`` (stores round(p·255); error ≤ 1/510) or ``float16``.

    Returns:
        ``{"classes": int16 [K+1] (0 first), "prob": uint8 | float16 [K+1, H, W]}``, ready for ``save_npz``.
    """
    if dtype not in SOFT_DTYPES:
        raise ValueError(f"soft_label: dtype (pseudo.soft_dtype) must be one of {SOFT_DTYPES}, got {dtype!r}")
    prob_np = prob.detach().float().cpu().numpy() if isinstance(prob, Tensor) else np.asarray(prob, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if prob_np.ndim != 3 or prob_np.shape[0] != len(classes) + 1:
        raise ValueError(f"soft_label: prob must be [K+1={len(classes) + 1}, H, W], got {prob_np.shape}")
    prob_np = np.clip(prob_np, 0.0, 1.0)
    stored = np.rint(prob_np * _UINT8_SCALE).astype(np.uint8) if dtype == "uint8" else prob_np.astype(np.float16)
    return {"classes": np.concatenate([[0], classes]).astype(np.int16), "prob": stored}


def load_soft_label(path: str | Path, num_classes: int) -> np.ndarray:
    """Expand one compact soft label back to all classes, dequantised (for a second-stage trainer).

    Args:
        path: ``RUN/pseudo_labels/<split>/soft/<id>.npz``.
        num_classes: C, background included.

    Returns:
        float32 [C, H, W]; classes absent from the file are 0.
    """
    data = load_npz(path)
    if "classes" not in data or "prob" not in data:
        raise ValueError(f"soft label {path} must hold 'classes' [K+1] and 'prob' [K+1, H, W], got {sorted(data)}")
    classes, prob = data["classes"].astype(np.int64), data["prob"]
    if prob.ndim != 3 or classes.ndim != 1 or prob.shape[0] != classes.shape[0]:
        raise ValueError(f"soft label {path}: classes {classes.shape} and prob {prob.shape} do not match ([K+1, H, W])")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes or len(np.unique(classes)) != classes.size):
        raise ValueError(
            f"soft label {path}: class ids {classes.tolist()} must be distinct and in 0..{num_classes - 1} "
            f"(num_classes={num_classes})"
        )
    if prob.dtype == np.uint8:
        values = prob.astype(np.float32) / _UINT8_SCALE
    elif prob.dtype == np.float16:
        values = prob.astype(np.float32)
    else:
        raise ValueError(f"soft label {path}: prob must be uint8 or float16, got {prob.dtype}")
    out = np.zeros((num_classes, *prob.shape[1:]), dtype=np.float32)
    out[classes] = values
    return out
