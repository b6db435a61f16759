"""Summing the loss terms (SPEC §4): weights, start iterations, linear ramps, one finiteness check."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Every loss term of SPEC §4, in logging order.
TERMS = ("cls", "cls_aux", "ptc", "ctc", "smc", "mem", "seg", "reg")


def term_weight(
    name: str,
    weights: Mapping[str, float],
    start_iters: Mapping[str, int],
    ramps: Mapping[str, int],
    step: int,
    known: Sequence[str] = TERMS,
) -> float:
    """The weight of one term at `step` (0-based optimiser step).

    0 before `start_iters[name]`; then a linear ramp over `ramps[name]` iterations whose first value is
    `weight / ramp` at the start step (so `start_iter` stays "the first iteration at which the term is computed")
    and which reaches `weight` at `start + ramp − 1`; `weight` afterwards. A term missing from `weights` has weight 0;
    one missing from `start_iters` / `ramps` starts at 0 / has no ramp.

    Args:
        name: one of `known` (default `TERMS`).
        weights: term → weight ≥ 0 (e.g. `cfg.loss.weight`).
        start_iters: term → first iteration ≥ 0 (e.g. `cfg.loss.start_iter`).
        ramps: term → ramp length ≥ 0 in iterations, 0 = none (e.g. `cfg.loss.ramp_iters`).
        step: current iteration.

    Returns:
        The weight as a Python float.
    """
    _check_name(name, "term", known)
    weight = float(weights.get(name, 0.0))
    start = int(start_iters.get(name, 0))
    ramp = int(ramps.get(name, 0))
    if weight < 0 or not math.isfinite(weight):
        raise ValueError(f"loss weight of term '{name}' must be a finite number >= 0, got {weight}")
    if start < 0 or ramp < 0:
        raise ValueError(f"start_iter ({start}) and ramp_iters ({ramp}) of term '{name}' must be >= 0")
    if step < start:
        return 0.0
    if ramp > 0:
        return weight * min(1.0, (step - start + 1) / ramp)
    return weight


def active_terms(
    weights: Mapping[str, float],
    start_iters: Mapping[str, int],
    ramps: Mapping[str, int],
    step: int,
    known: Sequence[str] = TERMS,
) -> list[str]:
    """The terms to compute at `step`: those whose weight (`term_weight`) is > 0, in `known` (`TERMS`) order.

    A key of any mapping that is not a term name is an error (it is most likely a typo in the config).
    """
    for label, mapping in (("loss.weight", weights), ("loss.start_iter", start_iters), ("loss.ramp_iters", ramps)):
        for key in mapping:
            _check_name(str(key), f"{label} key", known)
    return [name for name in known if term_weight(name, weights, start_iters, ramps, step, known) > 0]


def combine(
    terms: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    start_iters: Mapping[str, int],
    ramps: Mapping[str, int],
    step: int,
    known: Sequence[str] = TERMS,
    extra: Mapping[str, torch.Tensor | float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the computed terms, checked for NaN/Inf once.

    Every logged number (each term, the total and the `extra` values) comes to the host in **one** transfer: the one
    host read (device synchronisation) of a training step, which also serves the finiteness check.

    Args:
        terms: term name → 0-dim loss tensor (unweighted). Only active terms may be given.
        weights, start_iters, ramps: as in `term_weight`.
        step: current iteration.
        extra: other numbers to log under their own names (e.g. `mem_weight`), 0-dim tensors (read in the same
            transfer) or Python numbers; not checked for finiteness, not part of the total.

    Returns:
        `(total, logs)`: the 0-dim float32 weighted sum (for backward) and `{"loss_<name>": unweighted value, ...,
        "loss_total": weighted sum, **extra}` as Python floats.

    Raises:
        ValueError: no terms, an unknown name, a term that is inactive at `step`, or a tensor that is not a scalar.
        FloatingPointError: some term is NaN or Inf; the message names every such term.
    """
    if not terms:
        raise ValueError(f"combine: no loss terms given at step {step}")
    names = list(terms)
    for name in names:
        _check_name(name, "loss term", known)
        if terms[name].numel() != 1:
            raise ValueError(f"combine: term '{name}' must be a scalar tensor, got shape {tuple(terms[name].shape)}")
    factors = {name: term_weight(name, weights, start_iters, ramps, step, known) for name in names}
    inactive = [name for name in names if factors[name] == 0]
    if inactive:
        raise ValueError(
            f"combine: term(s) {inactive} were computed but are inactive at step {step} (weight 0 or before their "
            "start iteration); use active_terms() to decide what to compute"
        )
    values = [terms[name].float().reshape(()) for name in names]
    total = torch.stack([factors[name] * value for name, value in zip(names, values, strict=True)]).sum()
    extra = dict(extra or {})
    taken = {f"loss_{name}" for name in names} | {"loss_total"}
    for name, value in extra.items():
        if name in taken:
            raise ValueError(f"combine: extra value '{name}' has the name of a logged loss")
        if torch.is_tensor(value) and value.numel() != 1:
            raise ValueError(f"combine: extra value '{name}' must be a scalar, got shape {tuple(value.shape)}")
    read = [name for name, value in extra.items() if torch.is_tensor(value)]
    logged = [*[value.detach() for value in values], total.detach(),
              *[extra[name].detach().float().reshape(()).to(total.device) for name in read]]  # fmt: skip
    numbers = torch.stack(logged).tolist()  # one device→host transfer for every logged number: the step's host read
    read_values = dict(zip(read, numbers[len(names) + 1 :], strict=True))
    numbers = numbers[: len(names) + 1]
    bad = [name for name, number in zip(names, numbers, strict=False) if not math.isfinite(number)]
    if not bad and not math.isfinite(numbers[-1]):
        raise FloatingPointError(f"combine: the weighted sum overflowed at step {step}: {numbers[-1]}")
    if bad:
        detail = ", ".join(f"{name}={number}" for name, number in zip(names, numbers, strict=False) if name in bad)
        raise FloatingPointError(f"combine: non-finite loss term(s) at step {step}: {detail}")
    logs = {f"loss_{name}": number for name, number in zip(names, numbers, strict=False)}
    logs["loss_total"] = numbers[-1]
    logs.update({name: read_values[name] if name in read_values else float(value) for name, value in extra.items()})
    return total, logs


def _check_name(name: str, what: str, known: Sequence[str]) -> None:
    if name not in known:
        raise ValueError(f"unknown {what} '{name}'; expected one of {list(known)}")


@dataclass(frozen=True)
class TermSchedule:
    """The loss terms' weights, start iterations and ramps (``loss.weight`` / ``start_iter`` / ``ramp_iters``).

    ``terms`` lists the known term names in logging order: `TERMS` for MSFC; a step with a term of its own passes
    ``(*TERMS, "mine")`` (docs/design.md, "How to extend").
    """

    weights: Mapping[str, float]
    start_iters: Mapping[str, int]
    ramps: Mapping[str, int]
    terms: tuple[str, ...] = TERMS

    @classmethod
    def from_config(cls, loss: Mapping[str, Any], terms: Sequence[str] = TERMS) -> TermSchedule:
        """From the ``loss`` config node (its ``weight``, ``start_iter`` and ``ramp_iters`` mappings)."""
        plain = {key: {str(k): v for k, v in loss[key].items()} for key in ("weight", "start_iter", "ramp_iters")}
        schedule = cls(plain["weight"], plain["start_iter"], plain["ramp_iters"], tuple(terms))
        schedule.active(0)  # an unknown term name in any of the three mappings is an error now, not at step 0
        return schedule

    def weight(self, name: str, step: int) -> float:
        return term_weight(name, self.weights, self.start_iters, self.ramps, step, self.terms)

    def active(self, step: int) -> list[str]:
        return active_terms(self.weights, self.start_iters, self.ramps, step, self.terms)

    def combine(
        self, terms: Mapping[str, torch.Tensor], step: int, extra: Mapping[str, torch.Tensor | float] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return combine(terms, self.weights, self.start_iters, self.ramps, step, self.terms, extra)
