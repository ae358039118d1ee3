"""Training throughput of the baseline config on one GPU: step time, tokens/s and MFU.

    python benchmarks/train_bench.py --data DIR [--steps 20] [--warmup 5] [--variants baseline,qat]
        [--config baseline] [--arm ABLATION_ARM] [--set KEY=VALUE ...] [--out FILE]

Runs the trainer's own step (``pgolf_train.trainer.train_step``: compiled model, fused Adam, Muon,
grad accumulation 8 at 524,288 tokens/step) for each variant: the baseline, with QAT on, with depth
recurrence, with a factorized embedding, compiled without exact casts (the trainer compiles with
them), with the trainer's fused kernels (``fused_*``) and with a pinned attention backend (``sdpa_*``).
A variant that cannot run is recorded with its error; ``speedup_vs_first`` is each row against the first. MFU counts 6·N·tokens (N = parameters, each recurrent
pass counted) plus causal attention 6·L·T·d per token (fwd+bwd, half of the full T² score matrix),
against 990 TFLOP/s dense bf16 (H100/H200). The challenge's starter script runs 312 ms/step on
one H200 (1.68M tokens/s); that is the ceiling compared to. Writes
``benchmarks/results/train_bench.json``.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from pgolf_train.trainer import set_schedule, synchronize
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import git, write_json  # noqa: E402
from _step import setup_step  # noqa: E402

PEAK_FLOPS = 990e12  # dense bf16, H100/H200 SXM
REFERENCE_MS = 312.0  # the starter script's step on one H200
VARIANTS = {
    "baseline": [],
    "qat": ["qat_start=0"],
    "qat_pending": ["qat_start=0.5"],   # fake-quant compiled in but not on yet
    "inexact_casts": [],  # the baseline compiled without emulate_precision_casts (the trainer's choice checked)
    "recurrence": ["loop_start=3", "loop_end=6", "loop_times=2"],
    "factorized_embed": ["embed_dim=256"],
    # the trainer's fused kernels and pinned attention backends (pgolf_train/fused.py)
    "unfused": ["fused="],  # the reference path, for a config that sets fusions (h200)
    "fused_ce": ["fused=ce"],
    "fused_rope": ["fused=rope"],
    "fused_ce_rope": ["fused=ce,rope"],
    "fused_epilogue": ["fused=ce,rope,epilogue"],
    "fused_tune": ["fused=ce,rope,tune"],
    "fused_qkv": ["fused=ce,rope,qkv"],
    "fused_qk_xsa": ["fused=ce,rope,qk,xsa"],
    "fused_qkv_qk_xsa": ["fused=ce,rope,qkv,qk,xsa"],
    "fused_mlp": ["fused=ce,rope,qkv,qk,xsa,mlp"],  # needs quack (CuTe DSL wheels: fa4_probe.sh)
    "fused_fa4": ["fused=ce,rope,qkv,qk,xsa,fa4"],  # needs flash-attn-4 (the same wheels)
    "fused_mlp_fa4": ["fused=ce,rope,qkv,qk,xsa,mlp,fa4"],
    "fused_ce_rope_flash": ["fused=ce,rope", "sdpa_backend=flash"],
    # document attention (doc_attention): SDPA with its boolean mask, and as flash varlen (fusion "varlen")
    "doc_mask": ["doc_attention=true"],
    "doc_varlen": ["doc_attention=true", "fused=ce,rope,qkv,qk,xsa,varlen"],
    "sdpa_flash": ["sdpa_backend=flash"],
    "sdpa_cudnn": ["sdpa_backend=cudnn"],
    "sdpa_efficient": ["sdpa_backend=efficient"],
}


def arm_overrides(arm: str) -> list[str]:
    """An ablation arm's overrides (``benchmarks/ablation_arms.py``) with QAT off, so that the ``baseline``
    and ``qat`` variants time that arm's model without and with fake-quant from step 0. Off explicitly:
    `h200` itself trains under QAT from step 0, so an arm that does not set it would inherit it."""
    from ablation_arms import ARMS

    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return [kv for kv in ARMS[arm] if not kv.startswith("qat_start=")] + ["qat_start=1.0"]


def flops_per_token(cfg) -> float:
    mc = cfg.model_config()
    with torch.device("meta"):
        from pgolf_train.model import GPT

        model = GPT(mc)
    n_blocks = sum(p.numel() for p in model.blocks.parameters())
    n_other = sum(p.numel() for p in model.parameters()) - n_blocks
    virtual = len(mc.layer_plan())
    n_eff = n_other + n_blocks * virtual / mc.num_layers  # a repeated block costs again
    attn = 6 * virtual * cfg.train_seq_len * mc.model_dim / 2 * 2  # QK^T and AV, causal half, fwd+bwd
    return 6 * n_eff + attn


def bench(name: str, overrides: list[str], data: str, steps: int, warmup: int, config: str = "baseline",
          device: torch.device | None = None) -> dict:
    st = setup_step(config, overrides, data, device, exact_casts=name != "inexact_casts")
    cfg, device = st.cfg, st.device
    set_schedule(st.optimizers, st.muon, 1.0, cfg.muon_momentum)
    with st.attention():  # open for the compile too: the backend is fixed when traced
        t = time.perf_counter()
        for _ in range(warmup):
            st.run()
        synchronize(device)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            loss = st.run()
        synchronize(device)
        ms = 1000 * (time.perf_counter() - t) / steps
    params = st.params
    tok_s = cfg.train_batch_tokens / (ms / 1000)
    mfu = flops_per_token(cfg) * tok_s / PEAK_FLOPS
    return {"variant": name, "config": config, "overrides": overrides, "ms_per_step": ms, "tokens_per_s": tok_s, "mfu": mfu,
            "warmup_s": compile_s, "loss": float(loss), "params": sum(p.numel() for p in params),
            "peak_mem_mib": torch.cuda.max_memory_allocated() // 2**20 if device.type == "cuda" else None,
            "vs_reference": REFERENCE_MS / ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory with fineweb_train_*.bin shards")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing (compile happens here)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--config", default="baseline", help="the config every variant starts from")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--arm", help="start every variant from this ablation arm's model (its QAT switch left to the "
                                  "variant): `--config h200 --arm lowbit_ternary --variants baseline,qat` times QAT")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "train_bench.json")
    args = ap.parse_args()
    base = arm_overrides(args.arm) if args.arm else []
    if not torch.cuda.is_available():
        print("train_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name in args.variants.split(","):
        torch._dynamo.reset()
        torch.cuda.reset_peak_memory_stats()
        try:
            r = bench(name, base + VARIANTS[name] + args.set, args.data, args.steps, args.warmup, args.config)
        except Exception as e:  # an unsupported backend, say: recorded, and the other variants still run
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"variant": name, "config": args.config, "overrides": base + VARIANTS[name] + args.set,
                         "error": f"{type(e).__name__}: {str(e)[:1000]}"})
            continue
        ok = [row for row in rows if "ms_per_step" in row]
        r["speedup_vs_first"] = ok[0]["ms_per_step"] / r["ms_per_step"] if ok else 1.0
        rows.append(r)
        print(f"{name:18s} {r['ms_per_step']:8.1f} ms/step {r['tokens_per_s'] / 1e6:6.3f} M tok/s "
              f"MFU {100 * r['mfu']:5.1f}%  warm-up {r['warmup_s']:5.1f}s  x{r['vs_reference']:.2f} vs 312 ms",
              flush=True)
        # after every variant: a run cut off by its time limit keeps what it measured
        write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
                              "code_commit": git("rev-parse", "HEAD"), "device": torch.cuda.get_device_name(0),
                              "ceiling": {"reference_ms_per_step": REFERENCE_MS, "reference_tokens_per_s": 1.68e6,
                                          "peak_bf16_flops": PEAK_FLOPS}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
