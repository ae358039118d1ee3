"""Artifact write (pack) and read speed on the challenge baseline's shapes, and bytes.

    python3 benchmarks/pack_bench.py [--label after] [--blocks 9] [--coders auto,rans,zlib]

The state dict has the baseline's shapes (tok_emb 1024x512; per block attn q 512x512,
k/v 256x512, proj 512x512, mlp fc 1024x512, proj 512x1024; the small control vectors),
Gaussian weights with per-row std drawn from 0.02..0.08.  For each recipe (the baseline's
int8 percentile export and int6 sdclip) it times `build_artifact` with each coder and
`read_artifact_bytes` of the result, and compares with the obvious alternatives on the same
codes: `torch.save` of the int8 codes + fp16 scales, then zlib-9 (the challenge starter
script's export), and zstd-22 of all codes at one per byte.  Runs are merged into
benchmarks/results/pack_bench.json under `--label`, so before/after runs sit side by side.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import torch
import zstandard

from pgolf_codec import Recipe, build_artifact, coders, quantize, read_artifact_bytes
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import write_json  # noqa: E402

RECIPES = {
    "int8": "*.weight=int8:percentile=99.99984;*=fp32",
    "int6": "*.weight=int6:sdclip=12.5;*=fp32",
}


def baseline_state_dict(blocks: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """The baseline's tensor shapes; Gaussian rows with std uniform in [0.02, 0.08]."""
    g = torch.Generator().manual_seed(seed)

    def mat(r: int, c: int) -> torch.Tensor:
        return torch.randn(r, c, generator=g) * (0.02 + 0.06 * torch.rand(r, 1, generator=g))

    sd = {"tok_emb.weight": mat(1024, 512), "skip_weights": 1 + 0.1 * torch.randn(4, 512, generator=g)}
    for i in range(blocks):
        p = f"blocks.{i}."
        sd.update({p + "attn.c_q.weight": mat(512, 512), p + "attn.c_k.weight": mat(256, 512),
                   p + "attn.c_v.weight": mat(256, 512), p + "attn.proj.weight": mat(512, 512),
                   p + "mlp.fc.weight": mat(1024, 512), p + "mlp.proj.weight": mat(512, 1024),
                   p + "attn.q_gain": 1.5 + 0.1 * torch.randn(8, generator=g),
                   p + "attn_scale": 1 + 0.1 * torch.randn(512, generator=g),
                   p + "mlp_scale": 1 + 0.1 * torch.randn(512, generator=g),
                   p + "resid_mix": torch.randn(2, 512, generator=g)})
    return sd


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _cpu_timed(fn):
    """(result, wall seconds, CPU seconds of every thread of this process)."""
    c = time.process_time()
    out, wall = _timed(fn)
    return out, wall, time.process_time() - c


def alternatives(sd: dict[str, torch.Tensor], recipe: Recipe) -> list[dict]:
    """The starter script's torch.save + zlib-9, and zstd-22 of one code per byte."""
    def quantized():
        return {k: quantize(v, recipe.spec_for(k)) for k, v in sorted(sd.items())}

    def starter():
        qs = quantized()
        obj = {k: (q.codes if q.spec.is_float else (q.codes.view(torch.int8), q.scales.half()))
               for k, q in qs.items()}
        buf = io.BytesIO()
        torch.save(obj, buf)
        return zlib.compress(buf.getvalue(), 9)

    def zstd_bytes():
        qs = quantized()
        parts = [q.codes.numpy().tobytes() if not q.spec.is_float else q.codes.float().numpy().tobytes()
                 for q in qs.values()]
        parts += [q.scales.half().numpy().tobytes() for q in qs.values() if not q.spec.is_float]
        return zstandard.ZstdCompressor(level=22).compress(b"".join(parts))

    rows = []
    for name, fn in (("torch.save+zlib-9", starter), ("zstd-22 one code/byte", zstd_bytes)):
        blob, dt, cpu = _cpu_timed(fn)
        rows.append({"method": name, "bytes": len(blob), "write_s": dt, "write_cpu_s": cpu, "read_s": None})
    return rows


def bench(sd: dict[str, torch.Tensor], coder_names: list[str], exhaustive: bool) -> list[dict]:
    rows = []
    runs = [(c, f"coder={c}", False) for c in coder_names] + ([("auto", "coder=auto exhaustive", True)] if exhaustive else [])
    for rname, rtext in RECIPES.items():
        recipe = Recipe.parse(rtext)
        for coder, label, exact in runs:
            # "exhaustive": every candidate on every stream (no pruning), to check the choice.
            # (getattr: the script also times older codec versions, which always were.)
            exact_max = getattr(coders, "EXACT_MAX_BYTES", None)
            if exact:
                coders.EXACT_MAX_BYTES = 1 << 62
            getattr(coders, "clear_cache", lambda: None)()  # time the coding, not cache lookups
            try:
                (data, info), w_s, cpu = _cpu_timed(lambda: build_artifact(sd, recipe, coder=coder))
            finally:
                if exact:
                    coders.EXACT_MAX_BYTES = exact_max
            art, r_s = _timed(lambda: read_artifact_bytes(data))
            chosen: dict[str, int] = {}
            for t in info.tensors:
                chosen[t["coder"]] = chosen.get(t["coder"], 0) + 1
            rows.append({"recipe": rname, "method": f"pgolf {label}", "bytes": len(data), "write_s": w_s,
                         "write_cpu_s": cpu, "read_s": r_s, "codes_coders": chosen})
        for row in alternatives(sd, recipe):
            rows.append({"recipe": rname, **row})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="current", help="key of this run in the JSON (e.g. before, after)")
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--coders", default="auto,rans,zlib")
    ap.add_argument("--no-exhaustive", action="store_true", help="skip the unpruned auto run (slow)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pack_bench.json"))
    args = ap.parse_args()
    sd = baseline_state_dict(args.blocks)
    params = sum(v.numel() for v in sd.values())
    build_artifact({"w": torch.randn(64, 64)}, "int6", coder="auto")  # numba compile outside timings
    rows = bench(sd, args.coders.split(","), not args.no_exhaustive)

    print(f"\nPack/unpack, {params:,} parameters, {len(sd)} tensors "
          f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)")
    print(f"{'recipe':<6} {'method':<30} {'bytes':>11} {'bits/param':>10} {'write s':>8} {'cpu s':>7} {'read s':>7}  codes coder")
    for r in rows:
        rd = f"{r['read_s']:7.2f}" if r["read_s"] is not None else f"{'-':>7}"
        print(f"{r['recipe']:<6} {r['method']:<30} {r['bytes']:>11,} {8 * r['bytes'] / params:>10.3f} "
              f"{r['write_s']:>8.2f} {r['write_cpu_s']:>7.2f} {rd}  {r.get('codes_coders', '')}")

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    result["runs"][args.label] = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "python": platform.python_version(), "torch": torch.__version__,
        "params": params, "recipes": RECIPES, "rows": rows,
    }
    result["baseline"] = ("torch.save of int8 codes + fp16 scales then zlib-9 (the challenge starter "
                          "script's export); zstd-22 of every code at one per byte")
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
