"""Optimiser and learning-rate schedule (SPEC §6). The learning rate is a pure function of the step."""

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


def build_optimizer(param_groups: Sequence[dict], betas: Sequence[float], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over named parameter groups (each dict has ``name``, ``params``, ``lr`` and optionally
    ``weight_decay``); every group remembers its base lr as ``initial_lr`` so :func:`set_lr` can rescale it."""
    groups = []
    for group in param_groups:
        group = dict(group)
        group.setdefault("weight_decay", weight_decay)
        group["initial_lr"] = group["lr"]
        groups.append(group)
    return torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> dict[str, float]:
    """Set every group's lr to ``initial_lr * factor``; returns ``{group name: lr}`` for logging."""
    lrs = {}
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = group["initial_lr"] * factor
        lrs[group.get("name", str(index))] = group["lr"]
    return lrs
