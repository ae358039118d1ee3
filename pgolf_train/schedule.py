"""The schedules of a run, by elapsed training time (or step without a clock): the LR multiplier
(warm-up, warm-down), Muon's momentum warm-up, the budget fraction that switches EMA and QAT on."""
from __future__ import annotations

import math

import torch

from pgolf_train.config import TrainConfig
from pgolf_train.muon import Muon


def lr_multiplier(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """LR multiplier in [min_lr_frac, 1] for ``step`` at ``elapsed_ms`` of training time.

    With a time budget the warm-down is by the clock: over ``warmdown_frac`` of the budget, or
    over ``warmdown_iters`` steps converted to time by the average step so far (the baseline:
    ``remaining_ms / (warmdown_iters * avg_step_ms)`` once below 1). Without a budget it is by steps.
    """
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    budget_ms = 1000.0 * cfg.max_wallclock_seconds
    if budget_ms > 0:
        if cfg.warmdown_frac > 0:
            warmdown_ms = cfg.warmdown_frac * budget_ms
        else:
            warmdown_ms = cfg.warmdown_iters * (elapsed_ms / max(step, 1))
        remaining_ms = max(budget_ms - elapsed_ms, 0.0)
        r = remaining_ms / warmdown_ms if 0 < warmdown_ms and remaining_ms <= warmdown_ms else 1.0
    else:
        warmdown = cfg.warmdown_frac * cfg.iterations if cfg.warmdown_frac > 0 else cfg.warmdown_iters
        remaining = max(cfg.iterations - step, 0)
        r = remaining / warmdown if 0 < warmdown and remaining < warmdown else 1.0
    shape = 0.5 * (1.0 - math.cos(math.pi * r)) if cfg.schedule == "cosine" else r
    return warm * (cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * shape)


def muon_momentum(cfg: TrainConfig, step: int) -> float:
    """Muon momentum, warmed linearly from ``muon_momentum_warmup_start`` over the first steps."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def budget_fraction(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """How far the run is, in [0, 1]: by the clock with a budget, else by steps."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * cfg.max_wallclock_seconds)
    return step / max(cfg.iterations, 1)


def set_schedule(optimizers: list[torch.optim.Optimizer], muon: Muon, lr_mul: float, momentum: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mul
    for g in muon.param_groups:
        g["momentum"] = momentum
