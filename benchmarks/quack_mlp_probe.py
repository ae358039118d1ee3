"""The MLP with its activation in the GEMM epilogues (quack's ``mlp_func``, CuTe DSL) against the
trainer's compiled MLP (cuBLAS GEMMs + inductor's activation kernels) at h200's shape, one layer.

    python benchmarks/quack_mlp_probe.py [--iters 20] [--out FILE]

x [131,072, 512] bf16 (one h200 step's tokens), W1 [1,536, 512], W2 [512, 1,536]: y = act(x W1ᵀ) W2ᵀ,
forward and backward (dx, dW1, dW2). quack has ``relu_sq`` (relu²); h200's LeakyReLU(0.5)² is added to
its tables by ``pgolf_train.fused_mlp``. ``torch_no_activation`` (the same six GEMMs with nothing
between them) bounds what putting the activation into the epilogues can gain. ``tuned=False``:
quack's default tile configuration; ``--tuned`` adds a route through its autotuner (minutes on the
first call). ``_compiled`` routes run the quack MLP inside ``torch.compile(fullgraph=True)``, as the
trainer's model would. The JSON is rewritten after every route, so a timeout keeps what ran.
Carried as fa4_probe.sh says (the same wheels); run by ``STAGE=b PROBE=benchmarks/quack_mlp_probe.py``.
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
    ap.add_argument("--tuned", action="store_true", help="also time quack's autotuned configuration")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quack_mlp_probe_h200.json")
    args = ap.parse_args()
    from pgolf_train.fused_mlp import QUACK_ACT, _mlp_func

    mlp_func, leaky = _mlp_func(), QUACK_ACT[True]  # quack's, with LeakyReLU² registered

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
        "quack_leaky_relu_sq": lambda x, a, b: mlp_func(x, a, b, activation=leaky, tuned=False),
        "quack_leaky_relu_sq_compiled": torch.compile(
            lambda x, a, b: mlp_func(x, a, b, activation=leaky, tuned=False), fullgraph=True, dynamic=False),
    }
    if args.tuned:
        routes["quack_leaky_relu_sq_tuned"] = lambda x, a, b: mlp_func(x, a, b, activation=leaky, tuned=True)
    ref_of = {"quack_relu_sq": "torch_relu2"}  # each quack route's torch reference (the rest: leaky)
    import importlib.metadata as md

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
            ref = ref_of.get(name, "torch_leaky_relu2")
            if name.startswith("quack") and ref in got:
                row[f"rel_err_vs_{ref}"] = {n: ((p - q).norm() / q.norm()).item() for n, p, q in
                                            zip(("y", "dx", "dw1", "dw2"), got[name], got[ref])}
        except Exception as e:  # recorded: the other routes still run
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        rows.append(row)
        print(row, flush=True)
        base = {r["route"]: r for r in rows}
        for r in rows:
            for ref in ("torch_relu2", "torch_leaky_relu2"):
                if "fwd_bwd_ms" in r and "fwd_bwd_ms" in base.get(ref, {}):
                    r[f"fwd_bwd_ratio_vs_{ref}"] = r["fwd_bwd_ms"] / base[ref]["fwd_bwd_ms"]
        write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]),
                              "date": datetime.datetime.now().isoformat(),
                              "code_commit": git("rev-parse", "HEAD"), "device": torch.cuda.get_device_name(0),
                              "torch": torch.__version__,
                              "packages": {p: md.version(p) for p in ("quack-kernels", "nvidia-cutlass-dsl")},
                              "shape": {"tokens": N, "dim": C, "hidden": HID}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
