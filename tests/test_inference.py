"""engine/inference.py: resize modes and the flip / scale fusion of predict_seg_logits (SPEC §5.2), known answers."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.inference import predict_seg_logits, resize_for_inference
from models.backbone import IMAGENET_MEAN, IMAGENET_STD, normalize_images

PATCH = 4
# Bilinear upsampling of a 1x1 map is constant up to float32 rounding (~1e-7); wrong fusions are off by >= 1.
ATOL = 1e-5


class ImageNetNormalised(nn.Module):
    """A stand-in's input normalisation: the default backbone statistics (callers ask the model, as for MSFC)."""

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, IMAGENET_MEAN, IMAGENET_STD)


class ShapeAndSideModel(ImageNetNormalised):
    """A stand-in for MSFC whose logits are known from the input alone.

    forward(x [B, 3, h, w]) -> ``seg_logits`` [B, 3, 1, 1] = (w / p, h / p, side), where side is +1 when the left
    half of x is clearly brighter than the right half, -1 when it is clearly darker, else 0. A 1x1 map upsamples to
    a constant (to float rounding, hence ATOL), so the fused logits are known numbers; ``shapes`` records every input
    the network saw.
    """

    patch_size = PATCH

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, with_seg: bool = False) -> SimpleNamespace:
        assert with_seg
        self.shapes.append(tuple(x.shape))
        batch, _, height, width = x.shape
        half = width // 2
        diff = x[..., :half].mean((1, 2, 3)) - x[..., width - half :].mean((1, 2, 3))
        side = (diff > 0.1).float() - (diff < -0.1).float()
        size = torch.tensor([width / PATCH, height / PATCH]).expand(batch, 2)
        return SimpleNamespace(seg_logits=torch.cat([size, side[:, None]], 1)[:, :, None, None])


def two_images(height: int = 12, width: int = 20) -> torch.Tensor:
    """[2, 3, H, W] uint8, non-square: image 0 bright on its left half and black on the right, image 1 flat grey."""
    images = torch.full((2, 3, height, width), 128, dtype=torch.uint8)
    images[0, :, :, : width // 2] = 255
    images[0, :, :, width // 2 :] = 0
    return images


def constant_logits(values: list[list[float]], height: int = 12, width: int = 20) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, :, None, None].expand(-1, -1, height, width)


def test_square_resize_max_over_flips_sum_over_scales() -> None:
    # Published COCO inference: 12x20 -> 8x8 first; scales 1.0 and 1.5 give 8x8 and 12x12 (whole patches of 4).
    # Per scale (w/p, h/p, side): scale 1.0 -> (2, 2, s), scale 1.5 -> (3, 3, s); image 0 has s = +1 and its flip
    # s = -1, image 1 has s = 0 both ways. Max over the flip pair, then sum over scales: (5, 5, 2) and (5, 5, 0).
    model = ShapeAndSideModel()
    logits = predict_seg_logits(model, two_images(), (1.0, 1.5), True, "max", "sum", 8, resize_mode="square")
    assert model.shapes == [(4, 3, 8, 8), (4, 3, 12, 12)]  # each scale: the 2 images, then their flips
    assert logits.shape == (2, 3, 12, 20) and logits.dtype == torch.float32  # back at the original size
    torch.testing.assert_close(logits, constant_logits([[5, 5, 2], [5, 5, 0]]), rtol=0, atol=ATOL)


def test_square_resize_with_the_voc_fusion_rules() -> None:
    # Sum over flips, max over scales: scale 1.0 -> (4, 4, 0), scale 1.5 -> (6, 6, 0) -> (6, 6, 0) for both images.
    logits = predict_seg_logits(ShapeAndSideModel(), two_images(), (1.0, 1.5), True, "sum", "max", 8,
                                resize_mode="square")  # fmt: skip
    torch.testing.assert_close(logits, constant_logits([[6, 6, 0], [6, 6, 0]]), rtol=0, atol=ATOL)


def test_long_side_is_the_default_and_keeps_the_aspect_ratio() -> None:
    # 12x20 with the long side -> 8: 5x8 (12 * 0.4 = 4.8 -> 5). Scale 1.0: 5 -> 4 (1.25 patches -> 1), 8 -> 8;
    # scale 1.5: 7.5 -> 8, 12 -> 12. Per scale (w/p, h/p): (2, 1) and (3, 2); sum over flips: (4, 2, 0), (6, 4, 0);
    # max over scales: (6, 4, 0).
    model = ShapeAndSideModel()
    default = predict_seg_logits(model, two_images(), (1.0, 1.5), True, "sum", "max", 8)
    assert model.shapes == [(4, 3, 4, 8), (4, 3, 8, 12)]
    torch.testing.assert_close(default, constant_logits([[6, 4, 0], [6, 4, 0]]), rtol=0, atol=ATOL)
    explicit = predict_seg_logits(model, two_images(), (1.0, 1.5), True, "sum", "max", 8, resize_mode="long_side")
    torch.testing.assert_close(explicit, default, rtol=0, atol=ATOL)
    parameter = inspect.signature(predict_seg_logits).parameters["resize_mode"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default == "long_side"


def test_no_resize_means_full_resolution_in_either_mode() -> None:
    for mode in ("long_side", "square"):
        model = ShapeAndSideModel()
        predict_seg_logits(model, two_images(), (1.0,), False, "sum", "max", None, resize_mode=mode)
        assert model.shapes == [(2, 3, 12, 20)]


def test_square_resize_is_bilinear_without_aligned_corners() -> None:
    # A horizontal ramp 0, 1, ..., 7 (8 columns) squeezed to 4: align_corners=False samples the source at
    # x = (i + 0.5) * 2 - 0.5 = 0.5, 2.5, 4.5, 6.5, i.e. the means of column pairs; 2 rows stretched to 4 stay flat.
    ramp = torch.arange(8.0).expand(1, 3, 2, 8)
    out = resize_for_inference(ramp, 4, "square")
    torch.testing.assert_close(out, torch.tensor([0.5, 2.5, 4.5, 6.5]).expand(1, 3, 4, 4))


def test_unknown_resize_mode_names_the_key_and_the_choices() -> None:
    for resize in (8, None):
        with pytest.raises(ValueError, match=r"eval\.resize_mode .*long_side.*square.*'squared'"):
            predict_seg_logits(ShapeAndSideModel(), two_images(), resize=resize, resize_mode="squared")


class RecordingModel(ImageNetNormalised):
    """Records every input size; answers as MSFC does for CAMs, tokens and segmentation (zeros at patch 16)."""

    patch_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []
        self.memory = SimpleNamespace(similarity=lambda tokens, labels: tokens[:, : labels.shape[1]])

    def forward(self, x: torch.Tensor, with_seg: bool = False) -> SimpleNamespace:
        self.sizes.append(tuple(x.shape[-2:]))
        grid = torch.zeros(x.shape[0], 2, x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return SimpleNamespace(cam=grid, cam_aux=grid, tokens=grid, seg_logits=grid)


def test_a_half_patch_tie_rounds_up_in_every_path() -> None:
    # 72 px = 4.5 patches of 16 -> 5 patches = 80 px; 40 px = 2.5 patches -> 48 px (half-up, core.cam.round_to_patch).
    # Python's round() rounds ties to even (64 and 32): segmentation inference used it before the one rounding.
    from core.cam import multiscale_cam, round_to_patch
    from tools.make_cam import memory_similarity

    assert (round_to_patch(72, 16), round_to_patch(40, 16)) == (80, 48)
    images = torch.zeros(1, 3, 72, 40, dtype=torch.uint8)
    paths = {
        "multiscale_cam": lambda model: multiscale_cam(model, images.float(), (1.0,), 2),
        "make_cam.memory_similarity": lambda model: memory_similarity(model, images.float(), torch.ones(1, 1)),
        "predict_seg_logits": lambda model: predict_seg_logits(model, images, (1.0,), False),
    }
    for name, run in paths.items():
        model = RecordingModel()
        run(model)
        assert model.sizes == [(80, 48)], name
