"""Pixel-adaptive refinement (PAR, SPEC §1.3): a parameter-free, colour- and position-aware smoothing of masks.

PAR propagates each mask value from its 48 dilated 8-ring neighbours with weights that are large for neighbours of
similar colour and small distance, so label maps snap to image edges without crossing them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.syncs import to_device

# Temperature of both kernel terms and the weight of the position term, fixed by SPEC §1.3.
_KERNEL_SCALE = 0.3
_POSITION_WEIGHT = 0.01
_EPS = 1e-8

# The 8-ring around a pixel as (dy, dx) unit steps; each dilation scales it.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (uint8, half, bfloat16 under autocast) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the dilated 8-rings, dilation-major: 8 · len(dilations) entries."""
    return [(d * dy, d * dx) for d in dilations for dy, dx in _RING]


def _shifted(padded: Tensor, offset: tuple[int, int], pad: int, size: tuple[int, int]) -> Tensor:
    """View of ``padded`` [B, C, H + 2·pad, W + 2·pad] holding at each pixel the value at pixel + offset, [B, C, H, W].

    Slicing a padded tensor instead of ``unfold`` keeps one copy of the map instead of 48 (SPEC §1.3 at 224×224).
    """
    dy, dx = offset
    height, width = size
    return padded[:, :, pad + dy : pad + dy + height, pad + dx : pad + dx + width]


class PAR(nn.Module):
    """Pixel-adaptive refinement (SPEC §1.3). No parameters, no buffers, no state.

    For every pixel the affinity to each of its K = 8 · len(dilations) neighbours is
    ``softmax_k(image term) + 0.01 · softmax_k(position term)`` with

    - image term ``−mean_RGB (|I_k − I_0| / (σ_I + 1e-8) / 0.3)²``, σ_I the (unbiased) standard deviation of the K
      neighbour values of that pixel, per channel;
    - position term ``−(d_k / σ_d / 0.3)²``, d_k = dilation × (1 axial, √2 diagonal), σ_d the (unbiased) standard
      deviation of all d_k.

    Neighbours beyond the border take the border value (replicate padding). The masks are then refined by
    ``num_iter`` iterations of ``mask ← Σ_k A_k · mask(k)``.

    Design choice: the SPEC's affinity sums to 1.01 per pixel, which would scale the masks by 1.01 per iteration.
    Here A is divided by its per-pixel sum, making PAR a convex averaging operator: a constant map stays constant,
    values stay within the input's range, and no argmax over channels changes because of the normalisation (every
    channel of a pixel is divided by the same positive number at every iteration).

    Args:
        dilations: dilations of the 8-rings (SPEC: 1, 2, 4, 8, 12, 24 → 48 neighbours).
        num_iter: propagation iterations.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10) -> None:
        super().__init__()
        dilations = tuple(int(d) for d in dilations)
        if not dilations or min(dilations) < 1:
            raise ValueError(f"PAR: dilations must be a non-empty list of positive integers, got {dilations}")
        if num_iter < 0:
            raise ValueError(f"PAR: num_iter must be >= 0, got {num_iter}")
        self.dilations = dilations
        self.num_iter = int(num_iter)
        self.offsets = neighbour_offsets(dilations)
        self.pad = max(dilations)

    def extra_repr(self) -> str:
        return f"dilations={self.dilations}, num_iter={self.num_iter}"

    def _position_softmax(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Softmax over k of the position term: [K], identical for every pixel."""
        diagonal = [math.sqrt(2.0) if dy != 0 and dx != 0 else 1.0 for dy, dx in _RING]
        # Built on the host and moved without blocking: torch.tensor(..., device=cuda) would synchronise the stream.
        dist = to_device(torch.tensor([d * f for d in self.dilations for f in diagonal], dtype=dtype), device)
        logits = -((dist / (dist.std() + _EPS) / _KERNEL_SCALE) ** 2)
        return logits.softmax(dim=0)

    def affinity(self, images01: Tensor) -> Tensor:
        """Normalised neighbour affinities.

        Args:
            images01: RGB images in [0, 1], [B, 3, H, W].

        Returns:
            A, [B, K, H, W], non-negative, summing to 1 over K at every pixel; K follows ``self.offsets``. float32,
            or float64 for float64 images.
        """
        if images01.dim() != 4 or images01.shape[1] != 3:
            raise ValueError(f"PAR: images01 must be [B, 3, H, W], got shape {tuple(images01.shape)}")
        images = images01.to(_compute_dtype(images01.dtype))
        height, width = images.shape[-2:]
        padded = F.pad(images, (self.pad,) * 4, mode="replicate")
        # [B, 3, K, H, W]: the std over K needs all neighbours at once; this is the largest tensor PAR builds.
        neighbours = torch.stack([_shifted(padded, o, self.pad, (height, width)) for o in self.offsets], dim=2)
        sigma = neighbours.std(dim=2, keepdim=True)
        image_logits = -((neighbours - images.unsqueeze(2)).abs() / (sigma + _EPS) / _KERNEL_SCALE).pow(2)
        image_term = image_logits.mean(dim=1).softmax(dim=1)  # mean over RGB, then softmax over k
        position_term = self._position_softmax(images.device, images.dtype).view(1, -1, 1, 1)
        aff = image_term + _POSITION_WEIGHT * position_term
        return aff / aff.sum(dim=1, keepdim=True)

    def propagate(self, aff: Tensor, masks: Tensor) -> Tensor:
        """Apply ``num_iter`` iterations of ``mask ← Σ_k A_k · mask(k)``.

        Args:
            aff: affinities from :meth:`affinity`, [B, K, H, W].
            masks: maps to refine, [B, C, H, W].

        Returns:
            Refined maps, [B, C, H, W], in the affinities' dtype.
        """
        if aff.shape[1] != len(self.offsets) or aff.shape[0] != masks.shape[0] or aff.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"PAR: affinities {tuple(aff.shape)} do not match masks {tuple(masks.shape)} "
                f"with {len(self.offsets)} neighbours"
            )
        height, width = masks.shape[-2:]
        mask = masks.to(aff.dtype)
        for _ in range(self.num_iter):
            padded = F.pad(mask, (self.pad,) * 4, mode="replicate")
            out = torch.zeros_like(mask)
            # Accumulating one neighbour at a time never materialises [B, C, K, H, W].
            for k, offset in enumerate(self.offsets):
                out.addcmul_(aff[:, k : k + 1], _shifted(padded, offset, self.pad, (height, width)))
            mask = out
        return mask

    def forward(self, images01: Tensor, masks: Tensor) -> Tensor:
        """Refine ``masks`` along the edges of ``images01``.

        Args:
            images01: de-normalised RGB images in [0, 1], [B, 3, H, W].
            masks: maps to refine (e.g. class probabilities), [B, C, H, W], same B, H, W as the images.

        Returns:
            Refined masks, [B, C, H, W]: computed in float32 (float64 when the images are float64) and returned in
            the masks' floating dtype (float32 for integer masks).
        """
        if masks.dim() != 4:
            raise ValueError(f"PAR: masks must be [B, C, H, W], got shape {tuple(masks.shape)}")
        if images01.dim() != 4 or masks.shape[0] != images01.shape[0] or masks.shape[-2:] != images01.shape[-2:]:
            raise ValueError(
                f"PAR: masks {tuple(masks.shape)} must share batch size and H, W with images01 {tuple(images01.shape)}"
            )
        refined = self.propagate(self.affinity(images01), masks)
        return refined.to(masks.dtype) if masks.is_floating_point() else refined
