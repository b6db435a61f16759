"""Spatial multi-view contrast (SMCM, SPEC §4.4): CAM agreement between spatial views of the main crop."""

from __future__ import annotations

import torch
from torch import nn

# Added to the per-class maximum before dividing (SPEC §2.1 uses the same constant for the main CAM).
NORM_EPS = 1e-5


SMC_REDUCTIONS = ("all_terms", "group_sum", "to_main")


class MultiViewContrast(nn.Module):
    """SMCM loss (SPEC §4.4): each view's CAM must match the multi-scale CAM and the other views.

    The view CAMs (raw, with gradient, already mapped back to the main frame) are ReLU'd and max-normalised per image
    and class; the maximum is taken over the whole map, as for the main CAM (SPEC §2.1). Each term
    `m(X, Y) = mean |X − Y|` is averaged over the present-class pixels inside img_box, pooled over the batch (every
    such pixel of every image weighs the same). The terms are the V view-vs-main terms m(CAM_v, sg(CAM_main)) and the
    V(V−1)/2 view-vs-view terms m(CAM_v, CAM_w), v < w.

    - `reduction="all_terms"` (default, SPEC §4.4, the released code's normalisation): one mean over all
      V + V(V−1)/2 terms (6 for V = 3).
    - `reduction="group_sum"`: `mean_v m(CAM_v, sg(CAM_main)) + mean_{v<w} m(CAM_v, CAM_w)`, the pair group being 0
      for a single view. For V = 3 both groups have 3 terms, so this is exactly twice `all_terms`.

    - `reduction="to_main"` (a diagnosis of issue 11, not published): `mean_v m(CAM_v, sg(CAM_main))` only, without
      the view-vs-view terms, whose two sides both carry gradient and are not anchored to the multi-scale CAM.
    With V = 1 every reduction gives the single view-vs-main term. With no present class inside any box there is
    nothing to compare and the loss is a zero connected to `view_cams`.

    forward(view_cams [V, B, C_fg, h, w], main_cam [B, C_fg, h, w], labels [B, C_fg], valid [B, h, w]) -> scalar
    """

    def __init__(self, reduction: str = "all_terms") -> None:
        """Create the loss.

        Args:
            reduction: `all_terms` (one mean over every term, SPEC §4.4), `group_sum` (sum of the two group means) or
                `to_main` (the mean of the view-vs-main terms only).
        """
        super().__init__()
        if reduction not in SMC_REDUCTIONS:
            raise ValueError(
                f"MultiViewContrast: reduction must be one of {', '.join(SMC_REDUCTIONS)}, got {reduction!r}"
            )
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction}"

    def forward(
        self, view_cams: torch.Tensor, main_cam: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            view_cams: `[V, B, C_fg, h, w]` raw CAMs of the V views in the main frame, with gradient.
            main_cam: `[B, C_fg, h, w]` multi-scale CAM in [0, 1]; treated as a constant (stop-gradient).
            labels: `[B, C_fg]` multi-hot image labels.
            valid: `[B, h, w]` bool, True inside img_box.

        Returns:
            0-dim float32 tensor.
        """
        self._check(view_cams, main_cam, labels, valid)
        views = normalize_cams(view_cams.float())
        target = main_cam.detach().float()
        # [B, C_fg, h, w]: present class and inside the box.
        mask = (labels > 0)[:, :, None, None] & valid.bool()[:, None, :, :]
        count = mask.sum().clamp(min=1)

        def masked_mean(diff: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, diff.abs(), torch.zeros_like(diff)).sum() / count

        # The masked sums are exactly zero (and their gradient too) when the mask is empty, so no branch is needed.
        num_views = views.shape[0]
        to_main = [masked_mean(views[v] - target) for v in range(num_views)]
        if self.reduction == "to_main":  # the view-vs-view terms are not computed at all
            return torch.stack(to_main).mean()
        between = [masked_mean(views[v] - views[u]) for v in range(num_views) for u in range(v + 1, num_views)]
        if self.reduction == "all_terms":
            return torch.stack(to_main + between).mean()
        pair_mean = torch.stack(between).mean() if between else views.sum() * 0.0
        return torch.stack(to_main).mean() + pair_mean

    @staticmethod
    def _check(view_cams: torch.Tensor, main_cam: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        if view_cams.dim() != 5 or view_cams.shape[0] == 0:
            raise ValueError(
                f"MultiViewContrast: view_cams must be [V, B, C_fg, h, w] with V >= 1, got {tuple(view_cams.shape)}"
            )
        _, b, c, h, w = view_cams.shape
        if tuple(main_cam.shape) != (b, c, h, w):
            raise ValueError(
                f"MultiViewContrast: main_cam must be [B, C_fg, h, w] = {(b, c, h, w)}, got {tuple(main_cam.shape)}"
            )
        if tuple(labels.shape) != (b, c):
            raise ValueError(f"MultiViewContrast: labels must be [B, C_fg] = {(b, c)}, got {tuple(labels.shape)}")
        if tuple(valid.shape) != (b, h, w):
            raise ValueError(f"MultiViewContrast: valid must be [B, h, w] = {(b, h, w)}, got {tuple(valid.shape)}")


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map by its spatial maximum + 1e-5.

    Args:
        cams: `[..., h, w]` raw CAMs.

    Returns:
        Same shape, values in [0, 1).
    """
    cams = cams.relu()
    peak = cams.flatten(-2).amax(dim=-1)[..., None, None]
    return cams / (peak + NORM_EPS)
