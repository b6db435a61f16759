"""IRN's inter-pixel affinity loss (SPEC §9): pull the affinity of positive pairs to 1, of negative pairs to 0."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Inside the logs, as in IRN: keeps a pair at affinity exactly 0 (or 1) finite and differentiable.
LOG_EPS = 1e-5


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds; 0 (with a gradient path) when it holds nowhere."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class AffinityLoss(nn.Module):
    """``L = ½ · (½ · (mean_bg-pos −log a + mean_fg-pos −log a) + mean_neg −log(1 − a))``.

    Each mean runs over its own pairs, so the (rare) foreground pairs weigh as much as the background ones; a kind of
    pair absent from the batch contributes 0. Computed in fp32.
    """

    def forward(
        self, affinity: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Args:
            affinity: ``[B, P, H, W]`` pair affinities in [0, 1] (``core.affinity.path_max_affinity``).
            bg_pos / fg_pos / neg: bool ``[B, P, H, W]`` pair relations (``core.affinity.pair_labels``).

        Returns:
            ``(loss, {"bg_pos": ..., "fg_pos": ..., "neg": ...})``, the three means (scalars) before weighting.
        """
        if not (affinity.shape == bg_pos.shape == fg_pos.shape == neg.shape):
            shapes = [tuple(t.shape) for t in (affinity, bg_pos, fg_pos, neg)]
            raise ValueError(f"AffinityLoss: affinity and the three pair masks must share one shape, got {shapes}")
        a = affinity.float()
        pull = -torch.log(a + LOG_EPS)
        parts = {
            "bg_pos": _masked_mean(pull, bg_pos),
            "fg_pos": _masked_mean(pull, fg_pos),
            "neg": _masked_mean(-torch.log(1.0 + LOG_EPS - a), neg),
        }
        loss = 0.5 * (0.5 * (parts["bg_pos"] + parts["fg_pos"]) + parts["neg"])
        return loss, parts
