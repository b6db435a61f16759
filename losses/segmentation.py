"""Segmentation loss on the online pseudo labels (SPEC §4, L_seg)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import debug_enabled
from utils.text import preview


class BalancedCrossEntropy(nn.Module):
    """Background/foreground-balanced cross-entropy (SPEC §4, L_seg).

    `L = ½ · mean CE over background-labelled pixels + ½ · mean CE over foreground-labelled pixels`; pixels labelled
    `ignore_index` take no part. An empty group contributes 0 (so with everything ignored the loss is a zero that is
    still connected to `logits`). The caller upsamples the logits to the label resolution first.

    forward(logits [B, C, H, W], target [B, H, W] in {0..C-1, ignore_index}) -> scalar
    """

    def __init__(self, ignore_index: int = 255) -> None:
        """Create the loss.

        Args:
            ignore_index: label value of pixels that are left out.
        """
        super().__init__()
        self.ignore_index = int(ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: `[B, C, H, W]` segmentation logits at the target's resolution.
            target: `[B, H, W]` integer labels, 0 = background, 1..C-1 = classes, `ignore_index` = ignore.

        Returns:
            0-dim float32 tensor.

        Raises:
            ValueError: shapes that do not fit; with ``MSFC_DEBUG=1`` also target values out of range (checked only
                then: the check is a host read of the target).
        """
        if logits.dim() != 4 or target.dim() != 3:
            raise ValueError(
                f"BalancedCrossEntropy: logits must be [B, C, H, W] and target [B, H, W], got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"BalancedCrossEntropy: logits {tuple(logits.shape)} and target {tuple(target.shape)} must share B, H "
                "and W (upsample the logits to the label resolution first)"
            )
        target = target.long()
        num_classes = logits.shape[1]
        ignored = target == self.ignore_index
        # An out-of-range label would be a device-side assert on CUDA. The check reads the target on the host (a device
        # sync), so it runs with MSFC_DEBUG=1 only; the step's online labels are in range by construction.
        if debug_enabled():
            self._check_values(target, ignored, num_classes)
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")  # [B, H, W]
        background = target == 0
        foreground = ~background & ~ignored
        return 0.5 * self._group_mean(ce, background) + 0.5 * self._group_mean(ce, foreground)

    def _check_values(self, target: torch.Tensor, ignored: torch.Tensor, num_classes: int) -> None:
        bad = ((target < 0) | (target >= num_classes)) & ~ignored
        if bool(bad.any()):
            raise ValueError(
                f"BalancedCrossEntropy: target values must lie in 0..{num_classes - 1} or be {self.ignore_index}, "
                f"got {preview(torch.unique(target[bad]).tolist(), 10)}"
            )

    @staticmethod
    def _group_mean(ce: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Mean of `ce` over `group`; an empty group gives a zero connected to `ce` (its gradient is exactly 0)."""
        return torch.where(group, ce, torch.zeros_like(ce)).sum() / group.sum().clamp(min=1)
