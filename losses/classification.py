"""Image-level classification loss (SPEC §4: L_cls and L_cls_aux)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiLabelSoftMargin(nn.Module):
    """Multi-label soft-margin loss on image logits (SPEC §4, L_cls / L_cls_aux).

    forward(logits [B, C_fg], labels [B, C_fg] multi-hot) -> scalar: the mean over images of the mean over classes of
    the per-class binary logistic loss.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: `[B, C_fg]` image logits (any float dtype; computed in float32).
            labels: `[B, C_fg]` multi-hot targets in {0, 1}.

        Returns:
            0-dim float32 tensor.
        """
        if logits.dim() != 2 or logits.shape != labels.shape:
            raise ValueError(
                f"MultiLabelSoftMargin: logits and labels must both be [B, C_fg], got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        # float32 even under autocast: the log-sigmoid of large bf16 logits loses most of its precision.
        return F.multilabel_soft_margin_loss(logits.float(), labels.float())
