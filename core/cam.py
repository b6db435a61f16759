"""CAMs (SPEC §2.1): pure, batched, device-agnostic functions without configuration.

- boxes: :func:`box_mask` maps a crop's ``img_box`` to any resolution;
- sizes: :func:`round_to_patch`, the one rounding of a scaled side to whole patches;
- multi-scale CAMs: :func:`multiscale_cam` and its per-class renormalisation :func:`normalise_per_class`;
- :func:`resize_to_tokens` brings a crop-resolution map to the token grid.

CAM -> label rules live in ``core/labels.py``, views in ``core/views.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Keeps the per-class max-normalisation of §2.1 finite for an all-zero class channel.
_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# ----------------------------------------------------------------------------------------------------------------------


def check_4d(x: Tensor, name: str, channels: int | None = None) -> None:
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        expected = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")


def check_box(img_box: Tensor, batch: int) -> None:
    if img_box.dim() != 2 or img_box.shape != (batch, 4):
        raise ValueError(f"img_box must be [B={batch}, 4] (y0, y1, x0, x1), got shape {tuple(img_box.shape)}")


def round_to_patch(value: float, multiple: int) -> int:
    """``value`` rounded half-up to the nearest multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners False) of [B, C, H, W]; the identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def box_mask(img_box: Tensor, size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Which cells of an ``h × w`` grid over an ``H × W`` image lie inside each image's box.

    A cell is inside when its centre is: ``y0 ≤ (i + ½)·H/h < y1`` and likewise for x. The test is done in exact
    integer arithmetic (``2h·y0 ≤ (2i + 1)·H < 2h·y1``), so it never depends on float rounding.

    Args:
        img_box: int [B, 4] = (y0, y1, x0, x1), end-exclusive, in image pixels (SPEC §2.2).
        size: (h, w), the grid the mask is wanted at.
        image_size: (H, W), the image the box coordinates refer to.

    Returns:
        bool [B, h, w].
    """
    if img_box.dim() != 2 or img_box.shape[1] != 4:
        raise ValueError(f"box_mask: img_box must be [B, 4] (y0, y1, x0, x1), got shape {tuple(img_box.shape)}")
    h, w = (int(v) for v in size)
    height, width = (int(v) for v in image_size)
    if min(h, w, height, width) < 1:
        raise ValueError(f"box_mask: size {size} and image_size {image_size} must be positive")
    box = img_box.to(torch.int64)
    rows = (2 * torch.arange(h, device=box.device) + 1) * height  # (2i + 1)·H, compared with 2h·y
    cols = (2 * torch.arange(w, device=box.device) + 1) * width
    inside_y = (rows[None] >= 2 * h * box[:, 0:1]) & (rows[None] < 2 * h * box[:, 1:2])  # [B, h]
    inside_x = (cols[None] >= 2 * w * box[:, 2:3]) & (cols[None] < 2 * w * box[:, 3:4])  # [B, w]
    return inside_y[:, :, None] & inside_x[:, None, :]


# ----------------------------------------------------------------------------------------------------------------------
# §2.1 Multi-scale CAM
# ----------------------------------------------------------------------------------------------------------------------


def _model_patch_size(model: nn.Module) -> int:
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper keeps the model in .module
    patch = getattr(inner, "patch_size", None)
    if patch is None:
        raise AttributeError(
            f"multiscale_cam: {type(inner).__name__} has no `patch_size` attribute; pass patch_size= explicitly"
        )
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    return int(patch)


def normalise_per_class(cam: Tensor) -> Tensor:
    """§2.1: per image and class, subtract the spatial min and divide by (spatial max + 1e-5). [B, C, H, W]."""
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + _NORM_EPS)


def _flip_pair_cams(model: nn.Module, x: Tensor, out_size: tuple[int, int], max_batch: int) -> tuple[Tensor, Tensor]:
    """Run ``x`` [B, 3, h', w'] with its flip; return (cam, cam_aux) [B, C_fg, H, W], max over the pair, ReLU'd.

    Each chunk holds some images followed by their flips, so a flip pair always shares one forward pass.
    """
    per_chunk = max_batch // 2
    cams, cams_aux = [], []
    for start in range(0, x.shape[0], per_chunk):
        chunk = x[start : start + per_chunk]
        n = chunk.shape[0]
        out = model(torch.cat([chunk, chunk.flip(-1)], dim=0), with_seg=False)
        merged = []
        for raw in (out.cam, out.cam_aux):
            up = resize_bilinear(raw.float(), out_size)
            merged.append(torch.maximum(up[:n], up[n:].flip(-1)).relu())
        cams.append(merged[0])
        cams_aux.append(merged[1])
    return torch.cat(cams, dim=0), torch.cat(cams_aux, dim=0)


@torch.no_grad()
def multiscale_cam(
    model: nn.Module,
    images: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    max_batch: int = 32,
    patch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-scale, flip-augmented CAMs of both classifier branches (SPEC §2.1), without gradient.

    For each scale the images are resized (bilinear; each side rounded to a multiple of the patch size) and run
    together with their horizontal flips; both raw token-resolution CAMs are upsampled to H × W (bilinear), un-flipped,
    max-reduced over the flip pair and ReLU'd, then summed over scales and max-normalised per image and class.
    Scales that round to the same input size give identical inputs, so that size runs once and is counted as often
    as it occurs. The model is called as ``model(x, with_seg=False)`` and must return an object with ``.cam`` and
    ``.cam_aux`` [N, C_fg, h, w]; its train/eval mode is left to the caller.

    Args:
        model: the MSFC network (or a DDP wrapper of it); provides ``patch_size`` unless ``patch_size`` is given.
        images: normalised images, [B, 3, H, W].
        scales: positive resize factors.
        max_batch: most images per forward pass (≥ 2: an image and its flip).
        patch_size: overrides ``model.patch_size``.

    Returns:
        (cam, cam_aux), each [B, C_fg, H, W] float32 in [0, 1], not class-masked
        (mask with ``labels[:, :, None, None]``).
    """
    check_4d(images, "multiscale_cam: images", channels=3)
    if len(scales) == 0 or min(scales) <= 0:
        raise ValueError(f"multiscale_cam: scales must be a non-empty list of positive factors, got {list(scales)}")
    if max_batch < 2:
        raise ValueError(f"multiscale_cam: max_batch must be >= 2 (an image and its flip), got {max_batch}")
    patch = int(patch_size) if patch_size is not None else _model_patch_size(model)
    height, width = images.shape[-2:]

    counts: dict[tuple[int, int], int] = {}
    for scale in scales:
        size = (round_to_patch(height * scale, patch), round_to_patch(width * scale, patch))
        counts[size] = counts.get(size, 0) + 1

    cam = cam_aux = None
    for size, count in counts.items():
        c, c_aux = _flip_pair_cams(model, resize_bilinear(images, size), (height, width), max_batch)
        cam = c * count if cam is None else cam + c * count
        cam_aux = c_aux * count if cam_aux is None else cam_aux + c_aux * count
    return normalise_per_class(cam), normalise_per_class(cam_aux)


def resize_to_tokens(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a map [B, C, H, W] to the token grid ``size`` = (h, w): bilinear, align_corners False (no antialias).

    :func:`token_labels` and :func:`prototype_labels` expect token-resolution scores; a caller holding a
    crop-resolution CAM downsamples it with this function first.
    """
    check_4d(cam, "resize_to_tokens: cam")
    return resize_bilinear(cam, (int(size[0]), int(size[1])))
