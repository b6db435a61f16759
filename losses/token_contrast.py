"""Token feature contrast (TFCM, SPEC §4.2 and §4.3): patch-level PTC and class-level CTC."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Pair labels produced by utils.cam.pair_labels (SPEC §2.3).
PAIR_SAME = 1
PAIR_DIFFERENT = 0

# The constant in the CTC denominator (SPEC §4.3): ℓ / (ℓ + Σneg + 1e-4).
CTC_EPS = 1e-4


class PatchTokenContrast(nn.Module):
    """TFCM patch-level term (SPEC §4.2): pull same-label token pairs together, push others apart.

    With s_ij = |cos(F_i, F_j)| between tokens of the same image and P / N the positive / negative pairs of the pair
    matrix (SPEC §2.3), summed over the whole batch:
    `L = ½ (1 − Σ_P s / (|P| + 1)) + ½ Σ_N s / (|N| + 1)`.

    When no pair is positive or negative (everything ignored) there is nothing to act on and the loss is a zero
    connected to `tokens` (the formula would give the constant ½ with zero gradient; a zero is clearer in the logs).

    forward(tokens [B, D, h, w], pairs [B, N, N] with 1 same / 0 different / 255 ignore, N = h·w) -> scalar
    """

    def forward(self, tokens: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            tokens: `[B, D, h, w]` patch tokens (with gradient).
            pairs: `[B, N, N]` integer pair labels, N = h·w: 1 same label, 0 different, anything else ignored.

        Returns:
            0-dim float32 tensor.
        """
        if tokens.dim() != 4:
            raise ValueError(f"PatchTokenContrast: tokens must be [B, D, h, w], got {tuple(tokens.shape)}")
        b, _, h, w = tokens.shape
        n = h * w
        if tuple(pairs.shape) != (b, n, n):
            raise ValueError(
                f"PatchTokenContrast: pairs must be [B, N, N] = {(b, n, n)} for tokens {tuple(tokens.shape)}, "
                f"got {tuple(pairs.shape)}"
            )
        sim = token_similarity(tokens)
        positive = pairs == PAIR_SAME
        negative = pairs == PAIR_DIFFERENT
        num_pos = positive.sum()
        num_neg = negative.sum()
        # Masking with torch.where (not a product) keeps ignored pairs out of the graph entirely.
        sum_pos = torch.where(positive, sim, torch.zeros_like(sim)).sum()
        sum_neg = torch.where(negative, sim, torch.zeros_like(sim)).sum()
        loss = 0.5 * (1.0 - sum_pos / (num_pos + 1)) + 0.5 * sum_neg / (num_neg + 1)
        # torch.where instead of an `if` on the counts: no host-device synchronisation.
        return torch.where(num_pos + num_neg > 0, loss, sim.sum() * 0.0)


def token_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """|cos| between every pair of tokens of the same image.

    Args:
        tokens: `[B, D, h, w]`.

    Returns:
        `[B, N, N]` float32 in [0, 1], N = h·w.
    """
    # Casting to float32 is not enough: autocast would run the bmm in bf16/fp16 again (errors ~1e-3 on |cos|).
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        flat = F.normalize(tokens.float().flatten(2), dim=1)  # [B, D, N]
        return torch.bmm(flat.transpose(1, 2), flat).abs()


class ClassTokenContrast(nn.Module):
    """TFCM class-level term (SPEC §4.3): teacher global views against student global and local views.

    ℓ[t, j] = exp(⟨t̂, ŝ_j⟩ / T) with t̂, ŝ the **L2-normalised** teacher and student head outputs. The SPEC writes the
    raw inner product; the projection head's 1024-d outputs have entries in [-1, 1], so a raw dot product reaches
    ~1024 / T and `exp` overflows float32. Normalising makes the logits cosines in [-1/T, 1/T] (as in DINO-style
    heads with a temperature).

    For each teacher row t: Σneg = Σ_{j negative} ℓ[t, j] and each positive j contributes
    `−log(ℓ[t, j] / (ℓ[t, j] + Σneg + 1e-4))`. The loss averages over teacher rows and positives within an image,
    then over images (images without any positive view are skipped). It is evaluated in log space,
    `logsumexp(z_j, z_neg..., log 1e-4) − z_j`, which equals the formula but never overflows.

    Every student view (including the one that the teacher row comes from) takes part, as in the SPEC formula. The
    teacher is detached here as well, so no gradient can reach the teacher head even if the caller forgot.

    forward(student [B, V, K], teacher [B, T, K], negative [B, V] bool) -> scalar
    """

    def __init__(self, temperature: float = 0.5) -> None:
        """Create the loss.

        Args:
            temperature: T > 0 dividing the cosine logits (VOC 0.5, COCO 1.0).
        """
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"ClassTokenContrast: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: `[B, V, K]` student head outputs of all views (2 global first, then the locals), with gradient.
            teacher: `[B, T, K]` teacher head outputs of the T global views.
            negative: `[B, V]` bool, True for negative views (global views are always False).

        Returns:
            0-dim float32 tensor.
        """
        self._check(student, teacher, negative)
        # float32 with autocast off: a bf16 bmm would put ~1e-2 errors on logits scaled by 1 / T.
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = F.normalize(student.float(), dim=-1)
            t = F.normalize(teacher.detach().float(), dim=-1)
            logits = torch.bmm(t, s.transpose(1, 2)) / self.temperature  # [B, T, V]
        negative = negative.bool()[:, None, :].expand_as(logits)
        # log(Σneg + 1e-4) per teacher row: the masked logits plus one constant column log(1e-4).
        masked = logits.masked_fill(negative.logical_not(), float("-inf"))
        eps_column = logits.new_full((*logits.shape[:2], 1), math.log(CTC_EPS))
        log_neg = torch.logsumexp(torch.cat([masked, eps_column], dim=-1), dim=-1, keepdim=True)  # [B, T, 1]
        per_pair = torch.logaddexp(logits, log_neg) - logits  # [B, T, V], −log(ℓ / (ℓ + Σneg + 1e-4))
        positive = negative.logical_not()
        per_pair = torch.where(positive, per_pair, torch.zeros_like(per_pair))
        count = positive.sum(dim=(1, 2))  # [B]
        per_image = per_pair.sum(dim=(1, 2)) / count.clamp(min=1)
        # Images without a positive view contribute an exact zero and are left out of the mean (no host sync).
        has_pos = (count > 0).float()
        return (per_image * has_pos).sum() / has_pos.sum().clamp(min=1)

    @staticmethod
    def _check(student: torch.Tensor, teacher: torch.Tensor, negative: torch.Tensor) -> None:
        if student.dim() != 3 or teacher.dim() != 3:
            raise ValueError(
                f"ClassTokenContrast: student must be [B, V, K] and teacher [B, T, K], got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)}"
            )
        if teacher.shape[0] != student.shape[0] or teacher.shape[2] != student.shape[2]:
            raise ValueError(
                f"ClassTokenContrast: teacher {tuple(teacher.shape)} must share B and K with student "
                f"{tuple(student.shape)}"
            )
        if tuple(negative.shape) != tuple(student.shape[:2]):
            raise ValueError(
                f"ClassTokenContrast: negative must be [B, V] = {tuple(student.shape[:2])}, got {tuple(negative.shape)}"
            )
