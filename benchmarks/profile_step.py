"""Where a training step's GPU time goes: a torch.profiler table of the baseline step.

    python benchmarks/profile_step.py --data DIR [--config baseline] [--steps 3]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from pgolf_train.config import load_config
from pgolf_train.loader import DistributedTokenLoader
from pgolf_train.trainer import (build_model, build_optimizers, compile_model, resolve_grad_accum, set_schedule,
                                 synchronize, train_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="baseline")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config, ["compile_warmup_steps=0"])
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg, device)
    compiled = compile_model(model)  # as the trainer compiles
    optimizers, muon = build_optimizers(cfg, model, device)
    loader = DistributedTokenLoader(args.data, 0, 1, device, cfg.vocab_size)
    params = list(model.parameters())
    accum = resolve_grad_accum(cfg, 1)
    set_schedule(optimizers, muon, 1.0, cfg.muon_momentum)
    for _ in range(4):
        train_step(compiled, optimizers, loader, cfg, accum, False, device, params)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            train_step(compiled, optimizers, loader, cfg, accum, False, device, params)
        synchronize(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
