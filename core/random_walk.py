"""IRN's random walk (SPEC §9): spread CAM scores inside the regions a boundary map encloses.

On the stride-4 grid of ``n = h·w`` pixels, the affinity of two pixels within ``radius`` is ``a_ij = 1 − max B`` on
the segment between them (``core.affinity``), every pixel has a self loop (``a_ii = 1``) and ``A`` is symmetric. The
transition matrix ``T = A^∘β D⁻¹`` (``D`` = the column sums) is column-stochastic: a distribution ``p`` walked as
``T p`` keeps its mass. The refinement walks the scores the other way, ``r ← r T`` for a row vector ``r`` (IRN's
propagation): each pixel's new score is the affinity-weighted mean of its neighbours' scores, so constants stay
constant and a pixel sealed off by a boundary (affinity 0 to the other side) never receives score from across it.
``2^t`` steps are taken.

Two equal ways to compute ``r T^(2^t)``:

- ``sparse`` (default): ``T`` as a sparse matrix (``n · (2P + 1)`` entries for ``P`` half-plane offsets, ~16 MB for a
  VOC image at radius 5) applied ``2^t`` times to the ``K`` score vectors: memory ``O(n · P)``, never ``n²``;
- ``dense``: ``t`` squarings of the dense ``n × n`` matrix (IRN's way, fast on a GPU that holds ``3 n²`` floats);
  refused, naming ``rw.mode``, when the device does not have that memory.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from core.affinity import pair_index, path_max_affinity
from utils.errors import InputError

# The boundary network's output stride: the walk's grid is the image's at 1/4.
STRIDE = 4
# dense mode holds T, its square and the product being formed
_DENSE_COPIES = 3
_FLOAT_BYTES = 4


def _pairs(boundary: Tensor, radius: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, values)`` of ``A^∘β``: every valid pair both ways and the self loops, on ``h · w`` nodes."""
    if boundary.dim() != 2:
        raise ValueError(f"random walk: boundary must be [h, w], got shape {tuple(boundary.shape)}")
    height, width = boundary.shape
    index = pair_index(int(radius))
    affinity, valid = path_max_affinity(boundary[None].float(), index)
    affinity = affinity[0].pow(float(beta))
    start = torch.arange(height * width, device=boundary.device).view(height, width)
    offsets = torch.as_tensor(index.offsets, device=boundary.device)
    shift = (offsets[:, 0] * width + offsets[:, 1]).view(-1, 1, 1)
    end = start[None] + shift  # [P, h, w]; meaningful where valid
    i = start[None].expand_as(end)[valid]
    j = end[valid]
    value = affinity[valid]
    loops = torch.arange(height * width, device=boundary.device)
    rows = torch.cat([i, j, loops])
    cols = torch.cat([j, i, loops])
    values = torch.cat([value, value, torch.ones_like(loops, dtype=value.dtype)])
    return rows, cols, values


def transition_dense(boundary: Tensor, radius: int, beta: float) -> Tensor:
    """The column-stochastic ``T = A^∘β D⁻¹``, dense ``[n, n]`` (n = h·w): for small grids and ``mode="dense"``."""
    rows, cols, values = _pairs(boundary, radius, beta)
    n = boundary.numel()
    matrix = torch.zeros((n, n), dtype=values.dtype, device=boundary.device)
    matrix[rows, cols] = values
    return matrix / matrix.sum(dim=0, keepdim=True)


def transition_sparse_t(boundary: Tensor, radius: int, beta: float) -> Tensor:
    """``Tᵀ = D⁻¹ A^∘β`` (row-stochastic), sparse CSR ``[n, n]``: ``(r T)ᵀ = Tᵀ rᵀ`` is one sparse product."""
    rows, cols, values = _pairs(boundary, radius, beta)
    n = boundary.numel()
    degree = torch.zeros(n, dtype=values.dtype, device=boundary.device).index_add_(0, rows, values)
    # A is symmetric, so its column sums are its row sums: Tᵀ_ij = A_ij / D_i
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values / degree[rows], (n, n),
                                     check_invariants=False).coalesce()  # fmt: skip
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one operation used here is a matmul
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # not a POSIX system: do not guess
        return 0


def walk(scores: Tensor, boundary: Tensor, *, radius: int, beta: float, exp_times: int, mode: str = "sparse") -> Tensor:
    """``r T^(2^exp_times)`` for each score map ``r`` (module docstring).

    Args:
        scores: ``[K, h, w]`` score maps on the boundary's grid.
        boundary: ``[h, w]`` boundary probabilities in [0, 1].
        radius: affinities between pixels with ``0 < |d| < radius``.
        beta: the affinity exponent.
        exp_times: ``t``; the walk takes ``2^t`` steps.
        mode: ``sparse`` | ``dense`` (module docstring).

    Returns:
        float32 ``[K, h, w]``.
    """
    if scores.dim() != 3 or tuple(scores.shape[-2:]) != tuple(boundary.shape):
        raise ValueError(f"random walk: scores must be [K, h, w] with (h, w) = the boundary's "
                         f"{tuple(boundary.shape)}, got {tuple(scores.shape)}")  # fmt: skip
    num, (height, width) = scores.shape[0], boundary.shape
    n = height * width
    flat = scores.reshape(num, n).float()
    if num == 0:
        return flat.reshape(scores.shape)
    if mode == "dense":
        needed = _DENSE_COPIES * n * n * _FLOAT_BYTES
        available = _available_bytes(boundary.device)
        if needed > available:
            raise InputError(
                f"rw.mode=dense needs {needed / 2**30:.1f} GiB for this {height}x{width} grid ({n} nodes) on "
                f"{boundary.device}, {available / 2**30:.1f} GiB are available: use rw.mode=sparse (same result)"
            )
        matrix = transition_dense(boundary, radius, beta)
        for _ in range(int(exp_times)):
            matrix = matrix @ matrix
        return (flat @ matrix).reshape(num, height, width)
    if mode != "sparse":
        raise ValueError(f"random walk: mode (rw.mode) must be sparse or dense, got {mode!r}")
    matrix = transition_sparse_t(boundary, radius, beta)
    columns = flat.t().contiguous()  # [n, K]
    for _ in range(2 ** int(exp_times)):
        columns = matrix @ columns
    return columns.t().reshape(num, height, width)


def grid_size(image_hw: tuple[int, int]) -> tuple[int, int]:
    """The stride-4 grid of an image: ``ceil(H / 4) × ceil(W / 4)``."""
    return -(-int(image_hw[0]) // STRIDE), -(-int(image_hw[1]) // STRIDE)


def to_grid(cam: Tensor, grid: tuple[int, int]) -> Tensor:
    """Full-resolution maps ``[K, H, W]`` -> their 4×4 block means on the ``grid`` ``[K, h, w]`` (edge-padded to
    4h × 4w): the cells that :func:`propagate`'s ×4 upsampling maps back onto."""
    height, width = grid
    pad_h, pad_w = STRIDE * height - cam.shape[-2], STRIDE * width - cam.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"to_grid: maps {tuple(cam.shape[-2:])} are larger than 4x the grid {grid}")
    padded = F.pad(cam[None].float(), (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else cam[None].float()
    return F.avg_pool2d(padded, STRIDE)[0]


def propagate(
    cam: Tensor, boundary: Tensor, *, radius: int = 5, beta: float = 10.0, exp_times: int = 8, mode: str = "sparse"
) -> Tensor:
    """Walked CAM scores at full resolution (SPEC §9): ``r_c = vec(CAM_c ⊙ (1 − B)) · T^(2^t)``, upsampled ×4,
    divided by their global max. The hard label is then a background plane (``rw.bkg_thre``) + these → argmax.

    Args:
        cam: ``[K, H, W]`` CAMs of the present classes (full resolution).
        boundary: ``[h, w]`` boundary probabilities on the image's stride-4 grid (:func:`grid_size`).
        radius / beta / exp_times / mode: as :func:`walk` (``rw.*``).

    Returns:
        float32 ``[K, H, W]`` in [0, 1] (all zeros when the walk leaves nothing, or K = 0).
    """
    if cam.dim() != 3:
        raise ValueError(f"propagate: cam must be [K, H, W], got shape {tuple(cam.shape)}")
    image_hw = (cam.shape[-2], cam.shape[-1])
    if tuple(boundary.shape) != grid_size(image_hw):
        raise ValueError(f"propagate: the boundary of a {image_hw[0]}x{image_hw[1]} image must be "
                         f"{grid_size(image_hw)} (stride 4), got {tuple(boundary.shape)}")  # fmt: skip
    if cam.shape[0] == 0:  # no class present: nothing to walk
        return torch.zeros((0, *image_hw), device=boundary.device)
    boundary = boundary.float()
    scores = to_grid(cam.to(boundary.device), tuple(boundary.shape)) * (1.0 - boundary)
    walked = walk(scores, boundary, radius=radius, beta=beta, exp_times=exp_times, mode=mode)
    up = F.interpolate(walked[None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[0]
    up = up[:, : image_hw[0], : image_hw[1]]
    peak = up.max()
    return up / peak if peak > 0 else torch.zeros_like(up)
