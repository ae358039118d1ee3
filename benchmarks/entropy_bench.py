"""Bits per quantized weight: rANS (coder 4) against general byte compressors.

One run quantizes the same tensors with the codec's own ``pgolf_codec.schemes.quantize``
(int5..int8, sdclip k = 2.5, 4, 8, 12.5, 16, one scale per row; sdclip clips at
min(k·σ, max|w|), so for Gaussian rows k ≥ ~4 is the max clip) and codes the exact uint8 codes
the artifact stores with: the empirical order-0 entropy (the static-model limit),
rANS-static (table included), rANS-parametric (row widths included), rANS-column (column
widths and centers included), zstd-22, lzma-9e and brotli-11 (one code per byte; byte
shuffling is the identity for 1-byte symbols). Speeds are single-thread rANS encode (the
"auto" choice: all three models and their fits, best of 3), the column model's encode alone,
and the decode of the smallest blob (best of 15: decode takes milliseconds, so the best run
filters out other load).

Tensors: Gaussian weights whose per-row sigma varies x4 across rows, coded with per-row
scales (row code widths then nearly equal) and with one scale for the whole tensor (row
code widths differ x4: the case the parametric model is for); plus every 2-D weight of a
real checkpoint with ``--checkpoint`` (``.pt`` state dict loaded with ``weights_only``, or
``.safetensors``, quantized here at int6 and int8), or the exact stored codes of a ``.pgolf``
artifact's quantized matrices.

    python3 benchmarks/entropy_bench.py [--rows 512 --cols 1024] [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import lzma
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import zstandard

from pgolf_codec import rans
from pgolf_codec.schemes import QuantSpec, quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import best_time  # noqa: E402

try:
    import brotli
except ImportError:  # brotli is a benchmark-only dependency
    brotli = None


def measure(codes: np.ndarray, alphabet: int) -> dict:
    """Bits per symbol for every coder on ``codes`` (uint8, shape (rows, row_len))."""
    rows, row_len = codes.shape
    n = codes.size
    flat = np.ascontiguousarray(codes.ravel())
    raw = flat.tobytes()
    bps = lambda nbytes: 8.0 * nbytes / n  # noqa: E731
    blobs = {m: rans.encode(flat, alphabet, rows, row_len, model=m)
             for m in ("static", "parametric", "column")}
    for b in blobs.values():
        assert np.array_equal(rans.decode(b, n, alphabet, rows, row_len), flat)
    blob = min(blobs.values(), key=len)     # what "auto" keeps (ties → lowest kind)
    t_enc = best_time(lambda: rans.encode(flat, alphabet, rows, row_len))
    t_col = best_time(lambda: rans.encode(flat, alphabet, rows, row_len, model="column"))
    t_dec = best_time(lambda: rans.decode(blob, n, alphabet, rows, row_len), repeat=15)
    t_dec_col = best_time(lambda: rans.decode(blobs["column"], n, alphabet, rows, row_len), repeat=15)
    out = {
        "n": n, "rows": rows, "row_len": row_len,
        "order0_entropy": rans.entropy_bits(flat) / n,
        "rans_static": bps(len(blobs["static"])),
        "rans_parametric": bps(len(blobs["parametric"])),
        "rans_column": bps(len(blobs["column"])),
        "auto_kind": blob[0],
        "zstd22": bps(len(zstandard.ZstdCompressor(level=22).compress(raw))),
        "lzma9e": bps(len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))),
        "enc_msym_s": n / t_enc / 1e6,
        "enc_column_msym_s": n / t_col / 1e6,
        "dec_msym_s": n / t_dec / 1e6,
        "dec_column_msym_s": n / t_dec_col / 1e6,
    }
    if brotli is not None:
        out["brotli11"] = bps(len(brotli.compress(raw, quality=11, lgwin=24)))
    return out


def _codes(w: torch.Tensor, spec: QuantSpec) -> np.ndarray:
    q = quantize(w, spec)
    return q.codes.numpy()


def synthetic_cases(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.rand(rows, 1, generator=g) * np.log(4.0)) * 0.02  # x4 across rows
    w = torch.randn(rows, cols, generator=g) * sigma
    for bits in (5, 6, 7, 8):
        for k in (2.5, 4.0, 8.0, 12.5, 16.0):   # sdclip clips at min(k·σ, max|w|)
            spec = QuantSpec.parse(f"int{bits}:sdclip={k:g}")
            yield f"gauss int{bits} k={k:g} row-scale", _codes(w, spec), 1 << bits
    for bits in (5, 8):
        spec = QuantSpec.parse(f"int{bits}:sdclip=12.5")
        # A 1-D view is one row: one scale for the tensor; then back to the tensor's rows.
        codes = _codes(w.reshape(-1), spec).reshape(rows, cols)
        yield f"gauss int{bits} k=12.5 tensor-scale", codes, 1 << bits


def artifact_cases(path: Path, min_params: int = 65536):
    """The exact codes an artifact stores for each quantized 2-D tensor (no re-quantization)."""
    from pgolf_codec.container import read_artifact
    for name, q in read_artifact(path).quantized.items():
        alphabet = q.spec.levels
        if 0 < alphabet <= 256 and len(q.shape) == 2 and q.codes.numel() >= min_params:
            yield f"{name} {q.spec}", q.codes.numpy(), alphabet


def checkpoint_cases(path: Path, min_params: int = 65536):
    if path.suffix == ".pgolf":
        yield from artifact_cases(path, min_params)
        return
    if path.suffix == ".safetensors":
        from pgolf_codec.safetensors_io import read_safetensors
        sd, _ = read_safetensors(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    for name, w in sd.items():
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.numel() < min_params:
            continue
        for bits in (6, 8):
            spec = QuantSpec.parse(f"int{bits}:sdclip=12.5")
            yield f"{name} int{bits} k=12.5", _codes(w.float(), spec), 1 << bits


COLS = ["order0_entropy", "rans_static", "rans_parametric", "rans_column", "zstd22", "lzma9e", "brotli11"]
RANS = ("rans_static", "rans_parametric", "rans_column")
GENERAL = ("zstd22", "lzma9e", "brotli11")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--checkpoint", type=Path, help=".pt / .safetensors weights, or a .pgolf artifact")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --checkpoint tensors")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "entropy_bench.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cases = [] if args.no_synthetic else list(synthetic_cases(args.rows, args.cols))
    if args.checkpoint:
        cases += list(checkpoint_cases(args.checkpoint))
    hdr = (f"{'tensor':34s}" + "".join(f"{c[:11]:>12s}" for c in COLS)
           + "".join(f"{h:>9s}" for h in ("enc M/s", "col enc", "dec M/s", "col dec")))
    print("bits per symbol (lower is better)\n" + hdr)
    results = []
    for name, codes, alphabet in cases:
        r = measure(codes, alphabet)
        r["case"] = name
        results.append(r)
        print(f"{name:34s}" + "".join(f"{r.get(c, float('nan')):12.4f}" for c in COLS)
              + "".join(f"{r[k]:9.1f}" for k in ("enc_msym_s", "enc_column_msym_s", "dec_msym_s",
                                                  "dec_column_msym_s")))

    ours = lambda r: min(r[c] for c in RANS)  # noqa: E731
    best_general = lambda r: min(r[c] for c in GENERAL if c in r)  # noqa: E731
    best_param = lambda r: min(r["rans_parametric"], r["rans_column"])  # noqa: E731
    big = [r for r in results if r["n"] >= 256 * 1024]
    real = [r for r in results if not r["case"].startswith("gauss")]
    summary = {
        "static_overhead_vs_order0_max": max(r["rans_static"] / r["order0_entropy"] - 1 for r in big)
        if big else None,
        "parametric_below_order0": [r["case"] for r in results if r["rans_parametric"] < r["order0_entropy"]],
        "column_below_order0": [r["case"] for r in results if r["rans_column"] < r["order0_entropy"]],
        # Real weights: which cases the better of the two parametric models (row or column)
        # codes below the order-0 entropy, and by how much (bits per symbol).
        "real_best_parametric_below_order0": {
            r["case"]: {"model": "row" if r["rans_parametric"] <= r["rans_column"] else "column",
                        "gain_bits": round(r["order0_entropy"] - best_param(r), 4)}
            for r in real if best_param(r) < r["order0_entropy"]},
        "real_cases": len(real),
        "rans_beats_all_general_coders": all(ours(r) < best_general(r) for r in results),
        "rans_loses_to_a_general_coder": [r["case"] for r in results if ours(r) >= best_general(r)],
        "min_gain_vs_best_general": min(1 - ours(r) / best_general(r) for r in results),
        "decode_msym_s_min": min(r["dec_msym_s"] for r in results),
        "decode_column_msym_s_min": min(r["dec_column_msym_s"] for r in results),
        "encode_msym_s_min": min(r["enc_msym_s"] for r in results),
        "decode_target_msym_s": 100.0,
        "static_target_overhead": 0.01,
    }
    print("\nsummary:", json.dumps(summary, indent=1))
    record = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()} (1 thread), {platform.system()}, "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "ceiling": "order-0 empirical entropy of each tensor's codes (static-model limit); "
                   "general coders zstd-22, lzma-9e, brotli-11",
        "summary": summary,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
