"""Where `pgolf quantize` (GPTQ + the bit allocator, what `pgolf run --set quantize_budget=N` runs
after training) spends its time: `quantize_checkpoint` on a checkpoint, with every phase timed.

    python3 benchmarks/alloc_profile.py CHECKPOINT --data DIR --tokenizer MODEL --budget BYTES
        [--val-tokens N] [--device cpu] [--artifact OUT.pgolf] [--cprofile OUT.prof] [--out FILE]

Phases are timed by wrapping the functions `quantize_checkpoint` calls (exclusive time: a phase
timed inside another is subtracted from it): loading, calibration (Hessian forward passes), the
GPTQ sweeps (all specs of a tensor in one stacked sweep), round-to-nearest candidates, Hessian
errors, candidate sizes (`encoded_size`: every stream coded as the container would, "auto" =
best of the coders), the sensitivity probes (forward passes of the probe batch), artifact
builds, the allocator's search, and the two validation scores. The rest of a phase's caller is
"other". `--artifact` writes the artifact bytes (to compare before/after a change); the JSON
records their sha256.
Writes ``benchmarks/results/alloc_profile_cpu.json`` by default.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Phases:
    """Exclusive wall time and call counts of wrapped functions (nesting-aware, per thread: a
    phase run in the codec's worker threads is counted in worker seconds, which overlap the main
    thread's; its name gets a " [workers]" suffix)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.local = threading.local()
        self.lock = threading.Lock()
        self.main = threading.get_ident()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack = self.local.__dict__.setdefault("stack", [])  # [name, child seconds]
            stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                _, child = stack.pop()
                key = name if threading.get_ident() == self.main else f"{name} [workers]"
                with self.lock:
                    self.seconds[key] = self.seconds.get(key, 0.0) + dt - child
                    self.calls[key] = self.calls.get(key, 0) + 1
                if stack:
                    stack[-1][1] += dt
        return timed

    def patch(self, module, attr: str, name: str | None = None) -> None:
        setattr(module, attr, self.wrap(name or attr, getattr(module, attr)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--artifact", help="write the artifact bytes here")
    ap.add_argument("--cprofile", help="also write a cProfile dump here")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alloc_profile_cpu.json"))
    args = ap.parse_args(argv)

    import torch

    import pgolf_train.calibrate as calibrate_mod
    import pgolf_train.quantize as qmod
    from pgolf_eval.scorer import Scorer

    ph = Phases()
    for attr, name in [("load_checkpoint_weights", "load_checkpoint"), ("fixed_bytes", "fixed_bytes"),
                       ("gptq_quantize_many", "gptq_sweeps"), ("quantize", "rtn_quantize"),
                       ("dequantize", "dequantize"), ("hessian_error", "hessian_error"),
                       ("encoded_size", "candidate_sizes (encoded_size)"), ("build_artifact", "build_artifact"),
                       ("allocate", "allocate (search)"), ("_probe_loss", "sensitivity probes (forward)"),
                       ("model_from_artifact_bytes", "decode artifact -> model"),
                       ("build_candidates", "build_candidates other"),
                       *([("_sizes_done", "candidate sizes (main thread waits)")] if hasattr(qmod, "_sizes_done") else []),
                       ("_scale_by_sensitivity", "sensitivity other"), ("quantize_model", "quantize_model other")]:
        ph.patch(qmod, attr, name)
    ph.patch(calibrate_mod, "calibrate", "calibration (Hessian forward passes)")
    ph.patch(calibrate_mod, "shard_batches", "probe batch read")
    scorer = Scorer()
    scorer.load_val = ph.wrap("val load", scorer.load_val)
    scorer.score = ph.wrap("val score (artifact)", scorer.score)

    torch.manual_seed(0)
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    res = qmod.quantize_checkpoint(args.checkpoint, args.data, args.tokenizer, args.budget,
                                   qmod.QuantizeOptions(), val_tokens=args.val_tokens, device=args.device,
                                   bpb_before=0.0, scorer=scorer)
    if prof:
        prof.disable()
        prof.dump_stats(args.cprofile)
    total = time.perf_counter() - t0
    if args.artifact:
        Path(args.artifact).write_bytes(res.data)
    state, cfg = qmod.load_checkpoint_weights(args.checkpoint)
    matrices = [k for k, v in state.items() if v.dim() == 2]
    opts = qmod.QuantizeOptions()
    n_specs = len(opts.bits) * len(opts.clips)
    phases = {k: {"seconds": round(v, 2), "calls": ph.calls[k], "share_of_wall": round(v / total, 3)}
              for k, v in sorted(ph.seconds.items(), key=lambda kv: -kv[1])}
    result = {
        "benchmark": "alloc_profile",
        "command": "python3 " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
        "code_commit": git("rev-parse", "--short", "HEAD"),
        "code_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.date.today().isoformat(),
        "device": "CPU",
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine()},
        "model": {"num_layers": cfg.num_layers, "model_dim": cfg.model_dim, "mlp_mult": cfg.mlp_mult,
                  "vocab_size": cfg.vocab_size, "params": sum(v.numel() for v in state.values()),
                  "matrices": len(matrices)},
        "grid": {"bits": list(opts.bits), "clips": list(opts.clips), "gptq": opts.gptq,
                 "specs_per_tensor": n_specs, "candidates_per_tensor": n_specs * (2 if opts.gptq == "both" else 1),
                 "sensitivity": opts.sensitivity, "coder": opts.coder},
        "budget": args.budget, "val_tokens": args.val_tokens,
        "total_seconds": round(total, 2),
        "phases": phases,
        "artifact_bytes": len(res.data), "artifact_sha256": hashlib.sha256(res.data).hexdigest(),
        "allocation_exact": res.alloc.exact,
        "note": args.note,
    }
    for k, v in phases.items():
        print(f"{k:42s} {v['seconds']:9.2f} s  {v['calls']:6d} calls  {100 * v['share_of_wall']:5.1f}%")
    print(f"total {total:.1f} s; artifact {len(res.data):,} B sha256 {result['artifact_sha256'][:16]}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
