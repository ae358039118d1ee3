"""Where a training step's GPU time goes, per config: phases, kernel categories, idle, top kernels.

    python benchmarks/profile_step.py --data DIR [--configs h200,baseline] [--set KEY=VALUE ...]
        [--steps 10] [--profile-steps 3] [--out FILE]

For each config it builds the trainer's model, optimizers and compiled graph (``--set`` applies to
all, e.g. ``fused=ce`` or ``sdpa_backend=cudnn``), warms up, then:

- phases: CUDA events around forward, backward, each optimizer's step and zero_grad over
  ``--steps`` steps (the trainer's step, split where it splits): GPU-timeline milliseconds per
  step, so a phase whose kernels wait on the CPU's launches shows that wait;
- kernels: a torch.profiler trace of ``--profile-steps`` steps; every kernel is put in one category
  by its name (matmul, attention, the compiled graph's fused Triton kernels = norms, elementwise,
  loss; Newton–Schulz is inside Muon's phase, ...) and attributed to the phase it ran in; ``idle``
  is the step's wall time with no kernel running;
- the attention kernels that ran (which SDPA backend torch picked);
- with ``--kernel-table DIR``: every compiled Triton kernel with inductor's estimate of the bytes it
  moves (``benchmark_kernel``; the graph is compiled afresh into ``DIR``, whose generated sources stay
  there to read) and the bandwidth it reached: which fused kernels are slow, which move too much.

Writes ``benchmarks/results/profile_step.json`` (``--out``): ms per step, tokens/s, MFU (as
``train_bench``), and per config the tables above.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile, record_function

from pgolf_train.build import autocast_ctx
from pgolf_train.trainer import set_schedule, synchronize
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402
from _step import setup_step  # noqa: E402
from train_bench import PEAK_FLOPS, flops_per_token  # noqa: E402

# First match wins; names are CUDA kernel names as the profiler records them.
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated|cudnn.*(fprop|dgrad|bprop)|_attn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|cublas|matmul|wgmma"),
    ("optimizer_fused", r"fused_adam|FusedAdam|multi_tensor|foreach"),
    ("compiled_triton", r"^triton_"),
    ("reduction", r"reduce_kernel|Reduce"),
    ("copy_cast", r"copy|Memcpy|Memset|cat_|CatArray|fill|elementwise_kernel|vectorized_elementwise|unrolled_elementwise"),
    ("other", r"."),
)
PHASES = ("forward", "backward", "clip", "optimizer.adam", "optimizer.muon", "zero_grad")


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def step_phased(model, optimizers, loader, cfg, accum, device, params, events=None):
    """The trainer's ``train_step`` (one process) with a CUDA event and a profiler range per phase."""
    def mark(name):
        if events is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append((name, ev))

    mark("start")
    for _ in range(accum):
        x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, accum)
        with record_function("pgolf.forward"), autocast_ctx(cfg, device):
            loss = model(x, y)
        mark("forward")
        with record_function("pgolf.backward"):
            (loss / accum).backward()
        mark("backward")
    with record_function("pgolf.clip"):
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
    mark("clip")
    for opt, name in zip(optimizers, ("optimizer.adam", "optimizer.muon")):
        with record_function("pgolf." + name):
            opt.step()
        mark(name)
    with record_function("pgolf.zero_grad"):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    mark("zero_grad")
    return loss


def phase_ms(events) -> dict[str, float]:
    out = {p: 0.0 for p in PHASES}
    for (_, a), (name, b) in zip(events, events[1:]):
        if name != "start":
            out[name] += a.elapsed_time(b)
    return out


def _phase(ranges: list[dict], ts: float) -> str:
    """The phase a kernel starting at ``ts`` ran in. The backward's kernels are launched by autograd's
    own thread, outside the main thread's ranges: a kernel after a forward range ends and before the
    next range starts is the backward's, and so is one after the backward's own range (on the GPU
    that range covers only what the main thread launched: the loss gradient's seed, a few µs)."""
    last = None
    for r in ranges:  # sorted by start
        if r["ts"] > ts:
            break
        last = r
    if last is None:
        return "unattributed"
    name = last["name"][len("pgolf."):]
    if ts < last["ts"] + last["dur"]:
        return name
    return "backward" if name in ("forward", "backward") else "unattributed"


def kernel_bytes(cache: Path) -> dict[str, float]:
    """GB moved per call of each Triton kernel inductor generated under ``cache`` (its estimate, from
    the ``kernel_num_gb`` in a kernel's metadata), by kernel name. A name generated more than once
    (two graphs) with different estimates maps to NaN: its calls cannot be told apart in a trace."""
    out: dict[str, float] = {}
    for f in cache.rglob("*.py"):
        for line in f.read_text(errors="replace").splitlines():
            name = re.search(r"'kernel_name': '(\w+)'", line)
            gb = re.search(r"'kernel_num_gb': ([0-9.eE+-]+)", line)
            if name and gb:
                v = float(gb.group(1))
                old = out.setdefault(name.group(1), v)
                if abs(old - v) > 1e-9 * max(abs(v), 1.0):
                    out[name.group(1)] = float("nan")
    return out


def trace_tables(trace: dict, steps: int, gb: dict[str, float] | None = None) -> dict:
    """Kernel time per category and per phase (ms per step), idle time, the top kernels; with ``gb``
    (``kernel_bytes``) also every compiled kernel's bytes per call and achieved bandwidth."""
    evs = trace["traceEvents"]
    kernels = [e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    ranges = [e for e in evs if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith("pgolf.")]
    if not kernels:
        return {"error": "no kernels in the trace"}
    kernels.sort(key=lambda e: e["ts"])
    ranges.sort(key=lambda e: e["ts"])
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for e in kernels:  # union of kernel intervals (one stream, but be safe)
        s, t = e["ts"], e["ts"] + e["dur"]
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += cur_e - cur_s
    by_cat: dict[str, float] = {}
    by_phase: dict[str, dict[str, float]] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        cat = category(e["name"])
        by_cat[cat] = by_cat.get(cat, 0.0) + e["dur"]
        phase = _phase(ranges, e["ts"])
        by_phase.setdefault(phase, {})[cat] = by_phase.setdefault(phase, {}).get(cat, 0.0) + e["dur"]
        rec = by_name.setdefault(e["name"], [0.0, 0, cat])
        rec[0] += e["dur"]
        rec[1] += 1
    per = 1000.0 * steps  # µs in the trace -> ms per step
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    top = ranked[:25]
    extra = {}
    if gb is not None:
        rows = []
        for n, (t, k, c) in ranked:
            if c != "compiled_triton" and n not in gb:
                continue
            g = gb.get(n)
            ok = g is not None and g == g
            rows.append({"name": n[:160], "ms_per_step": t / per, "calls_per_step": k / steps,
                         "us_per_call": t / k, "gb_per_call": g if ok else None,
                         "gb_per_s": g * k / (t / 1e6) if ok and t > 0 else None})
        known = [r for r in rows if r["gb_per_s"] is not None]
        extra = {"compiled_kernels": rows,
                 "compiled_gb_per_step": sum(r["gb_per_call"] * r["calls_per_step"] for r in known),
                 "compiled_ms_with_bytes": sum(r["ms_per_step"] for r in known)}
    return {
        "window_ms_per_step": (end - start) / per,
        "kernel_ms_per_step": busy / per,
        "idle_ms_per_step": (end - start - busy) / per,
        "kernels_per_step": len(kernels) / steps,
        "by_category_ms": {k: v / per for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "by_phase_ms": {p: {k: v / per for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
                        for p, c in by_phase.items()},
        "top_kernels": [{"name": n[:160], "category": c, "ms_per_step": t / per, "calls_per_step": k / steps}
                        for n, (t, k, c) in top],
        "attention_kernels": sorted({n[:160] for n, (_, _, c) in by_name.items() if c == "attention"}),
        **extra,
    }


def profile_config(config: str, overrides: list[str], data: str, steps: int, prof_steps: int, warmup: int,
                   kernel_dir: Path | None = None) -> dict:
    st = setup_step(config, overrides, data)
    cfg, device, accum, compiled, optimizers, loader, params = (st.cfg, st.device, st.accum, st.compiled,
                                                                st.optimizers, st.loader, st.params)
    set_schedule(optimizers, st.muon, 1.0, cfg.muon_momentum)
    with st.attention():
        t = time.perf_counter()
        for _ in range(warmup):
            step_phased(compiled, optimizers, loader, cfg, accum, device, params)
        synchronize(device)
        warm_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            step_phased(compiled, optimizers, loader, cfg, accum, device, params)
        synchronize(device)
        ms = 1000 * (time.perf_counter() - t) / steps
        events: list = []
        for _ in range(steps):
            step_phased(compiled, optimizers, loader, cfg, accum, device, params, events)
        synchronize(device)
        phases = {k: v / steps for k, v in phase_ms(events).items()}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(prof_steps):
                step_phased(compiled, optimizers, loader, cfg, accum, device, params)
            synchronize(device)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        tables = trace_tables(json.loads(path.read_text()), prof_steps,
                              kernel_bytes(kernel_dir) if kernel_dir is not None else None)
    tok_s = cfg.train_batch_tokens / (ms / 1000)
    return {"config": config, "overrides": overrides, "ms_per_step": ms, "tokens_per_s": tok_s,
            "mfu": flops_per_token(cfg) * tok_s / PEAK_FLOPS, "warmup_s": warm_s, "grad_accum": accum,
            "tokens_per_step": cfg.train_batch_tokens, "params": sum(p.numel() for p in params),
            "phases_ms": phases, "peak_mem_mib": torch.cuda.max_memory_allocated() // 2**20, **tables}


def print_profile(r: dict) -> None:
    print(f"== {r['config']} {' '.join(r['overrides'])}: {r['ms_per_step']:.1f} ms/step "
          f"{r['tokens_per_s'] / 1e6:.2f} M tok/s MFU {100 * r['mfu']:.1f}%  (warm-up {r['warmup_s']:.0f}s)")
    print("  phases (GPU timeline, ms/step): " + "  ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items()))
    if "by_category_ms" in r:
        print(f"  kernels {r['kernel_ms_per_step']:.2f} ms + idle {r['idle_ms_per_step']:.2f} ms per step, "
              f"{r['kernels_per_step']:.0f} kernels/step")
        print("  by category: " + "  ".join(f"{k} {v:.2f}" for k, v in r["by_category_ms"].items()))
        for p, cats in r["by_phase_ms"].items():
            print(f"    {p:16s} " + "  ".join(f"{k} {v:.2f}" for k, v in cats.items()))
        print("  attention kernels: " + "; ".join(r["attention_kernels"]))
        for k in r["top_kernels"][:12]:
            print(f"    {k['ms_per_step']:7.2f} ms  x{k['calls_per_step']:<5.0f} {k['category']:15s} {k['name'][:90]}")
    if "compiled_kernels" in r:
        print(f"  compiled kernels: {r['compiled_gb_per_step']:.1f} GB in {r['compiled_ms_with_bytes']:.2f} ms per step"
              " (those with an estimate)")
        for k in r["compiled_kernels"]:
            bw = "      -" if k["gb_per_s"] is None else f"{k['gb_per_s']:7.0f}"
            gbc = "     -" if k["gb_per_call"] is None else f"{1000 * k['gb_per_call']:6.0f}"
            print(f"    {k['ms_per_step']:6.2f} ms x{k['calls_per_step']:<3.0f} {gbc} MB/call {bw} GB/s  {k['name'][:100]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--configs", default="h200,baseline")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--kernel-table", type=Path, default=None, metavar="DIR",
                    help="compile afresh into DIR with inductor's byte estimates; add the compiled-kernel table")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_step.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.kernel_table is not None:  # before the first compile: every kernel generated afresh, with its bytes
        args.kernel_table.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.kernel_table.resolve())
        torch._inductor.config.benchmark_kernel = True
        torch._inductor.config.fx_graph_cache = False
        torch._inductor.config.autotune_local_cache = False
    commit = git("rev-parse", "HEAD")
    rows = []
    for config in args.configs.split(","):
        torch._dynamo.reset()
        torch.cuda.reset_peak_memory_stats()
        r = profile_config(config, args.set, args.data, args.steps, args.profile_steps, args.warmup,
                           args.kernel_table)
        rows.append(r)
        print_profile(r)
        write_json(args.out, {"command": " ".join([sys.executable, *sys.argv]),
                              "date": datetime.datetime.now().isoformat(), "device": torch.cuda.get_device_name(0),
                              "torch": torch.__version__, "git_head": commit, "peak_bf16_flops": PEAK_FLOPS,
                              "categories": {c: p for c, p in CATEGORIES}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
