"""Dense-CRF energy regulariser on the segmentation softmax (SPEC §4.6, L_reg), gated-CRF style in pure PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EnergyLoss(nn.Module):
    """Gated dense-CRF energy on a local window (SPEC §4.6).

    Interpretations of the SPEC fixed here:

    - Kernel between pixel i and a neighbour j in the (2r+1)² window around i, centre excluded:
      `K_ij = exp(−|p_i − p_j|² / (2σ_xy²) − |I_i − I_j|² / (2σ_rgb²))`, p in pixels of the (half-resolution) map,
      I the RGB values on the 0..255 scale. K = 0 for neighbours outside the image or outside `valid` (padding of the
      crop carries no colour information).
    - `Gate_i = max(valid_i − max_c S_ic, 0)` (the SPEC's "ROI − max-probability"; ROI is the img_box mask), detached,
      and 1 on ignored pixels inside the box: confident pixels are left alone, uncertain and unlabelled ones are
      pulled towards their neighbours.
    - `L = −Σ_i Σ_c S_ic · Gate_i · Σ_j K_ij S_jc / N`, N = number of valid pixels (at least 1). The gradient flows
      through both S_i and S_j.

    The window is visited one offset at a time with padded slicing, so memory stays O(B·C·h·w) (plus the
    class-independent kernel maps, window·B·h·w, kept for backward) instead of O(window·B·C·h·w).

    forward(prob [B, C, h, w], image [B, 3, h, w] on 0..255, valid [B, h, w] bool, ignored [B, h, w] bool) -> scalar
    """

    def __init__(self, kernel_radius: int = 5, sigma_xy: float = 6.0, sigma_rgb: float = 15.0) -> None:
        """Create the loss.

        Args:
            kernel_radius: r, the window is (2r+1)² pixels at the resolution of `prob`.
            sigma_xy: spatial σ in pixels of that resolution.
            sigma_rgb: colour σ on the 0..255 scale.
        """
        super().__init__()
        if int(kernel_radius) != kernel_radius or kernel_radius < 1:
            raise ValueError(f"EnergyLoss: kernel_radius must be an integer >= 1, got {kernel_radius}")
        if not sigma_xy > 0 or not sigma_rgb > 0:
            raise ValueError(f"EnergyLoss: sigma_xy and sigma_rgb must be > 0, got {sigma_xy} and {sigma_rgb}")
        self.kernel_radius = int(kernel_radius)
        self.sigma_xy = float(sigma_xy)
        self.sigma_rgb = float(sigma_rgb)

    def extra_repr(self) -> str:
        return f"kernel_radius={self.kernel_radius}, sigma_xy={self.sigma_xy}, sigma_rgb={self.sigma_rgb}"

    def forward(
        self, prob: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, ignored: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            prob: `[B, C, h, w]` segmentation softmax (with gradient).
            image: `[B, 3, h, w]` RGB on 0..255 at the same resolution.
            valid: `[B, h, w]` bool, True inside img_box.
            ignored: `[B, h, w]` bool, True where the segmentation label is ignore (255) inside the box.

        Returns:
            0-dim float32 tensor (≤ 0).
        """
        self._check(prob, image, valid, ignored)
        prob = prob.float()
        valid_f = valid.bool().float()
        gate = (valid_f - prob.detach().amax(dim=1)).clamp(min=0)
        gate = torch.where(ignored.bool() & valid.bool(), torch.ones_like(gate), gate)  # [B, h, w]
        message = self._neighbour_sum(prob, image.detach().float(), valid_f)  # [B, C, h, w] = Σ_j K_ij S_jc
        energy = (prob * gate[:, None] * message).sum()
        return -energy / valid_f.sum().clamp(min=1)

    def _neighbour_sum(self, prob: torch.Tensor, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Σ_j K_ij S_jc over the window around every pixel i.

        Args:
            prob: `[B, C, h, w]` float32.
            image: `[B, 3, h, w]` float32 on 0..255.
            valid: `[B, h, w]` float32 in {0, 1}.

        Returns:
            `[B, C, h, w]`.
        """
        r = self.kernel_radius
        h, w = prob.shape[-2:]
        # Zero padding of `valid` makes K vanish for neighbours outside the image.
        prob_pad = F.pad(prob, (r, r, r, r))
        image_pad = F.pad(image, (r, r, r, r))
        valid_pad = F.pad(valid, (r, r, r, r))
        message = torch.zeros_like(prob)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy == 0 and dx == 0:
                    continue
                rows = slice(r + dy, r + dy + h)
                cols = slice(r + dx, r + dx + w)
                colour = (image - image_pad[:, :, rows, cols]).square().sum(dim=1)  # [B, h, w]
                log_k = -(dy * dy + dx * dx) / (2.0 * self.sigma_xy**2) - colour / (2.0 * self.sigma_rgb**2)
                kernel = log_k.exp() * valid_pad[:, rows, cols]
                message = message + kernel[:, None] * prob_pad[:, :, rows, cols]
        return message

    @staticmethod
    def _check(prob: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, ignored: torch.Tensor) -> None:
        if prob.dim() != 4:
            raise ValueError(f"EnergyLoss: prob must be [B, C, h, w], got {tuple(prob.shape)}")
        b, _, h, w = prob.shape
        if tuple(image.shape) != (b, 3, h, w):
            raise ValueError(f"EnergyLoss: image must be [B, 3, h, w] = {(b, 3, h, w)}, got {tuple(image.shape)}")
        for name, mask in (("valid", valid), ("ignored", ignored)):
            if tuple(mask.shape) != (b, h, w):
                raise ValueError(f"EnergyLoss: {name} must be [B, h, w] = {(b, h, w)}, got {tuple(mask.shape)}")
