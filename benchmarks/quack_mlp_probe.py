"""The MLP with its activation in the GEMM epilogues (quack's ``mlp_func``, CuTe DSL) against the
trainer's compiled MLP (cuBLAS GEMMs + inductor's activation kernels) at h200's shape, one layer.

    python benchmarks/quack_mlp_probe.py [--iters 20] [--out FILE]

x [131,072, 512] bf16 (one h200 step's tokens), W1 [1,536, 512], W2 [512, 1,536]: y = act(x W1ᵀ) W2ᵀ,
forward and backward (dx, dW1, dW2). quack has ``relu_sq`` (relu²) but not LeakyReLU(0.5)², h200's
activation; the torch routes time both, so the epilogue's gain is read on relu² against relu², and
leaky against relu² shows what the activation itself costs; ``torch_no_activation`` (the same six GEMMs
with nothing between them) bounds what putting the activation into the epilogues can gain. ``tuned=False``: quack's default tile
configuration (its autotuner would take minutes on the first call). Carried as fa4_probe.sh says
(the same wheels); run by ``STAGE=b PROBE=benchmarks/quack_mlp_probe.py``.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cuda_ms, git, write_json  # noqa: E402

N, C, HID = 131072, 512, 1536


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quack_mlp_probe_h200.json")
    args = ap.parse_args()
    from quack.mlp import mlp_func

    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(N, C, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(HID, C, device="cuda", generator=g) * C ** -0.5).bfloat16()
    w2 = (torch.randn(C, HID, device="cuda", generator=g) * HID ** -0.5).bfloat16()
    dy = torch.randn(N, C, device="cuda", generator=g).bfloat16()

    def torch_mlp(act):
        @torch.compile(fullgraph=True, dynamic=False)
        def f(x, a, b):
            return F.linear(act(F.linear(x, a)), b)
        return f

    routes = {
        "torch_no_activation": torch_mlp(lambda h: h),  # the six GEMMs alone: what any epilogue fusion can reach
        "torch_relu2": torch_mlp(lambda h: F.relu(h).square()),
        "torch_leaky_relu2": torch_mlp(lambda h: F.leaky_relu(h, 0.5).square()),
        "quack_relu_sq": lambda x, a, b: mlp_func(x, a, b, activation="relu_sq", tuned=False),
    }
    rows, got = [], {}
    for name, f in routes.items():
        row: dict = {"route": name}
        try:
            x, a, b = (t.detach().requires_grad_() for t in (x0, w1, w2))
            t0 = time.perf_counter()
            y = f(x, a, b)
            grads = torch.autograd.grad(y, (x, a, b), dy)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            got[name] = (y.detach().float(), *(t.float() for t in grads))

            def fwd_bwd(f=f):
                x, a, b = (t.detach().requires_grad_() for t in (x0, w1, w2))
                torch.autograd.grad(f(x, a, b), (x, a, b), dy)

            with torch.no_grad():
                row["fwd_ms"] = cuda_ms(lambda: f(x0, w1, w2), args.iters)
            row["fwd_bwd_ms"] = cuda_ms(fwd_bwd, args.iters)
            if name == "quack_relu_sq" and "torch_relu2" in got:
                row["rel_err_vs_torch_relu2"] = {n: ((p - q).norm() / q.norm()).item() for n, p, q in
                                                 zip(("y", "dx", "dw1", "dw2"), got[name], got["torch_relu2"])}
        except Exception as e:  # recorded: the other routes still run
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        rows.append(row)
        print(row, flush=True)
    base = {r["route"]: r for r in rows}
    for r in rows:
        if "fwd_bwd_ms" in r and "fwd_bwd_ms" in base.get("torch_relu2", {}):
            r["fwd_bwd_ratio_vs_torch_relu2"] = r["fwd_bwd_ms"] / base["torch_relu2"]["fwd_bwd_ms"]
    import importlib.metadata as md

    write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
                          "code_commit": git("rev-parse", "HEAD"), "device": torch.cuda.get_device_name(0),
                          "torch": torch.__version__,
                          "packages": {p: md.version(p) for p in ("quack-kernels", "nvidia-cutlass-dsl")},
                          "shape": {"tokens": N, "dim": C, "hidden": HID}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
