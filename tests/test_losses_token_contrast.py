"""Tests for losses.token_contrast: PTC (SPEC §4.2) and CTC (SPEC §4.3)."""

from __future__ import annotations

import math

import pytest
import torch

from losses import ClassTokenContrast, PatchTokenContrast

# Pair matrices written out by hand (SPEC §2.3: 1 same, 0 different, 255 ignore and on the diagonal).
# Token labels [1, 1, 0, 0]: tokens 0-1 and 2-3 are pairs of the same label.
PAIRS_TWO_GROUPS = [[255, 1, 0, 0], [1, 255, 0, 0], [0, 0, 255, 1], [0, 0, 1, 255]]
# Token labels [1, 2, 3, 4]: every pair is different.
PAIRS_ALL_DIFFERENT = [[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]]


def hand_tokens() -> torch.Tensor:
    """`[1, 2, 2, 2]`: F0 = e1, F1 = 2·e1 (parallel), F2 = e2, F3 = −e2 (anti-parallel); |cos| is 1 within
    {0, 1} and {2, 3}, 0 across."""
    flat = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # [N, D]
    return flat.T.reshape(1, 2, 2, 2)


def test_ptc_known_answer_two_groups() -> None:
    # |P| = 4 ordered pairs with s = 1, |N| = 8 with s = 0: L = ½(1 − 4/5) + ½·0/9 = 0.1.
    pairs = torch.tensor([PAIRS_TWO_GROUPS], dtype=torch.uint8)
    assert PatchTokenContrast()(hand_tokens(), pairs).item() == pytest.approx(0.1, abs=1e-6)


def test_ptc_known_answer_all_different() -> None:
    # |P| = 0; |N| = 12 with s = 1 on the 4 ordered pairs (0,1), (1,0), (2,3), (3,2): L = ½(1 − 0) + ½·4/13.
    pairs = torch.tensor([PAIRS_ALL_DIFFERENT], dtype=torch.uint8)
    assert PatchTokenContrast()(hand_tokens(), pairs).item() == pytest.approx(0.5 + 2 / 13, abs=1e-6)


def test_ptc_sums_over_the_batch() -> None:
    # Pooled counts: |P| = 4, Σ_P s = 4, |N| = 8 + 12 = 20, Σ_N s = 0 + 4 → ½(1 − 4/5) + ½·4/21,
    # which differs from the mean of the per-image losses (0.1 and 0.5 + 2/13).
    tokens = hand_tokens().repeat(2, 1, 1, 1)
    pairs = torch.tensor([PAIRS_TWO_GROUPS, PAIRS_ALL_DIFFERENT], dtype=torch.uint8)
    assert PatchTokenContrast()(tokens, pairs).item() == pytest.approx(0.1 + 2 / 21, abs=1e-6)


def test_ptc_gradient_pulls_positives_together() -> None:
    # Two tokens of the same label at 60°: one gradient step must raise their |cos|.
    tokens = torch.tensor([[1.0, 0.5], [0.0, math.sqrt(3) / 2]]).reshape(1, 2, 1, 2).requires_grad_(True)
    pairs = torch.tensor([[[255, 1], [1, 255]]], dtype=torch.uint8)
    PatchTokenContrast()(tokens, pairs).backward()
    stepped = (tokens - 0.1 * tokens.grad).detach().flatten(2)[0]
    cos = torch.nn.functional.cosine_similarity(stepped[:, 0], stepped[:, 1], dim=0)
    assert cos.item() > 0.5 + 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_ptc_everything_ignored_is_connected_zero(batch: int) -> None:
    tokens = torch.randn(batch, 4, 2, 3, requires_grad=True)
    loss = PatchTokenContrast()(tokens, torch.full((batch, 6, 6), 255, dtype=torch.uint8))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(tokens.grad, torch.zeros_like(tokens))


def test_ptc_ignored_image_gets_no_gradient() -> None:
    # B = 3: only image 1 has pairs; images 0 and 2 are fully ignored and zero tokens (a zero vector) stay finite.
    tokens = torch.randn(3, 2, 2, 2)
    tokens[2] = 0.0
    tokens.requires_grad_(True)
    pairs = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    pairs[1] = torch.tensor(PAIRS_TWO_GROUPS, dtype=torch.uint8)
    loss = PatchTokenContrast()(tokens, pairs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tokens.grad).all()
    assert torch.equal(tokens.grad[0], torch.zeros(2, 2, 2)) and torch.equal(tokens.grad[2], torch.zeros(2, 2, 2))
    assert tokens.grad[1].abs().sum() > 0


def test_ptc_shape_error() -> None:
    with pytest.raises(ValueError, match=r"pairs must be \[B, N, N\]"):
        PatchTokenContrast()(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 3, dtype=torch.uint8))


def ctc_direct(student: torch.Tensor, teacher: torch.Tensor, negative: torch.Tensor, temp: float) -> torch.Tensor:
    """The SPEC §4.3 formula written literally with exp, in float64, averaged per image then over images."""
    s = torch.nn.functional.normalize(student.double(), dim=-1)
    t = torch.nn.functional.normalize(teacher.double(), dim=-1)
    per_image = []
    for b in range(s.shape[0]):
        ell = torch.exp(t[b] @ s[b].T / temp)  # [T, V]
        terms = []
        for row in range(ell.shape[0]):
            sum_neg = ell[row][negative[b]].sum()
            for j in range(ell.shape[1]):
                if not negative[b, j]:
                    terms.append(-torch.log(ell[row, j] / (ell[row, j] + sum_neg + 1e-4)))
        per_image.append(torch.stack(terms).mean())
    return torch.stack(per_image).mean()


def test_ctc_known_answer_one_positive_one_negative() -> None:
    # Teacher t = e1; student s0 = 5·e1 (positive, normalised to e1), s1 = e2 (negative); T = 1.
    # z0 = 1, z1 = 0 → L = −log(e / (e + 1 + 1e-4)) = log(1 + (1 + 1e-4)/e).
    student = torch.tensor([[[5.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0]]])
    negative = torch.tensor([[False, True]])
    loss = ClassTokenContrast(temperature=1.0)(student, teacher, negative)
    assert loss.item() == pytest.approx(math.log(1 + (1 + 1e-4) / math.e), rel=1e-6)


def test_ctc_known_answer_two_teacher_rows() -> None:
    # Add teacher row e2: z = (0, 1) → −log(1 / (1 + e + 1e-4)) = log(1 + e + 1e-4); mean over the two rows.
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    negative = torch.tensor([[False, True]])
    loss = ClassTokenContrast(temperature=1.0)(student, teacher, negative)
    expected = (math.log(1 + (1 + 1e-4) / math.e) + math.log(1 + math.e + 1e-4)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 0.01])
def test_ctc_log_space_equals_direct_formula(temperature: float) -> None:
    # T = 0.01 makes logits up to 100: exp overflows float32 (max ≈ 3.4e38 < e^100) but not the float64 reference.
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 6, 8, generator=gen)
    teacher = torch.randn(3, 2, 8, generator=gen)
    negative = torch.rand(3, 6, generator=gen) > 0.5
    negative[:, :2] = False  # the global views are always positive
    negative[1, 2:] = False  # one image without negatives
    loss = ClassTokenContrast(temperature)(student, teacher, negative)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ctc_direct(student, teacher, negative, temperature).item(), rel=1e-5)


def test_ctc_gradient_reaches_student_only() -> None:
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 2, 4, requires_grad=True)
    negative = torch.tensor([[False, False, True, False, True], [False, False, False, True, True]])
    ClassTokenContrast(0.5)(student, teacher, negative).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and (student.grad.abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_ctc_image_without_positive_is_left_out(batch: int) -> None:
    # Image 0 is the hand example above; the others have only negative views (a connected zero, left out of the
    # mean), so the loss is the hand value and their students get exactly zero gradient.
    student = torch.tensor([[5.0, 0.0], [0.0, 1.0]]).repeat(batch, 1, 1).requires_grad_(True)
    teacher = torch.tensor([[[1.0, 0.0]]]).repeat(batch, 1, 1)
    negative = torch.ones(batch, 2, dtype=torch.bool)
    negative[0] = torch.tensor([False, True])
    loss = ClassTokenContrast(temperature=1.0)(student, teacher, negative)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(1 + (1 + 1e-4) / math.e), rel=1e-6)
    assert torch.equal(student.grad[1:], torch.zeros_like(student.grad[1:]))


def test_ctc_no_positive_anywhere_is_connected_zero() -> None:
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = ClassTokenContrast(0.5)(student, torch.randn(2, 2, 4), torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


def test_ctc_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        ClassTokenContrast(0.0)
    with pytest.raises(ValueError, match="negative must be"):
        ClassTokenContrast(0.5)(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.bool))


def test_float32_under_autocast() -> None:
    # A bf16 bmm shifts both values by ~1e-3 (measured); under autocast the losses must equal their float32 values
    # on the same (bf16-rounded) inputs.
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16, 4, 4, generator=gen).bfloat16()
    pairs = torch.randint(0, 3, (2, 16, 16), generator=gen).to(torch.uint8)
    pairs[pairs == 2] = 255
    student = torch.randn(2, 6, 64, generator=gen).bfloat16()
    teacher = torch.randn(2, 2, 64, generator=gen).bfloat16()
    negative = torch.zeros(2, 6, dtype=torch.bool)
    negative[:, 4:] = True
    ptc = PatchTokenContrast()(tokens.float(), pairs)
    ctc = ClassTokenContrast(0.1)(student.float(), teacher.float(), negative)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ptc_amp = PatchTokenContrast()(tokens, pairs)
        ctc_amp = ClassTokenContrast(0.1)(student, teacher, negative)
    assert ptc_amp.dtype == ctc_amp.dtype == torch.float32
    assert ptc_amp.item() == pytest.approx(ptc.item(), abs=1e-6)
    assert ctc_amp.item() == pytest.approx(ctc.item(), abs=1e-6)
