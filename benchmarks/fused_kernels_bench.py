"""The fused kernels one by one at ``h200``'s shapes on one GPU, each against the path it replaces.

    python benchmarks/fused_kernels_bench.py [--tokens 131072] [--out FILE]

Rows (ms, median of CUDA-event timings after a warm-up; every path under ``torch.compile`` as the
trainer runs it, the bf16 reference first):

- ``linear N×K``: a block matrix's forward + backward (input and weight gradients), bf16 against
  ``fused=fp8`` (e4m3 forward and input gradient, the casts included);
- ``mlp``: the MLP (up projection, LeakyReLU(0.5)², down projection) forward + backward, compiled
  torch against ``fused=mlp``, once per tile shape of its Triton kernel (``fused.MM_ACT_TILES``);
- ``mm_act``: the kernel alone (forward epilogue) against cuBLAS's matmul alone.

``ratio`` is reference / fused (> 1: the fusion is faster). Writes
``benchmarks/results/fused_kernels_bench.json``.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pgolf_train import fused
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402

# (BM, BN, BK, warps, stages, programs per SM; 0 = a program per tile): fewer stages leave shared
# memory for a second program per SM, whose main loop can overlap this one's epilogue (K = 512 is
# only 8 steps of BK = 64); a persistent grid overlaps them within one program
TILES = [(128, 128, 64, 8, 3, 0), (128, 128, 64, 4, 3, 0), (128, 128, 64, 8, 4, 1), (128, 128, 64, 8, 3, 2),
         (128, 256, 64, 8, 3, 0), (128, 256, 64, 8, 3, 1), (256, 128, 64, 8, 3, 1), (128, 64, 64, 4, 4, 0),
         (128, 128, 64, 4, 4, 2)]


def cuda_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls, each timed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def fwd_bwd(f, x, *ws):
    """A closure running f(x, *ws) forward and backward with a fixed upstream gradient."""
    x = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in ws]
    g = None

    def run():
        nonlocal g
        for t in (x, *ws):
            t.grad = None
        y = f(x, *ws)
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--parts", default="linear,mlp", help="which rows: linear (fp8), mlp")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fused_kernels_bench.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fused_kernels_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    M, D, H = args.tokens, args.dim, args.hidden
    torch.manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    rows = []

    def record(name, ref_ms, fused_ms, **extra):
        rows.append({"name": name, "reference_ms": ref_ms, "fused_ms": fused_ms, "ratio": ref_ms / fused_ms, **extra})
        print(f"{name:34s} reference {ref_ms:7.3f} ms  fused {fused_ms:7.3f} ms  x{ref_ms / fused_ms:.3f}", flush=True)
        write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
                              "code_commit": git("rev-parse", "HEAD"), "device": torch.cuda.get_device_name(0),
                              "torch": torch.__version__, "tokens": M, "dim": D, "hidden": H, "rows": rows})

    bf16_linear = torch.compile(lambda a, w: F.linear(a, w))
    fp8_linear = torch.compile(lambda a, w: fused.fp8_linear(a, w))
    for n, k in [(D, D), (D // 2, D), (H, D), (D, H)] if "linear" in args.parts else []:
        a = x if k == D else torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        record(f"linear {n}x{k} fwd+bwd (fp8)", cuda_ms(fwd_bwd(bf16_linear, a, w)), cuda_ms(fwd_bwd(fp8_linear, a, w)))
        with torch.no_grad():
            bf16_ms = cuda_ms(lambda: bf16_linear(a, w))
            record(f"linear {n}x{k} fwd (fp8)", bf16_ms, cuda_ms(lambda: fp8_linear(a, w)))
            # where fp8's time goes: the cast of the activation, and the GEMM alone with per-row or
            # per-tensor scales
            rows_fp8 = torch.compile(fused._rows_fp8)
            record(f"linear {n}x{k} fwd vs cast of x", bf16_ms, cuda_ms(lambda: rows_fp8(a)))
            (aq, sa), (wq, sw) = rows_fp8(a), rows_fp8(w)
            record(f"linear {n}x{k} fwd vs rowwise mm", bf16_ms, cuda_ms(
                lambda: torch._scaled_mm(aq, wq.t(), scale_a=sa, scale_b=sw.t(), out_dtype=torch.bfloat16)))
            one = torch.ones((), device="cuda")
            record(f"linear {n}x{k} fwd vs tensorwise mm", bf16_ms, cuda_ms(
                lambda: torch._scaled_mm(aq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)))

    if "mlp" not in args.parts:
        return 0
    w_fc = torch.randn(H, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
    w_proj = torch.randn(D, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    ref_mlp = torch.compile(lambda a, wf, wp: F.linear(F.leaky_relu(F.linear(a, wf), 0.5).square(), wp))
    ref_ms = cuda_ms(fwd_bwd(ref_mlp, x, w_fc, w_proj))
    mm_ms = cuda_ms(lambda: x @ w_fc.t())
    default = fused.MM_ACT_TILES
    for tiles in TILES:
        fused.MM_ACT_TILES = tiles
        torch._dynamo.reset()
        try:
            f = torch.compile(lambda a, wf, wp: fused.fused_mlp(a, wf, wp, True))
            record(f"mlp fwd+bwd tiles {tiles}", ref_ms, cuda_ms(fwd_bwd(f, x, w_fc, w_proj)), tiles=list(tiles))
            record(f"mm_act fwd vs mm tiles {tiles}", mm_ms,
                   cuda_ms(lambda: fused._mm_act(x, w_fc.t(), None, True)), tiles=list(tiles))
        except Exception as e:  # a tile shape that does not fit the GPU's shared memory, say
            print(f"tiles {tiles}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append({"name": f"mlp tiles {tiles}", "tiles": list(tiles), "error": f"{type(e).__name__}: {str(e)[:500]}"})
    fused.MM_ACT_TILES = default
    return 0


if __name__ == "__main__":
    sys.exit(main())
