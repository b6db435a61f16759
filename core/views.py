"""The training views built on the device from crop tensors (SPEC §3, §4.3, §4.4).

- photometric views G1, G2 and the local source L (:class:`PhotometricAugment`, :func:`flip_boxes`);
- local crops: :func:`roi_map`, :func:`place_local_crops`, :func:`cut_crops` (§4.3);
- SMCM views: :func:`smcm_views` and its inverse :func:`smcm_to_main` (§3, §4.4).

Only the G2 random resized crop, which needs the original image, is cut in the data loader
(``datasets/transforms.py``).

Random parameters are drawn per image from a CPU ``torch.Generator`` (cheap scalars, checkpointable, identical on CPU
and CUDA); the image operations are torchvision's and run wherever the images are. The colour-jitter operations are
applied in a fixed order (brightness, contrast, saturation, hue) rather than torchvision's random order, so that one
generator draw sequence fully determines a view.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from core.cam import box_mask, check_4d, resize_bilinear, round_to_patch
from utils.errors import debug_enabled
from utils.syncs import host_item, to_device


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    # host_item: the draw of a CPU generator lives on the host in every run, so reading it is never a device sync.
    return low + (high - low) * host_item(torch.rand((), generator=generator))


def _coin(generator: torch.Generator, p: float) -> bool:
    # Always draw, even for p in {0, 1}, so the random stream does not depend on the probabilities.
    return host_item(torch.rand((), generator=generator)) < p


@dataclass(frozen=True)
class PhotometricAugment:
    """One view's photometric recipe: flip, colour jitter, grayscale, Gaussian blur, solarize.

    Call with ``images01 [B, 3, H, W]`` float in [0, 1]; returns the augmented batch (same shape, in [0, 1]) and the
    per-image flip flags ``[B]`` bool (callers that carry spatial information must flip it too).
    """

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: Sequence[float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def _one(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
        flip = _coin(generator, self.flip_p)
        if flip:
            image = image.flip(-1)
        if _coin(generator, self.jitter_p):
            image = TF.adjust_brightness(image, _uniform(generator, 1 - self.brightness, 1 + self.brightness))
            image = TF.adjust_contrast(image, _uniform(generator, 1 - self.contrast, 1 + self.contrast))
            image = TF.adjust_saturation(image, _uniform(generator, 1 - self.saturation, 1 + self.saturation))
            image = TF.adjust_hue(image, _uniform(generator, -self.hue, self.hue))
        if _coin(generator, self.gray_p):
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if _coin(generator, self.blur_p):
            sigma = _uniform(generator, *self.blur_sigma)
            # kernel covering ±3σ, odd, no larger than the image
            size = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(image.shape[-2:]) - 1) // 2) + 1)
            image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
        if _coin(generator, self.solarize_p):
            image = TF.solarize(image, 0.5)
        return image.clamp(0.0, 1.0), flip

    def __call__(self, images01: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """images01 ``[B, 3, H, W]`` in [0, 1] -> (augmented ``[B, 3, H, W]``, flipped ``[B]`` bool)."""
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images01.shape)}")
        views, flips = zip(*(self._one(image, generator) for image in images01.float()), strict=True)
        return torch.stack(views), to_device(torch.tensor(flips, dtype=torch.bool), images01.device)

    @classmethod
    def from_mapping(cls, node: Mapping, where: str, other_keys: Sequence[str] = ()) -> PhotometricAugment:
        """The recipe of a ``views.*`` config node; ``other_keys`` are that node's non-photometric keys.

        Raises:
            ValueError: a key that is neither a field of this recipe nor one of ``other_keys`` (naming ``where``),
                so a misspelt augmentation key is never silently dropped.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(node) - names - set(other_keys))
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(unknown)}; a view takes "
                f"{', '.join(sorted(names | set(other_keys)))}"
            )
        return cls(**{key: value for key, value in node.items() if key in names})


def flip_boxes(boxes: torch.Tensor, flipped: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``img_box`` rows whose image was flipped horizontally.

    Args:
        boxes: ``[B, 4]`` int64 ``(y0, y1, x0, x1)``, end-exclusive, in pixels of an image ``width`` wide.
        flipped: ``[B]`` bool, True where the image was flipped.
        width: the image width W.

    Returns:
        ``[B, 4]``: flipped rows become ``(y0, y1, W − x1, W − x0)``, the others are unchanged.
    """
    mirrored = torch.stack([boxes[:, 0], boxes[:, 1], width - boxes[:, 3], width - boxes[:, 2]], dim=1)
    return torch.where(flipped.to(boxes.device)[:, None], mirrored, boxes)


# Order in which smcm_to_main stacks the views it is given (SPEC §3).
SMCM_VIEWS = ("rot", "scaled", "quads")


# ----------------------------------------------------------------------------------------------------------------------
# §4.3 ROI map and local crops
# ----------------------------------------------------------------------------------------------------------------------


def roi_map(cam_aux: Tensor, high: float, low: float) -> Tensor:
    """ROI map for local crop placement (SPEC §4.3) from the class-masked ``CAM_aux`` [B, C_fg, H, W].

    With v the max over classes: 0 where v ≤ low (background), 2 where v ≥ high (confident foreground), 1 between.

    Returns:
        int64 [B, H, W] with values 0 / 1 / 2.
    """
    check_4d(cam_aux, "roi_map: cam_aux")
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
    Centres are drawn uniformly without replacement, batched over images, exactly as ``torch.multinomial(weights,
    num, replacement=False, generator=generator)`` draws them (same centres, same generator state afterwards):
    PyTorch draws ``q ~ Exp(1)`` per candidate and takes the top ``num`` of ``weights / q``. Here only ``q`` is drawn
    on the generator's device; the weights stay on ``roi``'s device, so a CUDA ROI map with a CPU generator needs no
    device-to-host copy and no host read (``torch.multinomial`` would need both). A crop is negative when its mean
    ROI value is ≤ ``neg_thre``.

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
    weights = torch.where(enough[:, None], candidates.flatten(1), torch.ones_like(candidates.flatten(1))).float()
    picked = _sample_without_replacement(weights, num, generator)
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


def _sample_without_replacement(weights: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    """``torch.multinomial(weights, num, replacement=False, generator=generator)`` without a host read.

    PyTorch's own algorithm for sampling without replacement (the exponential race: the top ``num`` of
    ``weights / q``, ``q ~ Exp(1)`` drawn by ``exponential_`` on the generator's device, ``argmax`` when ``num`` is
    1), so the indices and the generator's state afterwards are the same; tests/test_cam.py compares the two. Unlike
    ``torch.multinomial`` it neither validates the weights on the host nor needs them on the generator's device.

    Args:
        weights: float32 ``[B, M]``, non-negative, at least ``num`` positive entries per row.
        num: samples per row.
        generator: draws ``q``; None uses the default generator of ``weights``' device.

    Returns:
        int64 ``[B, num]`` on ``weights``' device, ordered by decreasing key as ``torch.multinomial``.
    """
    sample_device = generator.device if generator is not None else weights.device
    q = torch.empty(weights.shape, dtype=weights.dtype, device=sample_device).exponential_(1.0, generator=generator)
    keys = weights / to_device(q, weights.device)
    if num == 1:
        return keys.argmax(dim=-1, keepdim=True)
    return keys.topk(num, dim=-1).indices


def cut_crops(images: Tensor, tops: Tensor, size: int) -> Tensor:
    """Cut square crops: images [B, 3, H, W], tops [B, num, 2] (y, x) → [B·num, 3, size, size], image-major.

    That the crops fit is a host read of ``tops`` (a device sync), so it is checked with ``MSFC_DEBUG=1`` only; the
    tops of :func:`place_local_crops` fit by construction (out-of-range tops are otherwise an indexing error).
    """
    check_4d(images, "cut_crops: images")
    batch, channels, height, width = images.shape
    if tops.dim() != 3 or tops.shape[0] != batch or tops.shape[2] != 2:
        raise ValueError(f"cut_crops: tops must be [B={batch}, num, 2], got shape {tuple(tops.shape)}")
    tops = tops.to(images.device, torch.int64)
    if debug_enabled() and tops.numel() and (tops.min() < 0 or tops[..., 0].max() > height - size
                                              or tops[..., 1].max() > width - size):  # fmt: skip
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
    check_4d(x, "smcm_views: x")
    batch, channels, height, width = x.shape
    if height % 2 or width % 2 or (height // 2) % patch or (width // 2) % patch:
        raise ValueError(
            f"smcm_views: the quadrants of a {height}x{width} crop must be multiples of the patch size {patch}; "
            f"use a crop size that is a multiple of 2·patch = {2 * patch}"
        )
    if scale <= 0:
        raise ValueError(f"smcm_views: scale must be positive, got {scale}")
    scaled_size = (round_to_patch(height * scale, patch), round_to_patch(width * scale, patch))
    qh, qw = height // 2, width // 2
    # [B, C, 2, qh, 2, qw] → [B, 2 (row), 2 (col), C, qh, qw] lists quadrants TL, TR, BL, BR per image.
    quads = x.reshape(batch, channels, 2, qh, 2, qw).permute(0, 2, 4, 1, 3, 5).reshape(4 * batch, channels, qh, qw)
    return {"rot": torch.rot90(x, 2, dims=(-2, -1)), "scaled": resize_bilinear(x, scaled_size), "quads": quads}


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
        check_4d(cam, f"smcm_to_main: view_cams[{name!r}]")
        if name == "rot":
            cam = torch.rot90(cam, 2, dims=(-2, -1))
        elif name == "quads":
            cam = _stitch_quads(cam)
        mapped.append(resize_bilinear(cam, size))
    batches = {m.shape[0] for m in mapped}
    if len(batches) != 1:
        raise ValueError(f"smcm_to_main: views disagree on the batch size after mapping: {sorted(batches)}")
    return torch.stack(mapped, dim=0)


# ----------------------------------------------------------------------------------------------------------------------
# The views of one training step, in one place
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalCrops:
    """Placement of the CTC local crops (SPEC §4.3): count per image, side in pixels, negative threshold, flip."""

    num_crops: int = 8
    size: int = 96
    neg_roi_thre: float = 0.2
    flip_p: float = 0.5


@dataclass(frozen=True)
class MainView:
    """The main view of a step and what stays in its frame.

    Attributes:
        images01: ``[B, 3, S, S]`` in [0, 1], the view every main-view computation sees.
        box: ``[B, 4]`` ``img_box`` in that view's frame (mirrored where G1 flipped the image).
        source01: ``[B, 3, S, S]`` the clean crop in the same frame: the source of the local crops.
    """

    images01: Tensor
    box: Tensor
    source01: Tensor


@dataclass(frozen=True)
class TrainViews:
    """Builds every view of a training step from the loader's crop tensors (SPEC §3, §4.3, §4.4).

    The random draws come from one CPU generator in a fixed order — main view (G1), then for CTC: G1 again when the
    main view is clean, G2, the local source, the crop placements, the crop flips — so that a step's views are fully
    determined by the generator state (checkpointed with the run).

    Attributes:
        g1, g2, local: the photometric recipes of the global views and the local source. The local source is never
            flipped as a whole (it must stay in the frame of the ROI map); each cut crop is flipped on its own.
        crops: local-crop placement.
        main_is_g1: main view = G1 (published) or the clean crop.
        smcm_scale: side factor of the SMCM rescaled view.
    """

    g1: PhotometricAugment
    g2: PhotometricAugment
    local: PhotometricAugment
    crops: LocalCrops
    main_is_g1: bool = True
    smcm_scale: float = 0.5

    def main(self, crop01: Tensor, box: Tensor, generator: torch.Generator) -> MainView:
        """The main view of ``crop01 [B, 3, S, S]`` with its ``box [B, 4]`` (G1 or the clean crop)."""
        if not self.main_is_g1:
            return MainView(crop01, box, crop01)
        images01, flipped = self.g1(crop01, generator)
        source01 = torch.where(flipped[:, None, None, None], crop01.flip(-1), crop01)
        return MainView(images01, flip_boxes(box, flipped, crop01.shape[-1]), source01)

    def smcm(self, x: Tensor, patch: int) -> dict[str, Tensor]:
        """The SMCM views of the (normalised) main view, named ``smcm_rot`` / ``smcm_scaled`` / ``smcm_quads``."""
        return {f"smcm_{name}": view for name, view in smcm_views(x, self.smcm_scale, patch).items()}

    def ctc(
        self, main: MainView, g2_01: Tensor, cam_aux: Tensor, high: float, low: float, generator: torch.Generator
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The CTC views in [0, 1]: G1 (only when the main view is clean), G2 and the local crops.

        Args:
            main: the step's main view.
            g2_01: ``[B, 3, S, S]`` the loader's G2 crop in [0, 1].
            cam_aux: ``[B, C_fg, S, S]`` class-masked CAM_aux of the main view (the ROI source).
            high, low: the ROI thresholds (``cam.high_thre`` / ``cam.low_thre``).

        Returns:
            (views ``{"g1"?, "g2", "local"}``, ``local`` being ``[B·n, 3, size, size]``; negative ``[B, n]`` bool).
        """
        views = {}
        if not self.main_is_g1:
            views["g1"], _ = self.g1(main.images01, generator)
        views["g2"], _ = self.g2(g2_01, generator)
        source, _ = self.local(main.source01, generator)
        size = tuple(main.images01.shape[-2:])
        roi = roi_map(cam_aux, high, low)
        # Centres are drawn where ROI <= 1; marking the zero padding 2 keeps local crops on the image.
        roi = torch.where(box_mask(main.box, size, size), roi, torch.full_like(roi, 2))
        tops, negative = place_local_crops(roi, self.crops.num_crops, self.crops.size, self.crops.neg_roi_thre,
                                           generator)  # fmt: skip
        crops = cut_crops(source, tops, self.crops.size)
        flip = torch.rand(crops.shape[0], generator=generator) < self.crops.flip_p
        views["local"] = torch.where(to_device(flip, crops.device)[:, None, None, None], crops.flip(-1), crops)
        return views, negative
