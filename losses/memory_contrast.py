"""Memory prototype matching (MP2M, SPEC §4.5): token contrast driven by the class-prototype memory bank."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from core.labels import pair_labels, token_labels
from losses.token_contrast import PatchTokenContrast

# Histogram of the profile cosines (SPEC §4.5): 10 bins on [0, 1].
NUM_BINS = 10
# Keeps the cosine of an all-zero profile at 0 instead of 0/0.
COS_EPS = 1e-8


class MemoryContrast(nn.Module):
    """MP2M loss (SPEC §4.5): the PTC loss (§4.2) on the final tokens with pair labels from the bank similarity.

    Token labels come from the similarity map S exactly as §2.3 (`core.labels.token_labels` with the high / low
    thresholds), pairs from `core.labels.pair_labels`; an image whose S is zero everywhere (none of its classes is in
    the bank yet) contributes no pair. S carries no gradient; the tokens do. The caller multiplies
    the result by `adaptive_memory_weight(...)` and only computes it once some bank class is initialised.

    forward(tokens [B, D, h, w], similarity [B, C_fg, h, w], img_box [B, 4], image_size (H, W)) -> scalar
    """

    def __init__(self, high: float = 0.70, low: float = 0.25, ignore_index: int = 255) -> None:
        """Create the loss.

        Args:
            high: S above this → the class's token label.
            low: S at or below this → background; in between → ignore.
            ignore_index: label value of ignored tokens.
        """
        super().__init__()
        if not 0 <= low <= high:
            raise ValueError(f"MemoryContrast: need 0 <= low <= high, got low={low}, high={high}")
        self.high = float(high)
        self.low = float(low)
        self.ignore_index = int(ignore_index)
        self.contrast = PatchTokenContrast()

    def extra_repr(self) -> str:
        return f"high={self.high}, low={self.low}, ignore_index={self.ignore_index}"

    def forward(
        self,
        tokens: torch.Tensor,
        similarity: torch.Tensor,
        img_box: torch.Tensor,
        image_size: Sequence[int],
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            tokens: `[B, D, h, w]` final patch tokens, with gradient.
            similarity: `[B, C_fg, h, w]` S from `MemoryBank.similarity` (ReLU'd, max-normalised, zero for absent
                or uninitialised classes).
            img_box: `[B, 4]` int64 `(y0, y1, x0, x1)` in crop pixels.
            image_size: `(H, W)` of the crop the box refers to.

        Returns:
            0-dim float32 tensor.
        """
        if tokens.dim() != 4 or similarity.dim() != 4:
            raise ValueError(
                f"MemoryContrast: tokens must be [B, D, h, w] and similarity [B, C_fg, h, w], got "
                f"{tuple(tokens.shape)} and {tuple(similarity.shape)}"
            )
        if tokens.shape[0] != similarity.shape[0] or tokens.shape[2:] != similarity.shape[2:]:
            raise ValueError(
                f"MemoryContrast: similarity {tuple(similarity.shape)} must share B, h and w with tokens "
                f"{tuple(tokens.shape)}"
            )
        with torch.no_grad():
            # An image none of whose present classes is in the bank has S = 0 everywhere, which §2.3 would read as
            # "all background" and pull all its tokens together; an empty box makes all its tokens ignored instead.
            matched = similarity.detach().flatten(1).amax(dim=1) > 0
            img_box = torch.where(matched[:, None], img_box, torch.zeros_like(img_box))
            labels = token_labels(
                similarity.detach().float(),
                img_box,
                (int(image_size[0]), int(image_size[1])),
                self.high,
                self.low,
                ignore_index=self.ignore_index,
            )
            pairs = pair_labels(labels, ignore_index=self.ignore_index)
        return self.contrast(tokens, pairs)


@torch.no_grad()
def adaptive_memory_weight(similarity: torch.Tensor, cam_aux: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Adaptive weight of L_mem (SPEC §4.5), a constant in [e^−1, 1].

    For each map, the row means and column means give a `C_fg × (h + w)` profile per image. At each of the h + w
    positions the cosine across classes compares S with CAM_aux and S with CAM (an all-zero profile has cosine 0;
    negative cosines, possible only with raw CAMs, count in the first bin). The cosines of **all images of the batch**
    are pooled into two 10-bin histograms on [0, 1], each normalised to sum 1 — one weight per batch, so that a
    single image with few foreground rows does not dominate — and `w = exp(−Σ_k √(h1_k · h2_k))`.
    Identical histograms give w = e^−1, disjoint ones w = 1.

    Args:
        similarity: `[B, C_fg, h, w]` S at token resolution.
        cam_aux: `[B, C_fg, h, w]` auxiliary CAM at token resolution.
        cam: `[B, C_fg, h, w]` CAM at token resolution.

    Returns:
        0-dim float32 tensor without gradient.
    """
    if similarity.dim() != 4 or cam_aux.shape != similarity.shape or cam.shape != similarity.shape:
        raise ValueError(
            "adaptive_memory_weight: similarity, cam_aux and cam must all be [B, C_fg, h, w] of the same shape, got "
            f"{tuple(similarity.shape)}, {tuple(cam_aux.shape)} and {tuple(cam.shape)}"
        )
    profile_s = _profiles(similarity)
    hist_aux = _histogram(_profile_cosine(profile_s, _profiles(cam_aux)))
    hist_cam = _histogram(_profile_cosine(profile_s, _profiles(cam)))
    overlap = (hist_aux * hist_cam).sqrt().sum()  # Bhattacharyya coefficient in [0, 1]
    return torch.exp(-overlap).clamp(min=math.exp(-1.0), max=1.0)


def _profiles(maps: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` → `[B, C, h + w]`: row means then column means."""
    maps = maps.detach().float()
    return torch.cat([maps.mean(dim=3), maps.mean(dim=2)], dim=2)


def _profile_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine across the class dimension at each position: `[B, C, P]` × 2 → `[B, P]`."""
    dot = (a * b).sum(dim=1)
    return dot / (a.norm(dim=1) * b.norm(dim=1) + COS_EPS)


def _histogram(values: torch.Tensor) -> torch.Tensor:
    """10-bin histogram on [0, 1] of all values, normalised to sum 1: `[...]` → `[10]`.

    Bin k holds [k/10, (k+1)/10), the last bin also 1.0 (as `torch.histc`); built from a one-hot sum because
    `histc` has no deterministic CUDA implementation.
    """
    index = (values.flatten().clamp(0.0, 1.0) * NUM_BINS).floor().long().clamp(max=NUM_BINS - 1)
    counts = torch.nn.functional.one_hot(index, NUM_BINS).sum(dim=0).float()
    return counts / counts.sum().clamp(min=1.0)
