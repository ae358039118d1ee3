"""What a run assembles: the model, its optimizers (Muon for block matrices, Adam for the rest),
``torch.compile`` and bf16 autocast."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pgolf_train.config import TrainConfig
from pgolf_train.model import GPT
from pgolf_train.muon import Muon, split_params


def count_params(cfg: TrainConfig) -> int:
    """Parameter count of the config's model, without allocating it (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg.model_config()).parameters())


def build_model(cfg: TrainConfig, device: torch.device) -> GPT:
    """The GPT of ``cfg`` with fp32 master weights on ``device``, seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed)
    return GPT(cfg.model_config()).to(device)


def compile_model(model: nn.Module, exact_casts: bool = True, extra: dict | None = None) -> nn.Module:
    """``torch.compile`` of the whole model: one static-shape graph (no graph breaks allowed).

    ``exact_casts`` keeps every float32 → fp16/bf16 → float32 round trip that inductor would
    otherwise fold away as a no-op. QAT needs it: the codec rounds scales to their stored dtype,
    and without it the compiled fake-quant uses unrounded scales, so nearly every weight differs
    from what the artifact will hold. The trainer always compiles with it, QAT or not: on the H200
    the `h200` step was faster with it, not slower (283 vs 299 ms in `train_bench`, same machine;
    272 vs 294 ms before the QAT switch in the H200-300 runs, `results/h200_variants.json`).
    ``extra``: more inductor options (``pgolf_train.fused.compile_options``).
    """
    options = {**({"emulate_precision_casts": True} if exact_casts else {}), **(extra or {})}
    return torch.compile(model, dynamic=False, fullgraph=True, options=options or None)


def build_optimizers(cfg: TrainConfig, model: GPT, device: torch.device) -> tuple[list[torch.optim.Optimizer], Muon]:
    """Adam for the embedding/head/scalars and Muon for the block matrices, as the baseline splits them.

    Every param group carries ``base_lr``; the loop sets ``lr = base_lr * lr_mul``. Muon's group also
    carries ``base_weight_decay``, and so does the embedding's with ``embed_weight_decay > 0`` (then
    AdamW, whose decay is decoupled like Muon's, p ← p·(1 − lr·wd); the other Adam groups at wd 0);
    the loop sets ``weight_decay = base_weight_decay * wd_mul``.
    """
    groups = split_params(model)
    fused = device.type == "cuda"  # fused Adam: one kernel per step instead of one per tensor
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused, foreach=None if fused else True)
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    adam_groups = [
        {"params": groups["embed"], "lr": embed_lr, "base_lr": embed_lr},
        {"params": groups["scalar"], "lr": cfg.scalar_lr, "base_lr": cfg.scalar_lr},
        {"params": groups["head"], "lr": cfg.head_lr, "base_lr": cfg.head_lr},
    ]
    adam_cls = torch.optim.Adam  # without a decay the optimizer (and its arithmetic) is the baseline's
    if cfg.embed_weight_decay > 0:
        adam_cls = torch.optim.AdamW
        for g in adam_groups:
            g["weight_decay"] = 0.0
        adam_groups[0].update(weight_decay=cfg.embed_weight_decay, base_weight_decay=cfg.embed_weight_decay)
    adam = adam_cls([g for g in adam_groups if g["params"]], **adam_kw)
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum_warmup_start,
                backend_steps=cfg.muon_backend_steps, weight_decay=cfg.muon_weight_decay,
                row_normalize=cfg.muon_row_normalize, ns_coeffs=cfg.muon_ns_coeffs)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
        g["base_weight_decay"] = cfg.muon_weight_decay  # set_schedule: weight_decay = base · wd multiplier
    return [adam, muon], muon


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
