"""The schedules of a run, by elapsed training time (or step without a clock): the LR multiplier
(warm-up, warm-down), Muon's momentum warm-up and weight-decay taper, the budget fraction that
switches EMA and QAT on."""
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


def muon_wd_multiplier(cfg: TrainConfig, lr_mul: float, frac: float) -> float:
    """Factor on ``muon_weight_decay`` this step, by ``muon_wd_schedule``; ``lr_mul`` is this step's
    LR multiplier, ``frac`` its :func:`budget_fraction`.

    The decay is decoupled and already lr-coupled, ``p ← p·(1 − lr·wd)`` with the *scheduled* lr,
    so "constant" (1) already shrinks the per-step decay with the warm-down, linearly in the LR
    multiplier. "lr" multiplies wd by it once more (per-step factor ``1 − base_lr·wd·mult²``);
    "linear_to_zero" takes wd linearly to 0 over the budget (``1 − frac``), as nanochat does."""
    if cfg.muon_wd_schedule == "lr":
        return lr_mul
    if cfg.muon_wd_schedule == "linear_to_zero":
        return min(max(1.0 - frac, 0.0), 1.0)
    return 1.0


def budget_fraction(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """How far the run is, in [0, 1]: by the clock with a budget, else by steps."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * cfg.max_wallclock_seconds)
    return step / max(cfg.iterations, 1)


def set_schedule(optimizers: list[torch.optim.Optimizer], muon: Muon, lr_mul: float, momentum: float,
                 wd_mul: float = 1.0) -> None:
    """lr = base_lr·lr_mul in every group; Muon's momentum; weight_decay = base_weight_decay·wd_mul in
    every group that carries ``base_weight_decay`` (Muon's, a decayed embedding's:
    :func:`pgolf_train.build.build_optimizers` sets it)."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mul
            if "base_weight_decay" in g:
                g["weight_decay"] = g["base_weight_decay"] * wd_mul
    for g in muon.param_groups:
        g["momentum"] = momentum
