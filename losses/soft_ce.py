"""Cross-entropy of the second stage (SPEC §10): against hard pseudo labels, or against compact soft ones.

Both are means over the labelled pixels of the batch, computed in float32 at least (bf16 / fp16 logits are cast up)
from logits at the label resolution:

- hard: ``-log p_y`` at every pixel whose label y is not ``ignore_index`` (``F.cross_entropy`` with the ignore index);
- soft: ``-Σ_m q_m log p_{c_m}``, where an image's target is stored compactly (``core/pseudo_labels.py``): M class ids
  ``classes [B, M]`` and their probabilities ``prob [B, M, H, W]``. ``q`` is ``prob`` divided by its per-pixel sum (the
  stored values sum to 1 up to quantisation); pixels whose sum is 0 (padding, or no mass at all) are not counted. A
  slot that repeats a class id adds its mass to that class, so padding slots (any id, probability 0) change nothing.
  On one-hot targets this is the hard loss exactly; its gradient with respect to the logits is
  ``(softmax(logits) - q) / N`` at each counted pixel (N = their number).

A batch without a labelled pixel gives 0, still connected to the graph, with no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A pixel counts when its stored mass exceeds this (uint8 soft labels store multiples of 1/255).
MIN_MASS = 1e-6


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mean_over(per_pixel: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_pixel`` over ``counted`` pixels; 0 (with a graph) when none is counted, without a host read."""
    return (per_pixel * counted).sum() / counted.sum().clamp_min(1)


class HardCrossEntropy(nn.Module):
    """Cross-entropy against hard labels ``[B, H, W]`` (class ids, ``ignore_index`` skipped)."""

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[B, C, H, W]``, ``target`` int ``[B, H, W]`` -> 0-dim mean over labelled pixels."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"HardCrossEntropy: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        target = target.long()
        per_pixel = F.cross_entropy(_at_least_fp32(logits), target, ignore_index=self.ignore_index, reduction="none")
        return _mean_over(per_pixel, target != self.ignore_index)


class SoftCrossEntropy(nn.Module):
    """Cross-entropy against compact soft labels (module docstring)."""

    def forward(self, logits: torch.Tensor, prob: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[B, C, H, W]``, ``prob`` ``[B, M, H, W]`` (>= 0), ``classes`` int ``[B, M]`` in 0..C-1 ->
        0-dim mean over the pixels with mass."""
        batch, _, height, width = logits.shape
        if prob.shape[0] != batch or prob.shape[2:] != logits.shape[2:] or tuple(classes.shape) != prob.shape[:2]:
            raise ValueError(
                f"SoftCrossEntropy: logits {tuple(logits.shape)}, prob {tuple(prob.shape)} and classes "
                f"{tuple(classes.shape)} must be [B, C, H, W], [B, M, H, W] and [B, M]"
            )
        log_p = F.log_softmax(_at_least_fp32(logits), dim=1)
        index = classes.long()[:, :, None, None].expand(-1, -1, height, width)
        picked = log_p.gather(1, index)  # [B, M, H, W]: log p of each stored class
        prob = prob.to(log_p.dtype)
        mass = prob.sum(dim=1)
        counted = mass > MIN_MASS
        per_pixel = -(prob * picked).sum(dim=1) / mass.clamp_min(MIN_MASS)
        return _mean_over(per_pixel, counted)
