"""Causal attention's forward + backward at a config's training shape, per SDPA backend and GQA route.

    python benchmarks/attention_bench.py [--config h200] [--iters 20] [--out FILE]

The model calls ``scaled_dot_product_attention(..., enable_gqa=True)`` with fewer K/V heads than
query heads. A backend then either handles the groups itself or torch expands K/V and sums their
gradients around it; the alternative is to expand K/V explicitly (``repeat_interleave``, query head h
reads K/V head h // group, as ``enable_gqa`` does). Each route runs compiled, as the trainer's graph
runs it, on bf16 q [B, H, T, D], k, v [B, KV, T, D] with the config's B = train_batch_tokens /
train_seq_len; reports ms per forward and per forward + backward, the ratio to cuDNN with
``enable_gqa``, and each route's largest deviation from it (output and the three gradients).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf_train.config import load_config
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cuda_ms, git, write_json  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attend(q, k, v, expand: bool):
    if expand:
        g = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="h200")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "attention_bench.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = load_config(args.config, [])
    B, T = cfg.train_batch_tokens // cfg.train_seq_len, cfg.train_seq_len
    H, KV = cfg.num_heads, cfg.num_kv_heads
    D = cfg.model_dim // H
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops_fwd = 4 * B * H * T * T * D / 2  # causal: half the square, QK^T and PV
    rows, ref = [], None
    for backend in ("cudnn", "flash"):
        for expand in (False, True):
            name = f"{backend}_{'repeat' if expand else 'gqa'}"
            try:
                with sdpa_kernel([BACKENDS[backend]]):
                    fn = torch.compile(lambda a, b, c, e=expand: attend(a, b, c, e), dynamic=False)
                    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

                    def fwd():
                        with torch.no_grad():
                            return fn(q, k, v)

                    def fwd_bwd():
                        qq.grad = kk.grad = vv.grad = None
                        y = fn(qq, kk, vv)
                        y.backward(dy)
                        return y

                    y = fwd_bwd()
                    outs = [y.detach(), qq.grad, kk.grad, vv.grad]
                    f_ms, fb_ms = cuda_ms(fwd, args.iters), cuda_ms(fwd_bwd, args.iters)
            except Exception as e:  # a backend this build or shape lacks: say so, go on
                rows.append({"route": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"{name:14s} failed: {rows[-1]['error']}")
                continue
            if ref is None:
                ref = outs
            dev = [float((a.float() - b.float()).abs().max()) for a, b in zip(outs, ref)]
            rows.append({"route": name, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "bwd_ms": fb_ms - f_ms,
                         "fwd_tflops": flops_fwd / f_ms / 1e9, "fwd_bwd_tflops": 3.5 * flops_fwd / fb_ms / 1e9,
                         "max_dev_vs_first": dict(zip(("y", "dq", "dk", "dv"), dev))})
            torch._dynamo.reset()
    base = next((r for r in rows if "fwd_bwd_ms" in r), None)
    print(f"B={B} H={H} KV={KV} T={T} D={D}, causal, bf16, compiled")
    print(f"{'route':14s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'vs first':>8s}  max dev (y, dq, dk, dv)")
    for r in rows:
        if "fwd_bwd_ms" in r:
            r["fwd_bwd_speedup_vs_first"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            d = r["max_dev_vs_first"]
            print(f"{r['route']:14s} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_speedup_vs_first']:8.3f}  "
                  + " ".join(f"{d[x]:.3g}" for x in ("y", "dq", "dk", "dv")))
    write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
                          "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "git_head": git("rev-parse", "HEAD"), "shape": {"B": B, "H": H, "KV": KV, "T": T, "D": D},
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
