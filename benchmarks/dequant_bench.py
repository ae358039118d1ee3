"""GPU dequantization, fused fake-quant and artifact loading (`pgolf_codec.gpu`) on one GPU.

Three measurements, each self-checked bit for bit against `pgolf_codec.schemes` before it is
timed:

1. Dequant throughput: packed b-bit codes (b = 2..8, one fp16-rounded scale per row, and
   groups of 128 for b = 4, 6) expanded to bf16 tensors of 4M, 16M and 64M elements. Reported
   as GB/s of output written, GB/s of all bytes moved (packed codes + scales read, output
   written), and that total against the device-to-device copy bandwidth of a bf16 tensor of
   the same size measured in the same run (the ceiling; target >= 70 %). Baseline: the same
   unpacking in PyTorch eager (gather, shift, mask, subtract, multiply, cast; index tensors
   precomputed, which favours the baseline).
2. Fake-quant step: every QAT weight of the baseline model (fp32 master weights, int6 with
   sdclip 12.5, per row and groups of 128), fused kernel against `schemes.fake_quant`.
3. Whole-artifact load of the baseline's int6 weights (9 blocks of q 512x512, k/v 256x512,
   attn proj 512x512, fc 1024x512, mlp proj 512x1024, plus tok_emb 1024x512; rANS-coded):
   `load_to_device` against the CPU path followed by a copy, and against torch dequant on
   the GPU.

    python3 benchmarks/dequant_bench.py --out benchmarks/results/dequant_bench.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pgolf_codec import bitpack, container, gpu, schemes
from pgolf_codec.schemes import QuantSpec, Quantized

TARGET_OF_COPY = 0.70


def bench_ms(fn) -> float:
    """Median milliseconds of fn() (Triton's do_bench: warm-up, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    iv = torch.int32 if a.element_size() == 4 else torch.int16
    return bool(torch.equal(a.contiguous().view(iv), b.contiguous().view(iv)))


def torch_unpack(payload: torch.Tensor, byte: torch.Tensor, shift: torch.Tensor, bits: int,
                 rows: int, row_len: int, scales: torch.Tensor, group: int) -> torch.Tensor:
    """PyTorch eager dequant of a packed stream (symmetric, b >= 2), bf16 out."""
    p = torch.nn.functional.pad(payload, (0, 1)).to(torch.int32)
    code = ((p[byte] | (p[byte + 1] << 8)) >> shift) & ((1 << bits) - 1)
    q = (code - ((1 << (bits - 1)) - 1)).to(torch.float32).view(rows, row_len)
    s = scales if group == 0 else scales.repeat_interleave(group, dim=1)
    return (q * s).to(torch.bfloat16)


def dequant_rows(sizes: list[int], widths: list[int], dev: torch.device) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    rows_out, copy_bw = [], {}
    row_len = 4096
    for n in sizes:
        src = torch.randn(n, device=dev).to(torch.bfloat16)
        dst = torch.empty_like(src)
        ms = bench_ms(lambda: dst.copy_(src))
        copy_bw[n] = 2 * src.numel() * src.element_size() / ms / 1e6  # GB/s, read + write
        del src, dst
        raw = rng.integers(0, 256, n, dtype=np.uint8)
        rows = n // row_len
        idx = torch.arange(n, device=dev, dtype=torch.int64)
        for bits in widths:
            for group in ([0, 128] if bits in (4, 6) else [0]):
                spec = QuantSpec(kind="int", bits=bits, group=group)
                codes = raw & np.uint8((1 << bits) - 1)
                payload = torch.from_numpy(bitpack.pack(codes, bits)).to(dev)
                ng = schemes.n_groups(row_len, group)
                scales = (torch.rand(rows, ng, device=dev) * 0.01 + 1e-3).half().float()
                ref = schemes.dequantize(Quantized(spec, (rows, row_len), torch.from_numpy(codes).to(dev)
                                                   .view(rows, row_len), scales), torch.bfloat16)
                fn = lambda: gpu.dequantize_packed(payload, (rows, row_len), spec, scales,  # noqa: E731
                                                   dtype=torch.bfloat16, validate=False)
                ok = same_bits(fn(), ref)
                bit = idx * bits
                byte, shift = (bit >> 3), (bit & 7).to(torch.int32)
                tfn = lambda: torch_unpack(payload, byte, shift, bits, rows, row_len, scales, group)  # noqa: E731
                ok_torch = same_bits(tfn(), ref)
                del ref, bit
                ms, tms = bench_ms(fn), bench_ms(tfn)
                out_b = 2 * n
                moved = out_b + payload.numel() + scales.numel() * 4
                rows_out.append({
                    "bits": bits, "group": group, "elements": n, "bit_identical": ok,
                    "torch_bit_identical": ok_torch, "ms": ms, "torch_ms": tms,
                    "out_GBps": out_b / ms / 1e6, "read_GBps": (moved - out_b) / ms / 1e6,
                    "moved_GBps": moved / ms / 1e6, "copy_GBps": copy_bw[n],
                    "of_copy": moved / ms / 1e6 / copy_bw[n], "speedup_vs_torch": tms / ms,
                })
                del payload, scales, byte, shift
        del idx
    return rows_out, copy_bw


BASELINE_SHAPES = [("tok_emb.weight", (1024, 512))] + [
    (f"blocks.{i}.{name}.weight", shape) for i in range(9) for name, shape in [
        ("attn.q", (512, 512)), ("attn.k", (256, 512)), ("attn.v", (256, 512)),
        ("attn.proj", (512, 512)), ("mlp.fc", (1024, 512)), ("mlp.proj", (512, 1024))]]


def fake_quant_rows(dev: torch.device) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(1)
    ws = [torch.randn(s, device=dev, generator=g) * 0.02 for _, s in BASELINE_SHAPES]
    out = []
    for text in ["int6:sdclip=12.5", "int6:sdclip=12.5:group=128", "int4:asym:group=64"]:
        spec = QuantSpec.parse(text)
        ok = all(same_bits(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec)) for w in ws)
        tables = [gpu.group_scales(w, spec) for w in ws]
        fused = lambda: [gpu.fake_quant(w, spec) for w in ws]  # noqa: E731
        kernel = lambda: [gpu.fake_quant_with_scales(w, spec, s, z) for w, (s, z) in zip(ws, tables)]  # noqa: E731
        eager = lambda: [schemes.fake_quant(w, spec) for w in ws]  # noqa: E731
        f_ms, k_ms, e_ms = bench_ms(fused), bench_ms(kernel), bench_ms(eager)
        out.append({"spec": text, "tensors": len(ws), "params": sum(w.numel() for w in ws),
                    "bit_identical": ok, "fused_ms": f_ms, "kernel_only_ms": k_ms, "torch_eager_ms": e_ms,
                    "speedup": e_ms / f_ms})
    return out


def best_s(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def load_row(dev: torch.device) -> dict:
    g = torch.Generator(device=dev).manual_seed(2)
    spec = QuantSpec.parse("int6:sdclip=12.5")
    qs = {}
    for name, shape in BASELINE_SHAPES:
        q = schemes.quantize(torch.randn(shape, device=dev, generator=g) * 0.02, spec)
        qs[name] = Quantized(q.spec, q.shape, q.codes.cpu(), q.scales.cpu())
    data, info = container.build_artifact(qs, spec, coder="rans")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pgolf"
        path.write_bytes(data)

        def torch_gpu() -> dict:
            art = container.read_artifact(path)
            return {k: schemes.dequantize(Quantized(q.spec, q.shape, q.codes.to(dev), q.scales.to(dev)))
                    for k, q in art.quantized.items()}

        cpu_then_copy = lambda: {k: v.to(dev) for k, v in container.load(path, "cpu").items()}  # noqa: E731
        ref, got = cpu_then_copy(), gpu.load_to_device(path, dev)
        ok = sorted(ref) == sorted(got) and all(same_bits(got[k], ref[k]) for k in ref)
        return {"artifact_bytes": len(data), "params": sum(math.prod(s) for _, s in BASELINE_SHAPES),
                "tensors": len(qs), "coder": "rans", "bit_identical": ok,
                "host_decode_s": best_s(lambda: container.read_artifact(path)),
                "load_to_device_s": best_s(lambda: gpu.load_to_device(path, dev)),
                "pgolf_codec_load_cuda_s": best_s(lambda: container.load(path, dev)),
                "cpu_load_then_copy_s": best_s(cpu_then_copy),
                "torch_gpu_dequant_s": best_s(torch_gpu)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dequant_bench.json"))
    ap.add_argument("--sizes", default="4M,16M,64M", help="element counts, e.g. 4M,16M,64M")
    ap.add_argument("--widths", default="2,3,4,5,6,7,8")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not gpu.kernels_available("cuda"):
        print("dequant_bench: needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sizes = [int(float(s[:-1]) * 2**20) if s[-1] in "Mm" else int(s) for s in args.sizes.split(",")]
    widths = [int(b) for b in args.widths.split(",")]
    t0 = time.perf_counter()
    deq, copy_bw = dequant_rows(sizes, widths, dev)
    print(f"{'bits':>4} {'group':>5} {'elems':>6} {'ms':>7} {'out GB/s':>9} {'moved GB/s':>10} "
          f"{'copy GB/s':>9} {'of copy':>7} {'torch ms':>8} {'speedup':>7} exact")
    for r in deq:
        print(f"{r['bits']:>4} {r['group']:>5} {r['elements'] >> 20:>5}M {r['ms']:>7.3f} {r['out_GBps']:>9.0f} "
              f"{r['moved_GBps']:>10.0f} {r['copy_GBps']:>9.0f} {r['of_copy']:>7.1%} {r['torch_ms']:>8.3f} "
              f"{r['speedup_vs_torch']:>6.1f}x {r['bit_identical'] and r['torch_bit_identical']}")
    fq = fake_quant_rows(dev)
    print(f"\n{'fake-quant spec':<28} {'fused ms':>8} {'kernel ms':>9} {'torch ms':>8} {'speedup':>7} exact")
    for r in fq:
        print(f"{r['spec']:<28} {r['fused_ms']:>8.3f} {r['kernel_only_ms']:>9.3f} {r['torch_eager_ms']:>8.3f} "
              f"{r['speedup']:>6.1f}x {r['bit_identical']}")
    ld = load_row(dev)
    print(f"\nartifact {ld['artifact_bytes']:,} B, {ld['params']:,} params (int6, rANS): host decode "
          f"{ld['host_decode_s'] * 1e3:.1f} ms; load_to_device {ld['load_to_device_s'] * 1e3:.1f} ms; "
          f"CPU load + copy {ld['cpu_load_then_copy_s'] * 1e3:.1f} ms; torch GPU dequant "
          f"{ld['torch_gpu_dequant_s'] * 1e3:.1f} ms; exact {ld['bit_identical']}")
    big = [r for r in deq if r["elements"] >= 4 * 2**20]
    exact = all(r["bit_identical"] for r in deq + fq) and ld["bit_identical"]
    summary = {"all_bit_identical": exact, "min_of_copy": min(r["of_copy"] for r in big),
               "median_of_copy": float(np.median([r["of_copy"] for r in big])),
               "target_of_copy": TARGET_OF_COPY,
               "meets_target": all(r["of_copy"] >= TARGET_OF_COPY for r in big),
               "seconds": time.perf_counter() - t0}
    print(f"\nmin {summary['min_of_copy']:.1%} / median {summary['median_of_copy']:.1%} of copy bandwidth "
          f"(target {TARGET_OF_COPY:.0%}); all exact: {exact}; {summary['seconds']:.0f} s")
    import triton

    result = {
        "command": "python3 " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}, triton {triton.__version__}, "
                  f"{platform.machine()} {platform.system()}",
        "ceiling": "device-to-device copy (torch copy_) of a bf16 tensor with the same element count, "
                   "read + write bytes per second, measured in the same run",
        "copy_GBps": {str(k): v for k, v in copy_bw.items()},
        "dequant": deq, "fake_quant": fq, "load": ld, "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
