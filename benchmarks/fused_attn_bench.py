"""The attention kernels' launch settings (``pgolf_train.fused_attn.LAUNCH``) at the h200 shapes, on a GPU.

    python benchmarks/fused_attn_bench.py --out results/fused_attn_bench_h200.json [--data DIR --steps 10 --rounds 3]

1. Each kernel at the shapes of one h200 layer (131,072 tokens; q [B, T, 8, 64] and k [B, T, 4, 64]
   read in place from one q/k/v projection output, the attention output [B, 8, T, 64], v [B, 4, T, 64])
   under every (rows per program, warps) of a grid: µs per call (calls issued back to back), the GB/s
   of the bytes the kernel must move, and its outputs compared bit for bit with those under ``LAUNCH``
   as it is. A setting can change bits: the layout splits a row over more or fewer threads, which
   reorders the row's sums; only bit-equal settings are candidates.
2. With ``--data``: the trainer's ``h200`` step (``benchmarks/_step.py``) timed with ``LAUNCH`` as it is
   and with each kernel's fastest setting, alternated over rounds. One compiled graph serves both: the
   kernels are opaque custom ops that read ``LAUNCH`` at every call.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from pgolf_train import fused_attn as fa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402

ROWS = (16, 32, 64, 128)
WARPS = (2, 4, 8)


def _time(fn, reps: int = 30, blocks: int = 5) -> float:
    """µs per call of ``fn()``: the median over ``blocks`` CUDA-event timings of ``reps`` calls issued
    back to back, so the GPU's queue stays full and the host's launch latency is not timed."""
    fn(), fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(blocks):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(out)


def _cases(B: int, T: int, H: int, KV: int, D: int, half: int, dev: str = "cuda") -> dict[str, list]:
    """kernel name -> [(label, call, bytes moved)]: the calls one layer makes, inputs as the step lays them out."""
    dev, bf = torch.device(dev), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * KV) * D, device=dev, dtype=bf, generator=g)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D : (H + KV) * D].view(B, T, KV, D)
    v = qkv[..., (H + KV) * D :].view(B, T, KV, D).transpose(1, 2)
    pos = torch.arange(T, device=dev, dtype=torch.float32)[:, None]
    inv = 10000.0 ** (-torch.arange(half, device=dev, dtype=torch.float32) / half)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)
    gain = torch.full((H,), 1.5, device=dev)
    y = torch.randn(B, T, H, D, device=dev, dtype=bf, generator=g).transpose(1, 2)  # SDPA's output layout
    do_q = torch.randn(B, T, H, D, device=dev, dtype=bf, generator=g)
    do_k = torch.randn(B, T, KV, D, device=dev, dtype=bf, generator=g)
    do_o = torch.randn(B, T, H, D, device=dev, dtype=bf, generator=g)
    _, rq = fa._qk_op(q, cos, sin, gain)
    _, rk = fa._qk_op(k, cos, sin, None)
    n, e = B * T * D * 2, B * T * 4  # bytes of one head's bf16 rows; of one float32 per row
    return {
        "qk_fwd": [("q", lambda: fa._qk_op(q, cos, sin, gain), 2 * H * n + H * e),
                   ("k", lambda: fa._qk_op(k, cos, sin, None), 2 * KV * n + KV * e)],
        "qk_bwd": [("q", lambda: fa._qk_bwd_op(do_q, q, cos, sin, gain, rq), 3 * H * n + 2 * H * e),
                   ("k", lambda: fa._qk_bwd_op(do_k, k, cos, sin, None, rk), 3 * KV * n + KV * e)],
        "xsa_fwd": [("", lambda: fa._xsa_op(y, v), 2 * H * n + KV * n)],
        "xsa_bwd": [("", lambda: fa._xsa_bwd_op(do_o, y, v), 3 * H * n + 2 * KV * n)],
    }


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def sweep(B: int = 128, T: int = 1024, H: int = 8, KV: int = 4, D: int = 64, half: int = 32, dev: str = "cuda") -> dict:
    cases = _cases(B, T, H, KV, D, half, dev)
    base = dict(fa.LAUNCH)
    ref = {name: [_flat(call()) for _, call, _ in cs] for name, cs in cases.items()}
    rows = []
    for name, cs in cases.items():
        for r, w in itertools.product(ROWS, WARPS):
            fa.LAUNCH[name] = (r, w)
            try:
                same = all(all(torch.equal(a, b) for a, b in zip(_flat(call()), want))
                           for (_, call, _), want in zip(cs, ref[name]))
                parts = [(label, _time(call), nbytes) for label, call, nbytes in cs]
            except Exception as e:  # a setting the compiler refuses: recorded, the others still run
                rows.append({"kernel": name, "rows": r, "warps": w, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            finally:
                fa.LAUNCH[name] = base[name]
            us = sum(p[1] for p in parts)
            rows.append({"kernel": name, "rows": r, "warps": w, "us": round(us, 2), "bit_equal": same,
                         "parts": {lab or name: {"us": round(t, 2), "gb_per_s": round(nb / t / 1e3, 1)}
                                   for lab, t, nb in parts}})
            print(f"{name:8} rows {r:4} warps {w}: {us:8.1f} us  " +
                  "  ".join(f"{lab or name} {nb / t / 1e3:6.0f} GB/s" for lab, t, nb in parts) +
                  ("" if same else "  OUTPUT DIFFERS"), flush=True)
    best, now, fast = {}, {}, {}
    for name in cases:
        ok = [x for x in rows if x["kernel"] == name and x.get("bit_equal")]
        b = min(ok, key=lambda x: x["us"])
        cur = next(x for x in ok if (x["rows"], x["warps"]) == base[name])
        best[name], now[name], fast[name] = (b["rows"], b["warps"]), cur["us"], b["us"]
        print(f"{name}: LAUNCH {base[name]} {cur['us']:.1f} us -> fastest {best[name]} {b['us']:.1f} us "
              f"({cur['us'] / b['us']:.3f}x)", flush=True)
    return {"shapes": {"B": B, "T": T, "H": H, "KV": KV, "D": D, "rope_half": half}, "launch": base,
            "rows": rows, "fastest": best,
            "per_layer_us": {"launch": round(sum(now.values()), 1), "fastest": round(sum(fast.values()), 1)}}


def step_ab(data: str, launches: dict[str, dict], steps: int, rounds: int) -> dict:
    """ms/step of the h200 step under each named LAUNCH table, alternated over ``rounds``."""
    from _step import setup_step

    from pgolf_train.trainer import set_schedule

    s = setup_step("h200", [], data)
    set_schedule(s.optimizers, s.muon, 1.0, s.cfg.muon_momentum)  # as train_bench times it
    base = dict(fa.LAUNCH)
    times: dict[str, list[float]] = {k: [] for k in launches}
    with s.attention():
        t0 = time.perf_counter()
        for _ in range(5):  # the compile, and a few steps under each table
            s.run()
        for table in launches.values():
            fa.LAUNCH.update(table)
            s.run()
        torch.cuda.synchronize()
        print(f"compile + warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        for i in range(rounds):
            for name, table in launches.items():
                fa.LAUNCH.update(base)
                fa.LAUNCH.update(table)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(steps):
                    loss = s.run()
                loss.item()
                times[name].append((time.perf_counter() - t) / steps * 1e3)
                print(f"round {i}: {name} {times[name][-1]:.2f} ms/step", flush=True)
    fa.LAUNCH.update(base)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": "h200", "steps_per_round": steps, "rounds": rounds, "ms_per_step": times,
            "median_ms": {k: round(v, 3) for k, v in med.items()},
            "tables": {k: {**base, **v} for k, v in launches.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default=None, help="shards for the step timing (h200's vocabulary); without it, kernels only")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    res = {"what": "fused_attn.LAUNCH settings at the h200 shapes: each kernel alone, then the h200 step",
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv), "git_head": git("rev-parse", "--short", "HEAD"),
           "kernels": sweep()}
    write_json(args.out, res)
    if args.data:
        fastest = {k: tuple(v) for k, v in res["kernels"]["fastest"].items()}
        res["step"] = step_ab(args.data, {"launch": {}, "fastest": fastest}, args.steps, args.rounds)
        m = res["step"]["median_ms"]
        res["step"]["ratio"] = round(m["launch"] / m["fastest"], 4)
        print(f"h200 step: LAUNCH {m['launch']:.2f} ms, fastest {m['fastest']:.2f} ms ({res['step']['ratio']:.3f}x)")
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
