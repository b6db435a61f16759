"""CPU-side geometric transforms for training crops and evaluation images (SPEC §3).

Everything here works on ``[H, W, 3]`` uint8 numpy images and draws its randomness from an explicit
``numpy.random.Generator``, so the dataset controls seeding. Photometric view ops run later on the device
(``core/views.py``); only what needs the *original* image (the G2 random resized crop) happens here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# torchvision's RandomResizedCrop default aspect range; the G2 view follows it (SPEC §3, design.md "Dataset items").
G2_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be [H, W, 3] uint8, got shape {image.shape} dtype {image.dtype}")


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``[H, W, 3]`` uint8 image to ``size_hw`` = (H', W')."""
    height, width = size_hw
    if (height, width) == image.shape[:2]:
        return image
    # INTER_LINEAR is bilinear; for strong downscales INTER_AREA would alias less, but SPEC §3 asks for bilinear.
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def _place(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Place a side of ``length`` pixels in a crop window of ``crop`` pixels along one axis.

    Returns (src_start, dst_start, extent): copy ``extent`` source pixels from ``src_start`` to ``dst_start``.
    A longer side is cut at a random offset; a shorter one lands at a random offset in the zero canvas.
    """
    if length >= crop:
        return int(rng.integers(0, length - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - length + 1)), length


@dataclass(frozen=True)
class CropGeometry:
    """One draw of the training crop: the rescaled size, the flip, and per axis ``(src start, dst start, extent)``."""

    size: tuple[int, int]
    flip: bool
    rows: tuple[int, int, int]
    cols: tuple[int, int, int]

    @property
    def img_box(self) -> np.ndarray:
        """int64 ``[4]`` = (y0, y1, x0, x1), end-exclusive: where the image lies in the crop."""
        (_, y0, ny), (_, x0, nx) = self.rows, self.cols
        return np.array([y0, y0 + ny, x0, x0 + nx], dtype=np.int64)


def draw_geometry(
    size_hw: tuple[int, int], rng: np.random.Generator, crop_size: int, scale_range: Sequence[float], flip_p: float
) -> CropGeometry:
    """The random draws of the training crop for an image of ``size_hw``, in their order (rescale factor, flip, row
    placement, column placement): :func:`scale_flip_crop` and the stage-2 joint image + label crop
    (``datasets/pseudo.py``) apply one draw to every array of a sample."""
    factor = float(rng.uniform(scale_range[0], scale_range[1]))
    size = (max(1, round(size_hw[0] * factor)), max(1, round(size_hw[1] * factor)))
    flip = bool(rng.random() < flip_p)
    rows = _place(size[0], crop_size, rng)
    return CropGeometry(size, flip, rows, _place(size[1], crop_size, rng))


def apply_geometry(
    array: np.ndarray, geometry: CropGeometry, crop_size: int, interpolation: int, fill: float
) -> np.ndarray:
    """Crop ``[H, W]`` or ``[H, W, K]`` ``array`` as ``geometry`` says: resized with ``interpolation`` (cv2), flipped,
    placed in a ``crop_size`` square filled with ``fill``."""
    height, width = geometry.size
    resized = array if array.shape[:2] == (height, width) else cv2.resize(array, (width, height),
                                                                            interpolation=interpolation)  # fmt: skip
    resized = resized.reshape(height, width, *array.shape[2:])  # cv2 drops a single trailing channel
    if geometry.flip:
        resized = resized[:, ::-1]
    (sy, dy, ny), (sx, dx, nx) = geometry.rows, geometry.cols
    out = np.full((crop_size, crop_size, *array.shape[2:]), fill, dtype=array.dtype)
    out[dy : dy + ny, dx : dx + nx] = resized[sy : sy + ny, sx : sx + nx]
    return out


def scale_flip_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    scale_range: tuple[float, float],
    flip_p: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale, horizontal flip and zero-padded random crop (the main training crop of SPEC §3).

    Args:
        image: ``[H, W, 3]`` uint8.
        rng: source of all randomness.
        crop_size: side S of the square output.
        scale_range: (lo, hi) of the uniform rescale factor.
        flip_p: probability of a horizontal flip.

    Returns:
        crop ``[S, S, 3]`` uint8 (zeros outside the image) and ``img_box`` int64 ``[4]`` = (y0, y1, x0, x1),
        end-exclusive, the non-padded area in crop pixels.
    """
    _check_image(image)
    geometry = draw_geometry(image.shape[:2], rng, crop_size, scale_range, flip_p)
    # INTER_LINEAR is bilinear; for strong downscales INTER_AREA would alias less, but SPEC §3 asks for bilinear.
    return apply_geometry(image, geometry, crop_size, cv2.INTER_LINEAR, 0), geometry.img_box


def resized_crop_window(
    size_hw: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = G2_RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Sample a random-resized-crop window (top, left, height, width) the way torchvision's RandomResizedCrop does.

    Area fraction ~ U[scale], aspect ratio (w / h) log-uniform in ``ratio``; up to ``attempts`` tries for a window
    that fits, else the largest centred window whose aspect ratio is clamped to ``ratio``.
    """
    height, width = size_hw
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_lo, log_hi)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = G2_RATIO,
) -> np.ndarray:
    """Random resized crop of ``image`` ``[H, W, 3]`` uint8, bilinearly resized to ``[size, size, 3]`` (G2, SPEC §3)."""
    _check_image(image)
    top, left, h, w = resized_crop_window(image.shape[:2], rng, scale, ratio)
    return resize_image(np.ascontiguousarray(image[top : top + h, left : left + w]), (size, size))


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 numpy -> ``[3, H, W]`` uint8 tensor (contiguous copy)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


@dataclass(frozen=True)
class TrainTransform:
    """The dataset side of a training sample (SPEC §3): main crop + ``img_box`` and the G2 view.

    Attributes:
        crop_size: side S of both outputs.
        scale_range: uniform rescale factor range of the main crop.
        g2_scale: area fraction range of the G2 random resized crop.
        flip_p: horizontal flip probability of the main crop.
    """

    crop_size: int
    scale_range: tuple[float, float]
    g2_scale: tuple[float, float]
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if self.crop_size <= 0:
            raise ValueError(f"data.crop_size must be positive, got {self.crop_size}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"data.scale_range must be [lo, hi] with 0 < lo <= hi, got {list(self.scale_range)}")
        lo, hi = self.g2_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"views.g2.scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.g2_scale)}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Build the training tensors of one image.

        Args:
            image: ``[H, W, 3]`` uint8 RGB.
            rng: the item's generator.

        Returns:
            ``img`` uint8 ``[3, S, S]``, ``g2`` uint8 ``[3, S, S]``, ``img_box`` int64 ``[4]``.
        """
        crop, img_box = scale_flip_crop(image, rng, self.crop_size, self.scale_range, self.flip_p)
        g2 = random_resized_crop(image, rng, self.crop_size, self.g2_scale)
        return {"img": to_chw_tensor(crop), "g2": to_chw_tensor(g2), "img_box": torch.from_numpy(img_box)}
