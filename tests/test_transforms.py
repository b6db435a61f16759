"""CPU-side training crops and evaluation resizing (datasets/transforms.py, SPEC §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.transforms import (
    TrainTransform,
    random_resized_crop,
    resized_crop_window,
    scale_flip_crop,
    to_chw_tensor,
)


def nonzero_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random RGB image with every value in 1..255, so zero pixels in a crop can only be padding."""
    return np.random.default_rng(seed).integers(1, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [(20, 50, (1.0, 1.0)), (50, 20, (1.0, 1.0)), (10, 12, (1.0, 1.0)), (80, 90, (1.0, 1.0)), (40, 60, (0.5, 2.0))],
)
def test_crop_box_marks_exactly_the_non_padded_area(height: int, width: int, scale: tuple[float, float]) -> None:
    crop_size = 32
    for seed in range(5):
        crop, box = scale_flip_crop(nonzero_image(height, width), np.random.default_rng(seed), crop_size, scale)
        assert crop.shape == (crop_size, crop_size, 3) and crop.dtype == np.uint8
        assert box.dtype == np.int64 and box.shape == (4,)
        y0, y1, x0, x1 = box.tolist()
        assert 0 <= y0 < y1 <= crop_size and 0 <= x0 < x1 <= crop_size
        inside = np.zeros((crop_size, crop_size), dtype=bool)
        inside[y0:y1, x0:x1] = True
        # Bilinear interpolation of values >= 1 stays >= 1, so the image area has no zero and padding is all zero.
        assert (crop[inside] > 0).all()
        assert (crop[~inside] == 0).all()


def test_crop_extent_follows_the_rescale_factor() -> None:
    # Factor fixed at 0.5: a 40 x 60 image becomes 20 x 30, both smaller than the 32 crop, so the box is 20 x 30.
    _, box = scale_flip_crop(nonzero_image(40, 60), np.random.default_rng(0), 32, (0.5, 0.5))
    assert (box[1] - box[0], box[3] - box[2]) == (20, 30)
    # Factor 2: 40 x 60 -> 80 x 120, larger than the crop on both axes, so nothing is padded.
    _, box = scale_flip_crop(nonzero_image(40, 60), np.random.default_rng(0), 32, (2.0, 2.0))
    assert box.tolist() == [0, 32, 0, 32]


@pytest.mark.parametrize(("flip_p", "flipped"), [(0.0, False), (1.0, True)])
def test_small_image_is_copied_unchanged_into_the_box(flip_p: float, flipped: bool) -> None:
    image = nonzero_image(10, 14)
    crop, box = scale_flip_crop(image, np.random.default_rng(3), 16, (1.0, 1.0), flip_p=flip_p)
    y0, y1, x0, x1 = box.tolist()
    expected = image[:, ::-1] if flipped else image
    np.testing.assert_array_equal(crop[y0:y1, x0:x1], expected)


def test_large_image_crop_is_a_window_of_the_image() -> None:
    # Factor 1 and no flip: the crop must equal image[oy:oy+S, ox:ox+S] for exactly one offset (random content).
    image = nonzero_image(40, 50)
    crop, box = scale_flip_crop(image, np.random.default_rng(1), 16, (1.0, 1.0), flip_p=0.0)
    assert box.tolist() == [0, 16, 0, 16]
    matches = [
        (oy, ox) for oy in range(25) for ox in range(35) if np.array_equal(image[oy : oy + 16, ox : ox + 16], crop)
    ]
    assert len(matches) == 1


def test_resized_crop_window_respects_area_and_aspect() -> None:
    rng = np.random.default_rng(0)
    height, width = 60, 80
    for _ in range(200):
        top, left, h, w = resized_crop_window((height, width), rng, scale=(0.4, 1.0))
        assert top >= 0 and left >= 0 and top + h <= height and left + w <= width
        # Rounding each side by at most 0.5 pixel moves the area fraction and aspect ratio only slightly.
        assert 0.4 * 0.9 <= h * w / (height * width) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_resized_crop_window_fallback_clamps_the_aspect_ratio() -> None:
    # A 4 x 100 strip: no window of >= 90 % area has an aspect ratio within [3/4, 4/3], so the fallback runs and
    # returns the centred window of the allowed ratio closest to the strip: h = 4, w = round(4 * 4/3) = 5.
    top, left, h, w = resized_crop_window((4, 100), np.random.default_rng(0), scale=(0.9, 1.0))
    assert (h, w) == (4, 5)
    assert (top, left) == (0, (100 - 5) // 2)


def test_full_area_square_crop_is_the_identity() -> None:
    # Area fraction 1 and ratio exactly 1 on a square image: the only window is the whole image, resized to itself.
    image = nonzero_image(24, 24)
    out = random_resized_crop(image, np.random.default_rng(0), 24, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out, image)


def test_train_transform_outputs_and_seeding() -> None:
    transform = TrainTransform(crop_size=32, scale_range=(0.5, 2.0), g2_scale=(0.4, 1.0))
    image = nonzero_image(45, 70)
    first = transform(image, np.random.default_rng(7))
    again = transform(image, np.random.default_rng(7))
    other = transform(image, np.random.default_rng(8))
    assert first["img"].shape == (3, 32, 32) and first["img"].dtype == torch.uint8
    assert first["g2"].shape == (3, 32, 32) and first["g2"].dtype == torch.uint8
    assert first["img_box"].dtype == torch.int64
    for key in ("img", "g2", "img_box"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["img"], other["img"]) or not torch.equal(first["g2"], other["g2"])
    # G2 crops the original image, never the padded canvas: an image without zeros gives a G2 view without zeros.
    assert (first["g2"] > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"crop_size": 0, "scale_range": (0.5, 2.0), "g2_scale": (0.4, 1.0)}, "data.crop_size"),
        ({"crop_size": 32, "scale_range": (2.0, 0.5), "g2_scale": (0.4, 1.0)}, "data.scale_range"),
        ({"crop_size": 32, "scale_range": (0.5, 2.0), "g2_scale": (0.4, 1.5)}, "views.g2.scale"),
    ],
)
def test_train_transform_rejects_bad_settings_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TrainTransform(**kwargs)


def test_to_chw_tensor_layout() -> None:
    image = nonzero_image(3, 5)
    tensor = to_chw_tensor(image)
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.uint8
    assert tensor[2, 1, 4].item() == image[1, 4, 2]


def test_crop_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        scale_flip_crop(np.zeros((4, 4), dtype=np.uint8), np.random.default_rng(0), 8, (1.0, 1.0))
