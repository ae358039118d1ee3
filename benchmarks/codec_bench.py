"""Codec benchmark: bit-packing throughput (numba vs the numpy reference) and coded bits per
parameter of int5/int6/int8 codes under each coder and transform.

    python3 benchmarks/codec_bench.py [--checkpoint PATH] [--rows 512 --cols 2048]

Ceiling compared to: the empirical order-0 entropy of the codes (what any per-symbol coder
without context can reach), and the nominal packed width b.  Writes
benchmarks/results/codec_bench.json.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pgolf_codec import _reference as ref, bitpack
from pgolf_codec.coders import CODERS, StreamDesc, ZstdCoder, _forward, _transformed_ctx
from pgolf_codec.errors import Limits
from pgolf_codec.schemes import QuantSpec, quantize
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import best_time, write_json  # noqa: E402

SPECS = ["int5:sdclip=12.5", "int6:sdclip=12.5", "int6", "int8"]


def bench_bitpack(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for bits in (1, 2, 3, 4, 5, 6, 7, 8, "ternary"):
        if bits == "ternary":
            codes = rng.integers(0, 3, n).astype(np.uint8)
            impl = {"numba": (bitpack.pack_trits, lambda p: bitpack.unpack_trits(p, n)),
                    "numpy": (ref.pack_trits, lambda p: ref.unpack_trits(p, n))}
        else:
            codes = rng.integers(0, 1 << bits, n).astype(np.uint8)
            impl = {"numba": (lambda c, b=bits: bitpack.pack(c, b), lambda p, b=bits: bitpack.unpack(p, b, n)),
                    "numpy": (lambda c, b=bits: ref.pack(c, b), lambda p, b=bits: ref.unpack(p, b, n))}
        row = {"bits": bits, "n_codes": n}
        for name, (pack, unpack) in impl.items():
            packed = pack(codes)
            row[f"{name}_pack_MBps"] = n / best_time(lambda: pack(codes)) / 1e6
            row[f"{name}_unpack_MBps"] = n / best_time(lambda: unpack(packed)) / 1e6
        rows.append(row)
    return rows


def _entropy(codes: np.ndarray) -> float:
    counts = np.bincount(codes, minlength=256).astype(np.float64)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum())


def bench_coding(tensors: dict[str, torch.Tensor], specs: list[str]) -> list[dict]:
    coders = {"raw": CODERS[0], "zlib-9": CODERS[3], "zstd-22": ZstdCoder(22), "lzma": CODERS[2]}
    if 4 in CODERS:
        coders["rans"] = CODERS[4]
    rows = []
    for tname, w in tensors.items():
        for s in specs:
            q = quantize(w, QuantSpec.parse(s))
            codes = q.codes.numpy().ravel()
            desc = StreamDesc(codes.size, q.spec.levels, 1, q.rows, q.row_len, q.scales.numpy())
            row = {"tensor": tname, "numel": codes.size, "scheme": s, "bits": q.spec.bits,
                   "entropy_bits": _entropy(codes),
                   "scale_bits_per_param": 16 * q.scales.numel() / codes.size}
            for t, tlabel in ((0, "byte"), (1, "packed")):
                ctx = _transformed_ctx(t, desc, Limits())
                data = _forward(codes, t, desc)
                for cname, coder in coders.items():
                    t0 = time.perf_counter()
                    blob = coder.encode(data, ctx)
                    row[f"{cname}/{tlabel}"] = 8 * len(blob) / codes.size
                    row[f"{cname}/{tlabel}_enc_s"] = time.perf_counter() - t0
            rows.append(row)
    return rows


def bench_float_shuffle(tensors: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for tname, w in tensors.items():
        raw = w.detach().half().numpy().astype("<f2").view(np.uint8).ravel()
        desc = StreamDesc(raw.size, 256, 2)
        row = {"tensor": tname, "numel": w.numel(), "scheme": "fp16"}
        for t, tlabel in ((0, "plain"), (2, "shuffled")):
            data = _forward(raw, t, desc)
            for cname, coder in (("zstd-22", ZstdCoder(22)), ("lzma", CODERS[2]), ("zlib-9", CODERS[3])):
                row[f"{cname}/{tlabel}"] = 8 * len(coder.encode(data, _transformed_ctx(t, desc, Limits()))) / w.numel()
        rows.append(row)
    return rows


def _load_checkpoint(path: str, max_tensors: int) -> dict[str, torch.Tensor]:
    from pgolf_codec.cli import load_checkpoint
    tensors, _ = load_checkpoint(path)
    mats = sorted(((k, v) for k, v in tensors.items() if v.ndim == 2 and v.numel() >= 65536), key=lambda kv: kv[0])
    return {k: v.float() for k, v in mats[:max_tensors]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help=".pt or .safetensors with real weights (2-D tensors are used)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--pack-n", type=int, default=4_000_000, help="codes per bit-packing measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "codec_bench.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    tensors = {f"gaussian_{args.rows}x{args.cols}": torch.randn(args.rows, args.cols) * 0.02}
    if args.checkpoint:
        tensors.update(_load_checkpoint(args.checkpoint, 3))
    bitpack.pack(np.zeros(8, np.uint8), 3)  # compile outside the timings
    pack_rows = bench_bitpack(args.pack_n)
    code_rows = bench_coding(tensors, SPECS)
    float_rows = bench_float_shuffle(tensors)

    print(f"\nBit packing, {args.pack_n:,} codes (MB/s of codes; best of 3)")
    print(f"{'bits':>8} {'numba pack':>11} {'numpy pack':>11} {'numba unpack':>13} {'numpy unpack':>13}")
    for r in pack_rows:
        print(f"{r['bits']!s:>8} {r['numba_pack_MBps']:>11.0f} {r['numpy_pack_MBps']:>11.0f} "
              f"{r['numba_unpack_MBps']:>13.0f} {r['numpy_unpack_MBps']:>13.0f}")
    cols = [c for c in code_rows[0] if "/" in c and not c.endswith("_enc_s")]
    print("\nCoded bits per parameter of the codes (scales excluded; ceiling = order-0 entropy)")
    print(f"{'tensor':<28} {'scheme':<17} {'entropy':>7} " + " ".join(f"{c:>14}" for c in cols))
    for r in code_rows:
        print(f"{r['tensor'][:28]:<28} {r['scheme']:<17} {r['entropy_bits']:>7.3f} "
              + " ".join(f"{r[c]:>14.3f}" for c in cols))
    print("\nfp16 passthrough, bits per parameter: plain vs byte-plane shuffled")
    fcols = [c for c in float_rows[0] if "/" in c]
    print(f"{'tensor':<28} " + " ".join(f"{c:>17}" for c in fcols))
    for r in float_rows:
        print(f"{r['tensor'][:28]:<28} " + " ".join(f"{r[c]:>17.3f}" for c in fcols))

    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(), "torch": torch.__version__,
        "ceiling": "order-0 empirical entropy of the codes (entropy_bits); nominal packed width (bits)",
        "baseline": "numpy reference bit packing (pgolf_codec._reference); packed transform for coding",
        "bitpack": pack_rows, "coding": code_rows, "fp16_shuffle": float_rows,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
