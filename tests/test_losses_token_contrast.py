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


def ctc_formula(student: torch.Tensor, teacher: torch.Tensor, negative: torch.Tensor, temp: float) -> float:
    """SPEC §4.3 written literally in plain Python floats (float64) with math.exp: loops over images, teacher rows
    and views, the `else` term once per row, `/ 2 / (|P| + 1e-4)` per image, then the mean over all images."""
    s, t, neg = student.tolist(), teacher.tolist(), negative.tolist()
    total = 0.0
    for b in range(len(s)):
        positives = [j for j in range(len(s[b])) if not neg[b][j]]
        loss = 0.0
        for row in t[b]:
            ell = [math.exp(sum(x * y for x, y in zip(row, view, strict=True)) / temp) for view in s[b]]
            sum_neg = sum(e for e, is_neg in zip(ell, neg[b], strict=True) if is_neg)
            for j in positives:
                loss += -math.log(ell[j] / (ell[j] + sum_neg + 1e-4))
            loss += -math.log(1 / (1 + sum_neg + 1e-4))
        total += loss / 2 / (len(positives) + 1e-4)
    return total / len(s)


def nll(z: float, sum_neg: float) -> float:
    """−log(e^z / (e^z + Σneg + 1e-4)), one positive term."""
    return -math.log(math.exp(z) / (math.exp(z) + sum_neg + 1e-4))


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """2 teacher rows × 4 student views, raw logits, T = 1, and the SPEC §4.3 value derived by hand.

    t1 = (1, 0), t2 = (0, 2); s0 = (1, 0), s1 = (0, 1), s3 = (−1, 0) positive, s2 = (1, 1) negative.
    z[t1] = (1, 0, 1, −1) → Σneg_1 = e;  z[t2] = (0, 2, 2, 0) → Σneg_2 = e².
    L = ( Σ_{z ∈ (1, 0, −1)} nll(z, e) + log(1 + e + 1e-4) + Σ_{z ∈ (0, 2, 0)} nll(z, e²) + log(1 + e² + 1e-4) )
        / 2 / (3 + 1e-4).
    """
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    negative = torch.tensor([[False, False, True, False]])
    e, e2 = math.e, math.e**2
    row1 = nll(1, e) + nll(0, e) + nll(-1, e) + math.log(1 + e + 1e-4)
    row2 = nll(0, e2) + nll(2, e2) + nll(0, e2) + math.log(1 + e2 + 1e-4)
    return student, teacher, negative, (row1 + row2) / 2 / (3 + 1e-4)


def test_ctc_known_answer_two_teachers_four_students() -> None:
    student, teacher, negative, expected = hand_case()
    loss = ClassTokenContrast(temperature=1.0)(student, teacher, negative)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert ctc_formula(student, teacher, negative, 1.0) == pytest.approx(expected, rel=1e-12)
    # T = 0.5 doubles every logit; the plain-Python formula gives the expected value.
    half = ClassTokenContrast(temperature=0.5)(student, teacher, negative)
    assert half.item() == pytest.approx(ctc_formula(student, teacher, negative, 0.5), rel=1e-6)


def test_ctc_all_negative_image_counts_in_the_mean() -> None:
    # Image 1 (same teacher rows) has views (1, 0), (0, 1), (0, 0), (0, 0), all negative: only the `else` terms
    # remain, over |P| + 1e-4 = 1e-4. z[t1] = (1, 0, 0, 0) → Σneg_1 = e + 3; z[t2] = (0, 2, 0, 0) → Σneg_2 = e² + 3.
    # L_1 = (log(1 + e + 3 + 1e-4) + log(1 + e² + 3 + 1e-4)) / 2 / 1e-4, and L = (L_0 + L_1) / 2.
    student, teacher, negative, first = hand_case()
    image_1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    student = torch.cat([student, image_1]).requires_grad_(True)
    teacher = teacher.repeat(2, 1, 1)
    negative = torch.cat([negative, torch.ones(1, 4, dtype=torch.bool)])
    e = math.e
    second = (math.log(1 + e + 3 + 1e-4) + math.log(1 + e**2 + 3 + 1e-4)) / 2 / 1e-4
    loss = ClassTokenContrast(temperature=1.0)(student, teacher, negative)
    loss.backward()
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(ctc_formula(student.detach(), teacher, negative, 1.0), rel=1e-6)
    # The `else` terms push the negatives of image 1 away from the teacher: a finite, non-zero gradient.
    assert torch.isfinite(student.grad).all() and student.grad[1].abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 0.1])
def test_ctc_matches_formula_on_random_inputs(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 10, 8, generator=gen) * 0.7
    teacher = torch.randn(3, 2, 8, generator=gen) * 0.7
    negative = torch.rand(3, 10, generator=gen) > 0.5
    negative[:, :2] = False  # the global views are always positive
    negative[1, 2:] = False  # one image without negatives
    loss = ClassTokenContrast(temperature)(student, teacher, negative)
    assert loss.item() == pytest.approx(ctc_formula(student, teacher, negative, temperature), rel=1e-5)


def test_ctc_normalize_option_equals_formula_on_unit_vectors() -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 6, 5, generator=gen) * 3
    teacher = torch.randn(2, 2, 5, generator=gen) * 3
    negative = torch.tensor([[False, False, True, False, True, True], [False, False, False, True, False, False]])
    unit_s = torch.nn.functional.normalize(student.double(), dim=-1)
    unit_t = torch.nn.functional.normalize(teacher.double(), dim=-1)
    loss = ClassTokenContrast(0.5, normalize=True)(student, teacher, negative)
    assert loss.item() == pytest.approx(ctc_formula(unit_s, unit_t, negative, 0.5), rel=1e-5)
    # The option changes the logits: on vectors of norm ≠ 1 the published (raw) value differs.
    raw = ClassTokenContrast(0.5)(student, teacher, negative)
    assert raw.item() == pytest.approx(ctc_formula(student, teacher, negative, 0.5), rel=1e-5)
    assert abs(raw.item() - loss.item()) > 1e-2


@pytest.mark.parametrize("normalize", [False, True])
def test_ctc_gradient_reaches_student_only(normalize: bool) -> None:
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 2, 4, requires_grad=True)
    negative = torch.tensor([[False, False, True, False, True], [False, False, False, True, True]])
    ClassTokenContrast(0.5, normalize=normalize)(student, teacher, negative).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and (student.grad.abs().sum(dim=-1) > 0).all()


def test_ctc_gradient_matches_numerical() -> None:
    # float64 inputs stay float64, so gradcheck compares the log-space gradient with finite differences.
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)
    negative = torch.tensor([[False, False, True, False, True], [True, True, True, True, True]])
    assert torch.autograd.gradcheck(lambda s: ClassTokenContrast(0.5)(s, teacher, negative), (student,))


def test_ctc_huge_logits_are_finite_and_exact() -> None:
    # Integer vectors: every dot product is an exact integer in float32 and logits reach ~650 (T = 0.5), where
    # exp overflows float32 (the published code would give inf / nan) but not float64.
    gen = torch.Generator().manual_seed(3)
    student = torch.randint(-9, 10, (2, 6, 4), generator=gen).float().requires_grad_(True)
    teacher = torch.randint(-9, 10, (2, 2, 4), generator=gen).float()
    negative = torch.tensor([[False, False, True, True, False, True], [False, False, False, True, True, False]])
    logits = torch.bmm(teacher, student.detach().transpose(1, 2)) / 0.5
    assert logits.abs().max() > 200 and logits.abs().max() < 709
    assert not torch.isfinite(torch.exp(logits)).all()  # the naive float32 evaluation overflows
    loss = ClassTokenContrast(0.5)(student, teacher, negative)
    loss.backward()
    assert loss.item() == pytest.approx(ctc_formula(student.detach(), teacher, negative, 0.5), rel=1e-6)
    assert torch.isfinite(student.grad).all()
    # Beyond float64 too (logits ~1e5): still finite, with a finite gradient.
    big = (student.detach() * 100).requires_grad_(True)
    loss = ClassTokenContrast(0.5)(big, teacher * 100, negative)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


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
    assert ctc_amp.item() == pytest.approx(ctc.item(), rel=1e-6)
