"""The trainer's step assembled for a benchmark: config, model, fused kernels, compile, optimizers, data.

Shared by ``train_bench.py``, ``profile_step.py`` and ``fused_loss_check.py`` so each times exactly
what ``pgolf_train.trainer.train`` runs (one process, no warm-up restore, no clock)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pgolf_train.config import TrainConfig, load_config, load_recipe
from pgolf_train.fused import apply_fusions, compile_options, dynamo_context, sdpa_context
from pgolf_train.loader import DistributedTokenLoader
from pgolf_train.qat import set_qat
from pgolf_train.trainer import build_model, build_optimizers, compile_model, resolve_grad_accum, train_step


@dataclass
class Step:
    cfg: TrainConfig
    device: torch.device
    accum: int
    model: torch.nn.Module  # the plain model (its parameters)
    compiled: torch.nn.Module  # what the step calls
    optimizers: list
    muon: object
    loader: DistributedTokenLoader
    params: list

    def run(self) -> torch.Tensor:
        """One optimizer step, as the trainer takes it; the mean loss (a device scalar)."""
        return train_step(self.compiled, self.optimizers, self.loader, self.cfg, self.accum, False, self.device,
                          self.params)

    def attention(self) -> contextlib.AbstractContextManager:
        """The context the steps (and the compile) must run in: the config's pinned SDPA backend and
        the compiler settings its fusions need."""
        stack = contextlib.ExitStack()
        stack.enter_context(sdpa_context(self.cfg.sdpa_backend))
        stack.enter_context(dynamo_context(self.cfg.fused))
        return stack


def setup_step(config: str, overrides: list[str], data: str, device: torch.device | None = None,
               exact_casts: bool = True) -> Step:
    """``config`` + ``overrides`` (no warm-up steps) on ``device`` (default the first GPU), reading ``data``."""
    cfg = load_config(config, overrides + ["compile_warmup_steps=0"])
    device = device or torch.device("cuda", 0)
    model = build_model(cfg, device)
    apply_fusions(model, cfg.fused, cfg.train_seq_len, device)
    compiled = compile_model(model, exact_casts=exact_casts, extra=compile_options(cfg.fused)) if cfg.compile else model
    optimizers, muon = build_optimizers(cfg, model, device)
    if cfg.qat_start == 0:
        set_qat(model, load_recipe(cfg.recipe), True)
    loader = DistributedTokenLoader(data, 0, 1, device, cfg.vocab_size)
    return Step(cfg, device, resolve_grad_accum(cfg, 1), model, compiled, optimizers, muon, loader,
                list(model.parameters()))
