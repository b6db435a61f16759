"""Photometric views built on the device from crop tensors (SPEC §3): G1, G2 and the local source L.

Random parameters are drawn per image from a CPU ``torch.Generator`` (cheap scalars, checkpointable, identical on CPU
and CUDA); the image operations are torchvision's and run wherever the images are. The colour-jitter operations are
applied in a fixed order (brightness, contrast, saturation, hue) rather than torchvision's random order, so that one
generator draw sequence fully determines a view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _coin(generator: torch.Generator, p: float) -> bool:
    # Always draw, even for p in {0, 1}, so the random stream does not depend on the probabilities.
    return torch.rand((), generator=generator).item() < p


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
        return torch.stack(views), torch.tensor(flips, dtype=torch.bool, device=images01.device)


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
