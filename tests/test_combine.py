"""Tests for losses.combine (SPEC §4: weights, start iterations, ramps, finiteness)."""

from __future__ import annotations

import pytest
import torch

from losses import TERMS, active_terms, combine, term_weight

WEIGHTS = {"cls": 1.0, "cls_aux": 1.0, "ptc": 0.2, "ctc": 0.0, "smc": 0.1, "mem": 0.5, "seg": 0.1, "reg": 0.05}
STARTS = {"seg": 2000, "reg": 2000}
RAMPS = {"mem": 4}


def test_terms_are_the_spec_terms() -> None:
    assert TERMS == ("cls", "cls_aux", "ptc", "ctc", "smc", "mem", "seg", "reg")


def test_weight_zero_is_never_active() -> None:
    assert "ctc" not in active_terms(WEIGHTS, STARTS, RAMPS, 0)
    assert "ctc" not in active_terms(WEIGHTS, STARTS, RAMPS, 10**6)
    assert term_weight("ctc", WEIGHTS, STARTS, RAMPS, 5000) == 0.0


def test_start_iteration() -> None:
    assert active_terms(WEIGHTS, STARTS, RAMPS, 1999) == ["cls", "cls_aux", "ptc", "smc", "mem"]
    assert active_terms(WEIGHTS, STARTS, RAMPS, 2000) == ["cls", "cls_aux", "ptc", "smc", "mem", "seg", "reg"]
    assert term_weight("seg", WEIGHTS, STARTS, RAMPS, 1999) == 0.0
    assert term_weight("seg", WEIGHTS, STARTS, RAMPS, 2000) == 0.1


def test_linear_ramp_arithmetic() -> None:
    # start 10, ramp 4, weight 2: steps 10, 11, 12, 13 give 2·(1/4, 2/4, 3/4, 4/4); the start step is computed.
    weights, starts, ramps = {"seg": 2.0}, {"seg": 10}, {"seg": 4}
    got = [term_weight("seg", weights, starts, ramps, step) for step in range(9, 16)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert active_terms(weights, starts, ramps, 10) == ["seg"]


def test_missing_keys_mean_zero_weight_start_and_ramp() -> None:
    assert term_weight("reg", {}, {}, {}, 0) == 0.0
    assert term_weight("cls", {"cls": 1.0}, {}, {}, 0) == 1.0


def test_combine_weighted_sum_and_logs() -> None:
    # step 1: mem ramps over 4 steps from start 0 → factor 2/4. total = 1·0.5 + 0.2·2 + 0.5·(2/4)·1 = 1.15.
    a = torch.tensor(0.5, requires_grad=True)
    b = torch.tensor(2.0, requires_grad=True)
    c = torch.tensor(1.0, requires_grad=True)
    total, logs = combine({"cls": a, "ptc": b, "mem": c}, WEIGHTS, STARTS, RAMPS, step=1)
    assert total.item() == pytest.approx(1.15)
    assert logs == pytest.approx({"loss_cls": 0.5, "loss_ptc": 2.0, "loss_mem": 1.0, "loss_total": 1.15})
    total.backward()
    assert (a.grad.item(), b.grad.item(), c.grad.item()) == pytest.approx((1.0, 0.2, 0.25))


def test_combine_rejects_unknown_and_inactive_terms() -> None:
    with pytest.raises(ValueError, match="unknown loss term 'seg_aux'"):
        combine({"seg_aux": torch.tensor(1.0)}, WEIGHTS, STARTS, RAMPS, 0)
    with pytest.raises(ValueError, match=r"\['seg'\].*inactive"):
        combine({"cls": torch.tensor(1.0), "seg": torch.tensor(1.0)}, WEIGHTS, STARTS, RAMPS, 100)
    with pytest.raises(ValueError, match=r"\['ctc'\].*inactive"):
        combine({"ctc": torch.tensor(1.0)}, WEIGHTS, STARTS, RAMPS, 100)
    with pytest.raises(ValueError, match="no loss terms"):
        combine({}, WEIGHTS, STARTS, RAMPS, 0)
    with pytest.raises(ValueError, match="scalar"):
        combine({"cls": torch.ones(2)}, WEIGHTS, STARTS, RAMPS, 0)


def test_config_typos_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss.weight key 'smcm'"):
        active_terms({"smcm": 0.1}, {}, {}, 0)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        term_weight("cls", {"cls": -1.0}, {}, {}, 0)


def test_nan_detection_names_the_terms() -> None:
    terms = {"cls": torch.tensor(1.0), "ptc": torch.tensor(float("nan")), "smc": torch.tensor(float("inf"))}
    with pytest.raises(FloatingPointError, match=r"ptc=nan, smc=inf") as info:
        combine(terms, WEIGHTS, STARTS, RAMPS, 0)
    assert "cls" not in str(info.value)


def test_extra_numbers_are_logged_from_the_same_single_read() -> None:
    from utils.syncs import count_syncs

    terms = {"cls": torch.tensor(0.5), "ptc": torch.tensor(2.0)}
    with count_syncs() as counter:
        _, logs = combine(terms, WEIGHTS, STARTS, RAMPS, 1, extra={"mem_weight": torch.tensor(0.25), "k": 3})
    assert counter.total == 1 and counter.by_kind == {"tolist": 1}  # one transfer for the losses and the extras
    assert logs == pytest.approx({"loss_cls": 0.5, "loss_ptc": 2.0, "loss_total": 0.9, "mem_weight": 0.25, "k": 3.0})
    with pytest.raises(ValueError, match="name of a logged loss"):
        combine(terms, WEIGHTS, STARTS, RAMPS, 1, extra={"loss_total": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="scalar"):
        combine(terms, WEIGHTS, STARTS, RAMPS, 1, extra={"w": torch.ones(2)})
