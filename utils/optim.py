"""Optimiser (AdamW, SPEC §6; SGD, SPEC §9) and learning-rate schedule. The learning rate is a pure function of the
step."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lr_factor(step: int, max_iters: int, warmup_iters: int, warmup_ratio: float, power: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters`` steps, then poly decay
    ``(1 - step / max_iters) ** power`` (the decay is measured over the whole run, as in ToCo/SegFormer recipes).
    """
    if warmup_iters > 0 and step < warmup_iters:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    return max(0.0, 1.0 - step / max_iters) ** power


OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(
    param_groups: Sequence[dict],
    betas: Sequence[float],
    weight_decay: float,
    name: str = "adamw",
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The optimiser over named parameter groups (each dict has ``name``, ``params``, ``lr`` and optionally
    ``weight_decay``); every group remembers its base lr as ``initial_lr`` so :func:`set_lr` can rescale it.

    Args:
        param_groups: the groups, e.g. a model's ``param_groups(...)``.
        betas: AdamW's (beta1, beta2) (``train.betas``); unused by SGD.
        weight_decay: the default of groups that do not set their own (``train.weight_decay``).
        name: ``adamw`` (decoupled weight decay, SPEC §6) | ``sgd`` (momentum, no Nesterov, weight decay added to
            the gradient: the IRN boundary network, SPEC §9) (``train.optimizer``).
        momentum: SGD's momentum (``train.momentum``); unused by AdamW.

    Raises:
        ValueError: ``name`` is not one of :data:`OPTIMIZERS` (naming ``train.optimizer``).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    groups = []
    for group in param_groups:
        group = dict(group)
        group.setdefault("weight_decay", weight_decay)
        group["initial_lr"] = group["lr"]
        groups.append(group)
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=float(momentum), weight_decay=weight_decay, nesterov=False)
    return torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> dict[str, float]:
    """Set every group's lr to ``initial_lr * factor``; returns ``{group name: lr}`` for logging."""
    lrs = {}
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = group["initial_lr"] * factor
        lrs[group.get("name", str(index))] = group["lr"]
    return lrs
