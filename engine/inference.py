"""Inference helpers shared by validation and the tools: segmentation logits with scales, flips and fusion (§5.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.cam import round_to_patch

FUSIONS = ("sum", "mean", "max")
RESIZE_MODES = ("long_side", "square")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for forward passes: ``precision`` bf16 | fp16 on CUDA; fp32 everywhere else.

    The callers pass ``train.precision`` (training), ``eval.precision`` (segmentation inference) or the label-CAM
    precision of ``cam.precision`` (``engine.step.label_cam_precision``). CPU runs stay fp32: bf16 autocast on CPU is
    slow and the tiny CPU configs gain nothing from it.
    """
    dtype = AUTOCAST_DTYPES.get(str(precision))
    return torch.autocast(
        device.type, dtype=dtype or torch.float32, enabled=device.type == "cuda" and dtype is not None
    )


def autocast_name(device: torch.device, precision: str) -> str:
    """The precision :func:`autocast` actually uses (recorded by the tools' ``settings.json``)."""
    return str(precision) if device.type == "cuda" and precision in AUTOCAST_DTYPES else "fp32"


def _fuse(stack: torch.Tensor, rule: str, what: str) -> torch.Tensor:
    if rule == "sum":
        return stack.sum(dim=0)
    if rule == "mean":
        return stack.mean(dim=0)
    if rule == "max":
        return stack.amax(dim=0)
    raise ValueError(f"{what} must be one of {FUSIONS}, got {rule!r}")


def resize_long_side(images: torch.Tensor, long_side: int | None) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` so that max(H, W) == ``long_side`` (bilinear); None leaves it unchanged."""
    if long_side is None:
        return images
    height, width = images.shape[-2:]
    factor = long_side / max(height, width)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def check_resize_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else a ValueError naming ``eval.resize_mode``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"eval.resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    return mode


def resize_for_inference(images: torch.Tensor, resize: int | None, mode: str) -> torch.Tensor:
    """The first resize of segmentation inference (``eval.resize`` / ``eval.resize_mode``, SPEC §5.2).

    Args:
        images: ``[B, 3, H, W]`` float.
        resize: target size; None = full resolution (whatever ``mode``).
        mode: ``long_side`` = max(H, W) becomes ``resize``, aspect kept; ``square`` = ``resize`` x ``resize``
            (published COCO inference: the aspect ratio is not kept).

    Returns:
        ``[B, 3, H', W']`` bilinear (``align_corners=False``) resize of ``images``.
    """
    check_resize_mode(mode)
    if resize is None:
        return images
    if mode == "long_side":
        return resize_long_side(images, resize)
    return F.interpolate(images, size=(int(resize), int(resize)), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_seg_logits(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
    flip_fusion: str = "sum",
    scale_fusion: str = "max",
    resize: int | None = None,
    *,
    resize_mode: str = "long_side",
) -> torch.Tensor:
    """Multi-scale (+ flip) segmentation logits at the input resolution.

    Args:
        model: an ``MSFC`` (its ``patch_size`` rounds every scaled size to whole patches, half-up:
            :func:`core.cam.round_to_patch`, as the multi-scale CAMs).
        images: ``[B, 3, H, W]`` uint8 or float in [0, 1].
        scales: resize factors, applied after ``resize``.
        flip: also run each scale's horizontal flip (one batch with the original).
        flip_fusion / scale_fusion: ``sum`` | ``mean`` | ``max`` (SPEC §5.2; VOC: sum over flips, max over scales;
            COCO: max over flips, sum over scales).
        resize: resize to this first (COCO: 448); None = full resolution.
        resize_mode: how ``resize`` applies: ``long_side`` (max(H, W) -> resize) | ``square`` (resize x resize,
            published COCO); see :func:`resize_for_inference`.

    Returns:
        ``[B, C, H, W]`` float32 logits, fused over flips then scales, upsampled to the input size.
    """
    height, width = images.shape[-2:]
    # Normalise once, then resize: bilinear resizing commutes with the per-channel affine normalisation.
    base = resize_for_inference(model.normalize(images), resize, resize_mode)
    patch = model.patch_size
    per_scale = []
    for scale in scales:
        size = [round_to_patch(side * scale, patch) for side in base.shape[-2:]]
        x = F.interpolate(base, size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        logits = model(batch, with_seg=True).seg_logits.float()
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        if flip:
            logits = _fuse(torch.stack([logits[: len(x)], logits[len(x) :].flip(-1)]), flip_fusion, "eval.flip_fusion")
        per_scale.append(logits)
    return _fuse(torch.stack(per_scale), scale_fusion, "eval.scale_fusion")
