"""CAM -> label rules of the training step (SPEC §2.3, §2.4, §4.5): pure, batched tensor functions.

- :func:`token_labels` and :func:`pair_labels` (§2.3) for PTC and the memory contrast;
- :func:`prototype_labels` (§4.5) for the memory bank's accumulation;
- :func:`online_seg_labels` (§2.4), the segmentation head's online labels.

Label maps are int64 with 0 = background, 1..C_fg = classes and ``ignore_index`` (255) = ignore.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from core.cam import box_mask, check_4d, check_box, resize_bilinear

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
    check_4d(scores, "token_labels: scores")
    check_box(img_box, scores.shape[0])
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
    check_4d(cam, "prototype_labels: cam")
    check_box(img_box, cam.shape[0])
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
    check_4d(cam, "online_seg_labels: cam")
    check_4d(images01, "online_seg_labels: images01", channels=3)
    batch, num_fg, height, width = cam.shape
    if labels.shape != (batch, num_fg):
        raise ValueError(f"online_seg_labels: labels must be [B={batch}, C_fg={num_fg}], got {tuple(labels.shape)}")
    if images01.shape[0] != batch or images01.shape[-2:] != cam.shape[-2:]:
        raise ValueError(f"online_seg_labels: images01 {tuple(images01.shape)} must match cam {tuple(cam.shape)}")
    check_box(img_box, batch)

    ids, valid = _present_slots(labels.to(cam.device))
    num_slots = ids.shape[1]
    index = ids[:, :, None, None].expand(-1, -1, height, width)
    stacks = []
    for plane in (high, low):
        full = torch.cat([torch.full_like(cam[:, :1], plane), cam], dim=1)  # [B, C, H, W], channel = class id
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
