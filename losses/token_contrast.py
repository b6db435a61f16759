"""Token feature contrast (TFCM, SPEC §4.2 and §4.3): patch-level PTC and class-level CTC."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Pair labels produced by core.labels.pair_labels (SPEC §2.3).
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

    Logits z[t, j] = ⟨teacher_t, student_j⟩ / T on the **raw** projection-head outputs (the published loss; the
    head's last layer is weight-normalised over an L2-normalised bottleneck, so the outputs have norm ≈ 2 at init
    and the logits stay moderate). ℓ = exp(z). Per image, with P / N the positive / negative views and
    Σneg_t = Σ_{j∈N} ℓ[t, j]:

    `L_img = ( Σ_t [ Σ_{j∈P} −log(ℓ[t,j] / (ℓ[t,j] + Σneg_t + 1e-4)) − log(1 / (1 + Σneg_t + 1e-4)) ] )
    / 2 / (|P| + 1e-4)`

    The last term is added once per teacher row, also when P is empty (the `else` branch of the published loop);
    the 2 is a literal constant, whatever the number of teacher rows (the published teacher has two). L_ctc is the
    mean of L_img over **all** images. An image without positive views therefore weighs 1e4 × its `else` terms; it
    cannot occur in training, where the two global views are always positive.

    `normalize=True` L2-normalises teacher and student outputs first, so the logits are cosines / T (a temperature
    change by |t|·|s|). The option changes the logits only: the reduction above is the same in both settings.

    Evaluated in log space: with a_t = log(Σneg_t + 1e-4) = logsumexp(z_N, log 1e-4), each positive term is
    `log(1 + exp(a_t − z_tj))` and the last term `log(1 + exp(a_t))` (`logaddexp(0, ·)`), which equal the formula
    wherever its float64 evaluation is finite and never overflow, whatever the size of the logits.

    Every student view (including the one that the teacher row comes from) takes part, as in the SPEC formula. The
    teacher is detached here as well, so no gradient can reach the teacher head even if the caller forgot.

    forward(student [B, V, K], teacher [B, T, K], negative [B, V] bool) -> scalar
    """

    def __init__(self, temperature: float = 0.5, normalize: bool = False) -> None:
        """Create the loss.

        Args:
            temperature: T > 0 dividing the logits (VOC 0.5, COCO 1.0).
            normalize: L2-normalise teacher and student outputs before the dot product (off = published).
        """
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"ClassTokenContrast: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            student: `[B, V, K]` student head outputs of all views (2 global first, then the locals), with gradient.
            teacher: `[B, T, K]` teacher head outputs of the T global views.
            negative: `[B, V]` bool, True for negative views (global views are always False).

        Returns:
            0-dim tensor, float32 (float64 for float64 inputs).
        """
        self._check(student, teacher, negative)
        # float32 (at least) with autocast off: a bf16 bmm would put ~1e-2 errors on logits scaled by 1 / T.
        dtype = torch.promote_types(student.dtype, torch.float32)
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = student.to(dtype)
            t = teacher.detach().to(dtype)
            if self.normalize:
                s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
            logits = torch.bmm(t, s.transpose(1, 2)) / self.temperature  # [B, T, V]
            negative = negative.bool()[:, None, :].expand_as(logits)
            positive = negative.logical_not()
            # a_t = log(Σneg_t + 1e-4): the negative logits plus one constant column log(1e-4), so never −inf.
            masked = logits.masked_fill(positive, float("-inf"))
            eps_column = logits.new_full((*logits.shape[:2], 1), math.log(CTC_EPS))
            log_neg = torch.logsumexp(torch.cat([masked, eps_column], dim=-1), dim=-1, keepdim=True)  # [B, T, 1]
            # −log(ℓ / (ℓ + Σneg + 1e-4)) = log(1 + exp(a − z)): no cancellation when the term is tiny.
            per_pair = torch.logaddexp(torch.zeros_like(logits), log_neg - logits)  # [B, T, V]
            pos_terms = torch.where(positive, per_pair, torch.zeros_like(per_pair)).sum(dim=(1, 2))  # [B]
            # −log(1 / (1 + Σneg + 1e-4)) = log(1 + exp(a)), once per teacher row.
            else_terms = torch.logaddexp(torch.zeros_like(log_neg), log_neg).sum(dim=(1, 2))  # [B]
            num_pos = positive[:, 0, :].sum(dim=-1).to(dtype)  # |P| per image
            per_image = (pos_terms + else_terms) / 2 / (num_pos + CTC_EPS)
            return per_image.mean()

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
