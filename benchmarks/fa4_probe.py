"""FlashAttention 4's Hopper kernels (CuTe DSL, package ``flash-attn-4``) at h200's attention shape,
against cuDNN's causal kernel, the one the ``h200`` step runs (one layer, forward and backward).

    python benchmarks/fa4_probe.py [--iters 20] [--out FILE]

bf16 q [128, 1024, 8, 64], k and v [128, 1024, 4, 64] (grouped-query: 2 query heads per kv head).
Routes: ``cudnn_causal`` (SDPA, cuDNN, ``enable_gqa``), ``fa4_causal`` (``flash_attn_func``), and the
document-isolated ``fa4_varlen`` (``flash_attn_varlen_func`` over the batch cut at BOS tokens,
``pgolf_train.doc_attn.segments``, 0.35 BOS per row as the h200 training stream) against
``flash_varlen`` (``pgolf_train.doc_attn``, FlashAttention 2). Each: the first call's seconds (the
CuTe DSL compiles its kernels just in time), ms per forward and per forward + backward, and the
largest difference of output and gradients from the reference route (cuDNN causal; for varlen,
pgolf's varlen op).

The image lacks the package: its wheels (flash-attn-4, quack-kernels, nvidia-cutlass-dsl with its
libs-core, libs-base and libs-cu13, apache-tvm-ffi, torch-c-dlpack-ext) unpacked into one folder are 257 MB,
71 MB xz-compressed, more than one call may carry; they travel in two calls to a warm machine
(``benchmarks/fa4_probe.sh``).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf_train import doc_attn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cuda_ms, git, write_json  # noqa: E402
from doc_attn_bench import B, D, H, KV, T  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fa4_probe_h200.json")
    args = ap.parse_args()
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(2, 4096, (B, T), device="cuda", generator=g)
    idx[torch.rand(B, T, device="cuda", generator=g) < 0.35 / T] = 1
    cu = doc_attn.segments(idx, 1)
    q0, k0, v0 = (torch.randn(B, T, n, D, device="cuda", generator=g).bfloat16() for n in (H, KV, KV))
    do = torch.randn(B, T, H, D, device="cuda", generator=g).bfloat16()
    flat = lambda t: t.reshape(B * T, -1, D)  # noqa: E731

    def cudnn(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    routes = {
        "cudnn_causal": cudnn,
        "fa4_causal": lambda q, k, v: first(flash_attn_func(q, k, v, causal=True)),
        "flash_varlen": lambda q, k, v: doc_attn.varlen_attention(flat(q), flat(k), flat(v), cu, T, None).view(B, T, H, D),
        "fa4_varlen": lambda q, k, v: first(flash_attn_varlen_func(
            flat(q), flat(k), flat(v), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T,
            causal=True)).view(B, T, H, D),
    }
    reference = {"fa4_causal": "cudnn_causal", "fa4_varlen": "flash_varlen"}
    rows, got = [], {}
    for name, f in routes.items():
        row: dict = {"route": name}
        try:
            q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
            t0 = time.perf_counter()
            y = f(q, k, v)
            grads = torch.autograd.grad(y, (q, k, v), do)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            got[name] = (y.detach().float(), *(x.float() for x in grads))

            def fwd_bwd(f=f):
                q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
                torch.autograd.grad(f(q, k, v), (q, k, v), do)

            with torch.no_grad():
                row["fwd_ms"] = cuda_ms(lambda: f(q0, k0, v0), args.iters)
            row["fwd_bwd_ms"] = cuda_ms(fwd_bwd, args.iters)
            if name in reference and reference[name] in got:
                ref = got[reference[name]]
                row["vs"] = reference[name]
                row["max_abs_diff"] = {n: (a - b).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), got[name], ref)}
                row["rel_err"] = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(("out", "dq", "dk", "dv"), got[name], ref)}
        except Exception as e:  # recorded: the other routes still run
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        rows.append(row)
        print({k: v for k, v in row.items()}, flush=True)
    base = {r["route"]: r for r in rows}
    for r in rows:
        ref = base.get(reference.get(r["route"], ""))
        if ref and "fwd_bwd_ms" in r and "fwd_bwd_ms" in ref:
            r["fwd_bwd_ratio_vs_reference"] = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"]
            r["fwd_ratio_vs_reference"] = r["fwd_ms"] / ref["fwd_ms"]
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("flash-attn-4", "quack-kernels", "nvidia-cutlass-dsl")}
    write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
                          "code_commit": git("rev-parse", "HEAD"), "device": torch.cuda.get_device_name(0),
                          "torch": torch.__version__, "packages": versions,
                          "shape": {"B": B, "T": T, "H": H, "KV": KV, "D": D}, "segments": int(cu.numel() - 1),
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
