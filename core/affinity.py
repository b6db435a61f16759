"""Inter-pixel relations of IRN (SPEC §9, Ahn et al., CVPR 2019): the pixel pairs within a radius, their labels from a
relation map, and their affinity from a boundary map. Shared by the boundary network's loss (``engine/boundary.py``)
and the random walk (``core/random_walk.py``).

Pairs are stored by offset. :func:`pair_index` lists the offsets ``d = (dy, dx)`` with ``0 < |d| < radius`` in one
half-plane (``dy > 0``, or ``dy = 0`` and ``dx > 0``), so each unordered pair of pixels appears once; the other
half is the same pairs seen from their other end. Per-pair tensors are ``[B, P, H, W]``: entry ``[b, p, y, x]`` is the
pair from pixel ``(y, x)`` to ``(y + dy_p, x + dx_p)``, and a pair whose end falls outside the map is not *valid*.

The affinity of a pair is ``a = 1 − max B`` over the pixels of the straight segment between its two ends (both
included; :attr:`PairIndex.paths`), so a boundary anywhere between two pixels separates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairIndex:
    """The pair offsets within a radius and the pixels on each pair's path.

    Attributes:
        radius: pairs have ``0 < dy² + dx² < radius²``.
        offsets: int64 ``[P, 2]`` ``(dy, dx)``, half-plane (``dy > 0`` or ``dy == 0 < dx``), sorted.
        paths: ``P`` int64 arrays ``[L_p, 2]``: the offsets from a pair's start of the pixels on its segment, from
            ``(0, 0)`` to the pair's offset, both included, each step to an 8-neighbour.
    """

    radius: int
    offsets: np.ndarray
    paths: tuple[np.ndarray, ...]

    @property
    def margin(self) -> int:
        """The largest ``|dy|`` or ``|dx|`` of an offset (``radius − 1``)."""
        return int(np.abs(self.offsets).max()) if len(self.offsets) else 0

    def __len__(self) -> int:
        return len(self.offsets)


def segment(dy: int, dx: int) -> np.ndarray:
    """The pixels of the segment from ``(0, 0)`` to ``(dy, dx)``: int64 ``[max(|dy|, |dx|) + 1, 2]``, both ends
    included, one step of at most one pixel per axis at a time (rounding half up)."""
    steps = max(abs(dy), abs(dx))
    t = np.arange(steps + 1) / max(steps, 1)
    return np.stack([np.floor(t * dy + 0.5), np.floor(t * dx + 0.5)], axis=1).astype(np.int64)


@lru_cache(maxsize=16)
def pair_index(radius: int) -> PairIndex:
    """The :class:`PairIndex` of ``radius`` (at least 2: radius 1 has no pair)."""
    if int(radius) != radius or radius < 2:
        raise ValueError(f"pair_index: radius must be an integer >= 2, got {radius!r}")
    r = int(radius)
    offsets = [(dy, dx) for dy in range(r) for dx in range(-r + 1, r)
               if (dy > 0 or dx > 0) and dy * dy + dx * dx < r * r]  # fmt: skip
    return PairIndex(r, np.array(offsets, dtype=np.int64), tuple(segment(dy, dx) for dy, dx in offsets))


def _shifted(padded: Tensor, dy: int, dx: int, margin: int, size: tuple[int, int]) -> Tensor:
    """``padded`` (padded by ``margin`` left / right / bottom) shifted so that ``[.., y, x]`` reads ``(y+dy, x+dx)``."""
    height, width = size
    return padded[..., dy : dy + height, margin + dx : margin + dx + width]


def valid_pairs(index: PairIndex, size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """bool ``[P, H, W]``: whether each pair's end lies inside an ``H × W`` map."""
    height, width = size
    ys = torch.arange(height, device=device)[:, None]
    xs = torch.arange(width, device=device)[None, :]
    masks = [(ys + int(dy) < height) & (xs + int(dx) >= 0) & (xs + int(dx) < width) for dy, dx in index.offsets]
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.bool, device=device)
    return torch.stack(masks)


def path_max_affinity(boundary: Tensor, index: PairIndex) -> tuple[Tensor, Tensor]:
    """The affinity ``a = 1 − max B`` on each pair's path.

    Args:
        boundary: ``[B, H, W]`` boundary probabilities in [0, 1] (differentiable).
        index: the pairs (:func:`pair_index`).

    Returns:
        ``(affinity [B, P, H, W], valid bool [P, H, W])``; the affinity is 0 where the pair is not valid.
    """
    if boundary.dim() != 3:
        raise ValueError(f"path_max_affinity: boundary must be [B, H, W], got shape {tuple(boundary.shape)}")
    size = (boundary.shape[-2], boundary.shape[-1])
    m = index.margin
    # outside the map counts as boundary: a pair leaving it is invalid anyway, and its affinity is masked to 0
    padded = F.pad(boundary, (m, m, 0, m), value=1.0)
    valid = valid_pairs(index, size, boundary.device)
    out = []
    for path in index.paths:
        peak = torch.stack([_shifted(padded, int(y), int(x), m, size) for y, x in path]).amax(dim=0)
        out.append(1.0 - peak)
    affinity = torch.stack(out, dim=1) if out else boundary.new_zeros((boundary.shape[0], 0, *size))
    return affinity * valid, valid


def pair_labels(label: Tensor, index: PairIndex, ignore_index: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """The relation of every valid pair of a label map whose two ends are both labelled.

    Args:
        label: int ``[B, H, W]``: 0 background, class ids, ``ignore_index`` unknown.
        index: the pairs (:func:`pair_index`).
        ignore_index: the unknown label; a pair with an unknown end has no relation.

    Returns:
        ``(bg_pos, fg_pos, neg)``, bool ``[B, P, H, W]`` each: both ends background; both ends the same class; the
        ends differ (background vs a class, or two classes). The three are disjoint.
    """
    if label.dim() != 3:
        raise ValueError(f"pair_labels: label must be [B, H, W], got shape {tuple(label.shape)}")
    size = (label.shape[-2], label.shape[-1])
    m = index.margin
    label = label.long()
    padded = F.pad(label, (m, m, 0, m), value=int(ignore_index))
    start_known = label != ignore_index
    bg, fg, neg = [], [], []
    for dy, dx in index.offsets:
        end = _shifted(padded, int(dy), int(dx), m, size)
        known = start_known & (end != ignore_index)
        same = known & (end == label)
        bg.append(same & (label == 0))
        fg.append(same & (label != 0))
        neg.append(known & (end != label))
    if not bg:
        empty = torch.zeros((label.shape[0], 0, *size), dtype=torch.bool, device=label.device)
        return empty, empty.clone(), empty.clone()
    return torch.stack(bg, dim=1), torch.stack(fg, dim=1), torch.stack(neg, dim=1)
