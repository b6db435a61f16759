"""CAM utilities (SPEC §2, §3, §4.3–§4.5): pure, batched, device-agnostic functions without configuration.

- boxes: :func:`box_mask` maps a crop's ``img_box`` to any resolution;
- multi-scale CAMs: :func:`multiscale_cam` (§2.1);
- labels: :func:`token_labels`, :func:`pair_labels` (§2.3), :func:`online_seg_labels` (§2.4),
  :func:`prototype_labels` (§4.5);
- local crops: :func:`roi_map`, :func:`place_local_crops`, :func:`cut_crops` (§4.3);
- SMCM views: :func:`smcm_views` and its inverse :func:`smcm_to_main` (§3, §4.4).

Label maps are int64 with 0 = background, 1..C_fg = classes and ``ignore_index`` (255) = ignore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Keeps the per-class max-normalisation of §2.1 finite for an all-zero class channel.
_NORM_EPS = 1e-5

# Order in which smcm_to_main stacks the views it is given (SPEC §3).
SMCM_VIEWS = ("rot", "scaled", "quads")


# ----------------------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _check_4d(x: Tensor, name: str, channels: int | None = None) -> None:
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        expected = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")


def _check_box(img_box: Tensor, batch: int) -> None:
    if img_box.dim() != 2 or img_box.shape != (batch, 4):
        raise ValueError(f"img_box must be [B={batch}, 4] (y0, y1, x0, x1), got shape {tuple(img_box.shape)}")


def _round_to_multiple(value: float, multiple: int) -> int:
    """``value`` rounded half-up to the nearest multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
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


def _normalise_per_channel(cam: Tensor) -> Tensor:
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
            up = _resize(raw.float(), out_size)
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
    _check_4d(images, "multiscale_cam: images", channels=3)
    if len(scales) == 0 or min(scales) <= 0:
        raise ValueError(f"multiscale_cam: scales must be a non-empty list of positive factors, got {list(scales)}")
    if max_batch < 2:
        raise ValueError(f"multiscale_cam: max_batch must be >= 2 (an image and its flip), got {max_batch}")
    patch = int(patch_size) if patch_size is not None else _model_patch_size(model)
    height, width = images.shape[-2:]

    counts: dict[tuple[int, int], int] = {}
    for scale in scales:
        size = (_round_to_multiple(height * scale, patch), _round_to_multiple(width * scale, patch))
        counts[size] = counts.get(size, 0) + 1

    cam = cam_aux = None
    for size, count in counts.items():
        c, c_aux = _flip_pair_cams(model, _resize(images, size), (height, width), max_batch)
        cam = c * count if cam is None else cam + c * count
        cam_aux = c_aux * count if cam_aux is None else cam_aux + c_aux * count
    return _normalise_per_channel(cam), _normalise_per_channel(cam_aux)


# ----------------------------------------------------------------------------------------------------------------------
# §2.3 Token labels and pair matrices, §4.5 prototype labels
# ----------------------------------------------------------------------------------------------------------------------


def resize_to_tokens(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a map [B, C, H, W] to the token grid ``size`` = (h, w): bilinear, align_corners False (no antialias).

    :func:`token_labels` and :func:`prototype_labels` expect token-resolution scores; a caller holding a
    crop-resolution CAM downsamples it with this function first.
    """
    _check_4d(cam, "resize_to_tokens: cam")
    return _resize(cam, (int(size[0]), int(size[1])))


def token_labels(
    scores: Tensor,
    img_box: Tensor,
    image_size: tuple[int, int],
    high: float,
    low: float,
    ignore_index: int = 255,
) -> Tensor:
    """Dual-threshold token labels (SPEC §2.3).

    With v the max over classes and c = argmax + 1: v > high → c; low < v ≤ high → ignore; v ≤ low → 0 (background);
    tokens whose cell centre lies outside ``img_box`` → ignore.

    Args:
        scores: class-masked scores at token resolution, [B, C_fg, h, w] (see :func:`resize_to_tokens`).
        img_box: [B, 4] (y0, y1, x0, x1) in pixels of ``image_size``.
        image_size: (H, W) of the crop the box refers to.
        high: foreground threshold.
        low: background threshold.
        ignore_index: label of ignored tokens.

    Returns:
        int64 [B, h, w].
    """
    _check_4d(scores, "token_labels: scores")
    _check_box(img_box, scores.shape[0])
    if low > high:
        raise ValueError(f"token_labels: low ({low}) must not exceed high ({high})")
    value, index = scores.max(dim=1)
    labels = torch.full_like(index, ignore_index)
    labels = torch.where(value > high, index + 1, labels)
    labels = torch.where(value <= low, torch.zeros_like(labels), labels)
    inside = box_mask(img_box.to(scores.device), scores.shape[-2:], image_size)
    return labels.masked_fill(~inside, ignore_index)


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
    cam: Tensor, img_box: Tensor, image_size: tuple[int, int], bkg_thre: float, ignore_index: int = 255
) -> Tensor:
    """Token labels for the memory prototypes (SPEC §4.5): argmax + 1, background where max ≤ bkg_thre.

    Args:
        cam: class-masked multi-scale CAM at token resolution, [B, C_fg, h, w] (see :func:`resize_to_tokens`).
        img_box: [B, 4] (y0, y1, x0, x1) in pixels of ``image_size``.
        image_size: (H, W) of the crop.
        bkg_thre: background threshold.
        ignore_index: label of tokens outside the box.

    Returns:
        int64 [B, h, w]: 0 background, 1..C_fg class, ``ignore_index`` outside the box.
    """
    _check_4d(cam, "prototype_labels: cam")
    _check_box(img_box, cam.shape[0])
    value, index = cam.max(dim=1)
    labels = torch.where(value > bkg_thre, index + 1, torch.zeros_like(index))
    inside = box_mask(img_box.to(cam.device), cam.shape[-2:], image_size)
    return labels.masked_fill(~inside, ignore_index)


# ----------------------------------------------------------------------------------------------------------------------
# §2.4 Online segmentation labels
# ----------------------------------------------------------------------------------------------------------------------


def _present_slots(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Compact per-image class slots: background first, then the present classes in class order.

    Args:
        labels: multi-hot [B, C_fg].

    Returns:
        ids int64 [B, K] (channel index into [background, classes...], i.e. the class id) and valid bool [B, K];
        K = 1 + the largest number of present classes in the batch; padding slots have id 0 and valid False.
    """
    present = labels > 0
    most_present = int(present.sum(dim=1).max().item()) if labels.shape[0] > 0 else 0
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

    Returns:
        int64 [B, H, W]: 0 background, 1..C_fg class, ``ignore_index`` ignored. Never an absent class.
    """
    _check_4d(cam, "online_seg_labels: cam")
    _check_4d(images01, "online_seg_labels: images01", channels=3)
    batch, num_fg, height, width = cam.shape
    if labels.shape != (batch, num_fg):
        raise ValueError(f"online_seg_labels: labels must be [B={batch}, C_fg={num_fg}], got {tuple(labels.shape)}")
    if images01.shape[0] != batch or images01.shape[-2:] != cam.shape[-2:]:
        raise ValueError(f"online_seg_labels: images01 {tuple(images01.shape)} must match cam {tuple(cam.shape)}")
    _check_box(img_box, batch)

    ids, valid = _present_slots(labels.to(cam.device))
    num_slots = ids.shape[1]
    index = ids[:, :, None, None].expand(-1, -1, height, width)
    stacks = []
    for plane in (high, low):
        full = torch.cat([torch.full_like(cam[:, :1], plane), cam], dim=1)  # [B, C, H, W], channel = class id
        stacks.append(torch.gather(full, 1, index))  # [B, K, H, W]
    half = (max(1, height // 2), max(1, width // 2))
    logits = _resize(torch.cat(stacks, dim=1).float(), half)
    logits = logits.masked_fill(~valid.repeat(1, 2)[:, :, None, None], float("-inf"))
    probs = torch.cat([part.softmax(dim=1) for part in logits.split(num_slots, dim=1)], dim=1)
    refined = _resize(par(_resize(images01.float(), half), probs), (height, width))
    label_h, label_l = (_slot_argmax(part, ids, valid) for part in refined.split(num_slots, dim=1))

    out = torch.full_like(label_h, ignore_index)
    out = torch.where((label_h == 0) & (label_l == 0), torch.zeros_like(out), out)
    out = torch.where(label_h > 0, label_h, out)
    inside = box_mask(img_box.to(cam.device), (height, width), (height, width))
    return out.masked_fill(~inside, ignore_index)


# ----------------------------------------------------------------------------------------------------------------------
# §4.3 ROI map and local crops
# ----------------------------------------------------------------------------------------------------------------------


def roi_map(cam_aux: Tensor, high: float, low: float) -> Tensor:
    """ROI map for local crop placement (SPEC §4.3) from the class-masked ``CAM_aux`` [B, C_fg, H, W].

    With v the max over classes: 0 where v ≤ low (background), 2 where v ≥ high (confident foreground), 1 between.

    Returns:
        int64 [B, H, W] with values 0 / 1 / 2.
    """
    _check_4d(cam_aux, "roi_map: cam_aux")
    value = cam_aux.amax(dim=1)
    roi = torch.ones_like(value, dtype=torch.int64)
    roi = roi.masked_fill(value <= low, 0)
    return roi.masked_fill(value >= high, 2)


def place_local_crops(
    roi: Tensor,
    num: int,
    size: int,
    neg_thre: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Place ``num`` square local crops per image from its ROI map (SPEC §4.3).

    A crop centred on pixel (cy, cx) has its top-left corner at (cy − size // 2, cx − size // 2), so the interior
    centres (at least half a crop from the border) are exactly those whose crop lies inside the image. Candidates are
    interior pixels with ROI ≤ 1; an image with fewer than ``num`` candidates draws from all interior pixels.
    Centres are drawn uniformly without replacement (``torch.multinomial``, batched over images). A crop is negative
    when its mean ROI value is ≤ ``neg_thre``.

    Args:
        roi: [B, H, W] with values 0 / 1 / 2 (:func:`roi_map`).
        num: crops per image.
        size: crop side in pixels (≤ H, W).
        neg_thre: mean-ROI threshold of a negative crop.
        generator: random generator (sampling runs on its device); None uses the global one.

    Returns:
        tops int64 [B, num, 2] = (y, x) top-left corners, and negative bool [B, num]; on ``roi``'s device.
    """
    if roi.dim() != 3:
        raise ValueError(f"place_local_crops: roi must be [B, H, W], got shape {tuple(roi.shape)}")
    height, width = roi.shape[-2:]
    if size < 1 or size > min(height, width):
        raise ValueError(f"place_local_crops: size must be in 1..{min(height, width)} for a {height}x{width} roi")
    half = size // 2
    span_y, span_x = height - size + 1, width - size + 1  # possible top-left rows / columns
    if num < 1 or num > span_y * span_x:
        raise ValueError(f"place_local_crops: num must be in 1..{span_y * span_x} (interior pixels), got {num}")

    interior = roi[:, half : half + span_y, half : half + span_x]  # indexed by top-left corner
    candidates = interior <= 1
    enough = candidates.flatten(1).sum(dim=1) >= num
    weights = torch.where(enough[:, None], candidates.flatten(1), torch.ones_like(candidates.flatten(1)))
    sample_device = generator.device if generator is not None else roi.device
    picked = torch.multinomial(weights.to(sample_device, torch.float32), num, replacement=False, generator=generator)
    picked = picked.to(roi.device)
    tops = torch.stack([picked // span_x, picked % span_x], dim=-1)

    # Crop sums from an integral image: exact in int64, no per-crop loop.
    integral = F.pad(roi.to(torch.int64).cumsum(1).cumsum(2), (1, 0, 1, 0))  # [B, H + 1, W + 1]
    y0, x0 = tops[..., 0], tops[..., 1]
    y1, x1 = y0 + size, x0 + size
    flat = integral.flatten(1)

    def at(y: Tensor, x: Tensor) -> Tensor:
        return torch.gather(flat, 1, y * (width + 1) + x)

    sums = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    negative = sums.double() / (size * size) <= neg_thre
    return tops, negative


def cut_crops(images: Tensor, tops: Tensor, size: int) -> Tensor:
    """Cut square crops: images [B, 3, H, W], tops [B, num, 2] (y, x) → [B·num, 3, size, size], image-major."""
    _check_4d(images, "cut_crops: images")
    batch, channels, height, width = images.shape
    if tops.dim() != 3 or tops.shape[0] != batch or tops.shape[2] != 2:
        raise ValueError(f"cut_crops: tops must be [B={batch}, num, 2], got shape {tuple(tops.shape)}")
    tops = tops.to(images.device, torch.int64)
    if tops.numel() and (tops.min() < 0 or tops[..., 0].max() > height - size or tops[..., 1].max() > width - size):
        raise ValueError(f"cut_crops: crops of size {size} at the given tops do not fit in {height}x{width} images")
    steps = torch.arange(size, device=images.device)
    rows = (tops[..., 0, None] + steps)[:, :, :, None]  # [B, num, size, 1]
    cols = (tops[..., 1, None] + steps)[:, :, None, :]  # [B, num, 1, size]
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    crops = images.permute(0, 2, 3, 1)[index, rows, cols]  # [B, num, size, size, 3]
    return crops.permute(0, 1, 4, 2, 3).reshape(-1, channels, size, size)


# ----------------------------------------------------------------------------------------------------------------------
# §3 / §4.4 SMCM views and their inverse (kept together so the two stay consistent)
# ----------------------------------------------------------------------------------------------------------------------


def smcm_views(x: Tensor, scale: float, patch: int) -> dict[str, Tensor]:
    """Spatial views of the main crop for SMCM (SPEC §3).

    Args:
        x: main crop (normalised), [B, 3, S, S]; non-square H × W works the same way.
        scale: resize factor of the rescaled view (``views.smcm.scale``).
        patch: backbone patch size; every view side is a multiple of it.

    Returns:
        ``rot`` [B, 3, S, S] rotated by 180°; ``scaled`` [B, 3, S', S'] with S' = round(S·scale / patch)·patch
        (bilinear); ``quads`` [4B, 3, S/2, S/2], per image top-left, top-right, bottom-left, bottom-right,
        image-major.
    """
    _check_4d(x, "smcm_views: x")
    batch, channels, height, width = x.shape
    if height % 2 or width % 2 or (height // 2) % patch or (width // 2) % patch:
        raise ValueError(
            f"smcm_views: the quadrants of a {height}x{width} crop must be multiples of the patch size {patch}; "
            f"use a crop size that is a multiple of 2·patch = {2 * patch}"
        )
    if scale <= 0:
        raise ValueError(f"smcm_views: scale must be positive, got {scale}")
    scaled_size = (_round_to_multiple(height * scale, patch), _round_to_multiple(width * scale, patch))
    qh, qw = height // 2, width // 2
    # [B, C, 2, qh, 2, qw] → [B, 2 (row), 2 (col), C, qh, qw] lists quadrants TL, TR, BL, BR per image.
    quads = x.reshape(batch, channels, 2, qh, 2, qw).permute(0, 2, 4, 1, 3, 5).reshape(4 * batch, channels, qh, qw)
    return {"rot": torch.rot90(x, 2, dims=(-2, -1)), "scaled": _resize(x, scaled_size), "quads": quads}


def _stitch_quads(quads: Tensor) -> Tensor:
    """Inverse of the quadrant split: [4B, C, q_h, q_w] (TL, TR, BL, BR per image) → [B, C, 2·q_h, 2·q_w]."""
    if quads.shape[0] % 4:
        raise ValueError(f"smcm_to_main: quads CAM batch must be 4·B, got {quads.shape[0]}")
    batch = quads.shape[0] // 4
    _, channels, qh, qw = quads.shape
    grid = quads.reshape(batch, 2, 2, channels, qh, qw).permute(0, 3, 1, 4, 2, 5)  # [B, C, 2, qh, 2, qw]
    return grid.reshape(batch, channels, 2 * qh, 2 * qw)


def smcm_to_main(view_cams: Mapping[str, Tensor], size: tuple[int, int]) -> Tensor:
    """Map each SMCM view's CAM back to the main frame (SPEC §4.4); differentiable.

    ``rot`` is rotated back by 180°, ``scaled`` is resized, ``quads`` are stitched (TL, TR, BL, BR) into one map;
    each is then resized to ``size`` when its grid differs (bilinear, align_corners False).

    Args:
        view_cams: raw CAMs keyed like :func:`smcm_views`: ``rot`` / ``scaled`` [B, C_fg, ., .], ``quads``
            [4B, C_fg, ., .]; any non-empty subset of the keys.
        size: (h, w), the main CAM's grid.

    Returns:
        [V, B, C_fg, h, w], views stacked in the order rot, scaled, quads (those present).
    """
    unknown = set(view_cams) - set(SMCM_VIEWS)
    if unknown or not view_cams:
        raise ValueError(
            f"smcm_to_main: view_cams keys must be a non-empty subset of {SMCM_VIEWS}, got {sorted(view_cams)}"
        )
    size = (int(size[0]), int(size[1]))
    mapped = []
    for name in SMCM_VIEWS:
        if name not in view_cams:
            continue
        cam = view_cams[name]
        _check_4d(cam, f"smcm_to_main: view_cams[{name!r}]")
        if name == "rot":
            cam = torch.rot90(cam, 2, dims=(-2, -1))
        elif name == "quads":
            cam = _stitch_quads(cam)
        mapped.append(_resize(cam, size))
    batches = {m.shape[0] for m in mapped}
    if len(batches) != 1:
        raise ValueError(f"smcm_to_main: views disagree on the batch size after mapping: {sorted(batches)}")
    return torch.stack(mapped, dim=0)
