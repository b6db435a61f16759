"""MP2M class-prototype memory bank (SPEC §4.5, bank part): accumulate, all-reduced update, similarity maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.dist import all_reduce_sum
from utils.errors import debug_enabled


class MemoryBank(nn.Module):
    """Per-class prototype memory `[C_fg, D]`, identical on every rank, kept in buffers (saved in checkpoints).

    Buffers:
        bank: `[C_fg, D]` float32 prototypes.
        initialized: `[C_fg]` bool, True once a class received its first update.
        acc_sum: `[C_fg, D]` float64 sum of image prototypes since the last `update`.
        acc_count: `[C_fg]` float64 number of image prototypes since the last `update`.

    The accumulators are float64 so that summing up to `update_every` × batch image prototypes (and the
    all-reduce over ranks) loses no precision and the counts stay exact integers.

    Args:
        num_classes: foreground classes C_fg (bank row c-1 holds class c).
        dim: token dimension D.
        momentum: α in `m_c <- α·m_c + (1-α)·mean` (SPEC §4.5: 0.1).
        min_count: a class is updated only with at least this many image prototypes (SPEC §4.5: 4).
        ignore_index: the label of ignored tokens in `proto_labels` (`data.ignore_index`).
    """

    bank: torch.Tensor
    initialized: torch.Tensor
    acc_sum: torch.Tensor
    acc_count: torch.Tensor

    def __init__(
        self, num_classes: int, dim: int, momentum: float = 0.1, min_count: int = 4, ignore_index: int = 255
    ) -> None:
        super().__init__()
        if num_classes <= 0 or dim <= 0:
            raise ValueError(f"MemoryBank: num_classes and dim must be positive, got {num_classes}, {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MemoryBank: momentum (memory.momentum) must be in [0, 1], got {momentum}")
        if min_count < 1:
            raise ValueError(f"MemoryBank: min_count (memory.min_count) must be >= 1, got {min_count}")
        self.num_classes = num_classes
        self.dim = dim
        self.momentum = float(momentum)
        self.min_count = int(min_count)
        self.ignore_index = int(ignore_index)
        self.register_buffer("bank", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("acc_sum", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("acc_count", torch.zeros(num_classes, dtype=torch.float64))
        # (initialized tensor, its version, any()) of the last any_initialized() read; see there.
        self._initialized_cache: tuple[torch.Tensor, int, bool] | None = None

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, min_count={self.min_count}"

    def any_initialized(self) -> bool:
        """True once at least one class has a prototype (L_mem starts then, SPEC §4.5).

        The answer is a host read of ``initialized`` (a device sync on CUDA), made only when that buffer changed since
        the last read: it is cached with the buffer's identity and version counter, which every in-place change
        (``load_state_dict``, ``fill_``, ...) and every replacement (``module.to``) invalidates. ``update`` only ever
        adds classes, so it keeps a True answer valid. A training step therefore reads it at its first step and after
        each bank update until the first class is ready, and never afterwards.
        """
        known = self._known_initialized()
        if known is not None:
            return known
        flags = self.initialized
        answer = bool(flags.any())
        if not flags.is_inference():  # an inference tensor has no version counter to cache against
            self._initialized_cache = (flags, flags._version, answer)
        return answer

    def _known_initialized(self) -> bool | None:
        """The cached answer of :meth:`any_initialized` while ``initialized`` is unchanged since, else None."""
        flags, cached = self.initialized, self._initialized_cache
        if cached is None or cached[0] is not flags or flags.is_inference() or cached[1] != flags._version:
            return None
        return cached[2]

    @torch.no_grad()
    def accumulate(self, tokens: torch.Tensor, proto_labels: torch.Tensor) -> None:
        """Add each image's class prototypes to the accumulators (SPEC §4.5).

        Args:
            tokens: `[B, D, h, w]` final tokens (detached here in any case).
            proto_labels: `[B, h, w]` integer labels: 0 background, 1..C_fg class, `ignore_index` ignore.
        """
        b, _, h, w = self._check_tokens(tokens, "accumulate")
        if proto_labels.shape != (b, h, w):
            raise ValueError(
                f"MemoryBank.accumulate: proto_labels must be [{b}, {h}, {w}], got {tuple(proto_labels.shape)}"
            )
        labels = proto_labels.long()
        # A host read of the labels (a device sync), so checked with MSFC_DEBUG=1 only: the step's prototype labels
        # are in range by construction, and an out-of-range label matches no class (it is left out).
        if debug_enabled():
            bad = (labels != self.ignore_index) & ((labels < 0) | (labels > self.num_classes))
            if bool(bad.any()):
                raise ValueError(
                    f"MemoryBank.accumulate: proto_labels must be 0..{self.num_classes} or {self.ignore_index}, "
                    f"got {labels[bad].unique().tolist()}"
                )
        # One-hot over foreground classes [B, C_fg, N]; background and ignore rows fall outside 1..C_fg.
        classes = torch.arange(1, self.num_classes + 1, device=labels.device)
        mask = (labels.flatten(1)[:, None, :] == classes[None, :, None]).float()
        feats = tokens.detach().float().flatten(2)  # [B, D, N]
        sums = torch.einsum("bcn,bdn->bcd", mask, feats)
        counts = mask.sum(-1)  # [B, C_fg] tokens per class per image
        present = counts > 0
        protos = sums / counts.clamp(min=1.0)[..., None]  # masked mean per image and class
        self.acc_sum += (protos * present[..., None]).sum(0).double()
        self.acc_count += present.sum(0).double()  # count = number of image prototypes, SPEC §4.5 "count >= 4"

    @torch.no_grad()
    def update(self, return_ids: bool = True) -> list[int] | None:
        """All-reduce the accumulators over ranks and move the ready classes (SPEC §4.5).

        Every rank must call this at the same iteration. A class with at least `min_count` image prototypes is set
        to their mean the first time, and to `α·bank + (1-α)·mean` afterwards; all accumulators are then reset.

        Args:
            return_ids: also return the updated class ids; listing them is a host read (a device sync on CUDA), so
                the training step passes False.

        Returns:
            The updated class ids (1..C_fg, the label convention), ascending; None when `return_ids` is False.
        """
        sums = all_reduce_sum(self.acc_sum.clone())
        counts = all_reduce_sum(self.acc_count.clone())
        ready = counts >= self.min_count
        mean = sums / counts.clamp(min=1.0)[:, None]
        blended = self.momentum * self.bank.double() + (1.0 - self.momentum) * mean
        new = torch.where(self.initialized[:, None], blended, mean)
        self.bank.copy_(torch.where(ready[:, None], new, self.bank.double()).to(self.bank.dtype))
        known = self._known_initialized()
        self.initialized |= ready
        if known:  # classes are only ever added here: still True, without a read
            self._initialized_cache = (self.initialized, self.initialized._version, True)
        self.acc_sum.zero_()
        self.acc_count.zero_()
        if not return_ids:
            return None
        return (ready.nonzero().flatten() + 1).tolist()

    @torch.no_grad()
    def similarity(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Max-normalised cosine between every token and the bank prototypes (SPEC §4.5 matching).

        S is a label source (token labels, a constant adaptive weight), so it carries no gradient at all.

        Args:
            tokens: `[B, D, h, w]` final tokens.
            labels: `[B, C_fg]` multi-hot image labels.

        Returns:
            S `[B, C_fg, h, w]` in [0, 1): ReLU(cos), divided per image and class by its spatial max + 1e-5;
            zero for classes absent from `labels` or not initialised.
        """
        b, _, _, _ = self._check_tokens(tokens, "similarity")
        if labels.shape != (b, self.num_classes):
            raise ValueError(
                f"MemoryBank.similarity: labels must be [{b}, {self.num_classes}], got {tuple(labels.shape)}"
            )
        feats = F.normalize(tokens.detach().float(), dim=1)
        protos = F.normalize(self.bank.float(), dim=1)
        cos = torch.einsum("bdhw,cd->bchw", feats, protos)
        valid = (labels > 0.5) & self.initialized[None, :]
        sim = F.relu(cos) * valid[:, :, None, None]
        return sim / (sim.amax(dim=(2, 3), keepdim=True) + 1e-5)

    def _check_tokens(self, tokens: torch.Tensor, where: str) -> tuple[int, int, int, int]:
        if tokens.dim() != 4 or tokens.shape[1] != self.dim:
            raise ValueError(f"MemoryBank.{where}: tokens must be [B, {self.dim}, h, w], got {tuple(tokens.shape)}")
        b, d, h, w = tokens.shape
        return b, d, h, w


def fuse_similarity(cam: torch.Tensor, similarity: torch.Tensor, lam: float) -> torch.Tensor:
    """Optional inference fusion `CAM' = CAM + λ·S` (SPEC §4.5, ablation key `memory.fuse_lambda`).

    Args:
        cam: `[B, C_fg, H, W]` CAM at any resolution.
        similarity: `[B, C_fg, h, w]` from `MemoryBank.similarity`; bilinearly resized to (H, W) when it differs.
        lam: λ; 0 returns `cam` unchanged.

    Returns:
        `[B, C_fg, H, W]`.
    """
    if lam == 0:
        return cam
    if cam.shape[:2] != similarity.shape[:2]:
        raise ValueError(
            f"fuse_similarity: cam {tuple(cam.shape)} and similarity {tuple(similarity.shape)} differ in [B, C]"
        )
    if similarity.shape[-2:] != cam.shape[-2:]:
        similarity = F.interpolate(similarity, size=cam.shape[-2:], mode="bilinear", align_corners=False)
    return cam + lam * similarity.to(cam.dtype)
