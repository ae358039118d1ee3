"""GPU dequantization, fused fake-quant and artifact loading (`pgolf_codec.gpu`) on one GPU.

Three measurements, each self-checked bit for bit against `pgolf_codec.schemes` before it is
timed:

1. Dequant throughput of the loader's call, `dequantize_packed(..., validate=False, out=...)`:
   packed b-bit codes (b = 2..8, one fp16-rounded scale per row, and groups of 128 for
   b = 4, 6) expanded to bf16 tensors of 4M, 16M and 64M elements. Timed as CUDA-graph
   replays (`triton.testing.do_bench_cudagraph`) of back-to-back calls over several distinct
   payload / scale / output sets, as many as make >= 4x the 60 MB L2 together (29 sets of
   ~9 MB for int2 at 4M, 2 sets at 64M), so no call finds its inputs or outputs in L2 and
   host launch overhead is out of the number (the graph also proves the call has no host
   sync: one would fail the capture). Outputs are preallocated (`out=`), so no timed call
   allocates. Reported as GB/s of output written, GB/s of all bytes moved (packed codes +
   scales read, output written), and that total against the device-to-device copy bandwidth
   of a bf16 tensor of the same size, measured the same way in the same run (the ceiling;
   target >= 70 %). Separate columns: the cost of `validate=True`'s stream check (a device
   reduction and a host sync, which the loader does not run per call: it checks the bytes on
   the host) and the host time of one eager call (what a launch-bound loader pays per
   tensor). Baseline: the same unpacking in PyTorch eager (gather, shift, mask, subtract,
   multiply, cast; index tensors precomputed, which favours the baseline).
2. Fake-quant step: every QAT weight of the baseline model (fp32 master weights, int6 with
   sdclip 12.5, per row and groups of 128, plus int6 max and int4 asym groups of 64): the
   one-kernel row path of `gpu.fake_quant`, the two-pass path (`group_scales` in torch, then
   the per-element kernel) and `schemes.fake_quant` in eager torch.
3. Whole-artifact load of the baseline's int6 weights (9 blocks of q 512x512, k/v 256x512,
   attn proj 512x512, fc 1024x512, mlp proj 512x1024, plus tok_emb 1024x512; rANS-coded):
   `load_to_device` against the CPU path followed by a copy, and against torch dequant on
   the GPU.

    python3 benchmarks/dequant_bench.py --out benchmarks/results/dequant_bench.json

Without a GPU, `--cpu-check` runs every measurement's self-check (and its timing code, with
wall-clock numbers that mean nothing) at small sizes through the Triton interpreter.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
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


L2_BYTES = 60 * 2**20  # H100/H200 L2
ROTATE_FACTOR = 4  # rotated sets together exceed this many L2s
CPU_CHECK = False  # set by --cpu-check: interpreter run, wall-clock timings


def sync() -> None:
    if not CPU_CHECK:
        torch.cuda.synchronize()


def wall_ms(fn, repeat: int = 3) -> float:
    """Best wall-clock milliseconds of fn() (CPU check: only proves the code runs)."""
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def bench_ms(fn) -> float:
    """Median milliseconds of fn() by Triton's do_bench: warm-up, L2 flushed before every
    call, CUDA events around each call, so it includes any host sync or launch gap inside fn."""
    if CPU_CHECK:
        return wall_ms(fn)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def graph_ms(fn, calls: int) -> float:
    """Median device milliseconds per call of fn(), which makes `calls` back-to-back calls,
    replayed as a CUDA graph: no launch overhead, and a host sync inside fn fails the capture."""
    if CPU_CHECK:
        return wall_ms(fn) / calls
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")) / calls


def host_us(fn, calls: int, repeat: int = 20) -> float:
    """Median host microseconds per call of fn() (`calls` calls, not waited for)."""
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6 / calls)
    sync()
    return float(np.median(times))


def n_sets(bytes_per_set: int) -> int:
    """Distinct input/output sets to rotate through so that L2 never holds the next call's data
    (two in the CPU check, which only proves the rotation code runs)."""
    if CPU_CHECK:
        return 2
    return max(2, -(-ROTATE_FACTOR * L2_BYTES // bytes_per_set))


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
    row_len = 4096 if not CPU_CHECK else 256
    for n in sizes:
        k = n_sets(4 * n)
        srcs = [torch.randn(n, device=dev).to(torch.bfloat16) for _ in range(k)]
        dsts = [torch.empty_like(x) for x in srcs]

        def copies() -> None:
            for x, y in zip(srcs, dsts):
                y.copy_(x)
        copy_bw[n] = 2 * n * 2 / graph_ms(copies, k) / 1e6  # GB/s, read + write
        del srcs, dsts
        raw = rng.integers(0, 256, n, dtype=np.uint8)
        rows = n // row_len
        idx = torch.arange(n, device=dev, dtype=torch.int64)
        for bits in widths:
            for group in ([0, 128] if bits in (4, 6) else [0]):
                spec = QuantSpec(kind="int", bits=bits, group=group)
                ng = schemes.n_groups(row_len, group)
                codes = raw & np.uint8((1 << bits) - 1)
                payload = torch.from_numpy(bitpack.pack(codes, bits)).to(dev)
                per_set = 2 * n + payload.numel() + rows * ng * 4
                k = n_sets(per_set)
                # Distinct sets: the same codes (one reference suffices) in separate buffers,
                # scales drawn per set, one preallocated output each.
                payloads = [payload] + [payload.clone() for _ in range(k - 1)]
                scales = [(torch.rand(rows, ng, device=dev) * 0.01 + 1e-3).half().float() for _ in range(k)]
                outs = [torch.empty(rows, row_len, dtype=torch.bfloat16, device=dev) for _ in range(k)]
                codes_t = torch.from_numpy(codes).to(dev).view(rows, row_len)
                ok = True
                for j in (k - 1, 0):  # last and first set, bit for bit; ref stays set 0's
                    ref = schemes.dequantize(Quantized(spec, (rows, row_len), codes_t, scales[j]), torch.bfloat16)
                    got = gpu.dequantize_packed(payloads[j], (rows, row_len), spec, scales[j],
                                                dtype=torch.bfloat16, validate=False, out=outs[j])
                    ok = ok and same_bits(got, ref)

                def loader_calls() -> None:  # what `load_to_device` runs per tensor
                    for p, sc, o in zip(payloads, scales, outs):
                        gpu.dequantize_packed(p, (rows, row_len), spec, sc, dtype=torch.bfloat16,
                                              validate=False, out=o)
                ms = graph_ms(loader_calls, k)
                call_us = host_us(loader_calls, k)
                val_ms = bench_ms(lambda: gpu.check_stream(payload, n, spec))  # noqa: B023
                bit = idx * bits
                byte, shift = (bit >> 3), (bit & 7).to(torch.int32)
                tfn = lambda: torch_unpack(payload, byte, shift, bits, rows, row_len, scales[0], group)  # noqa: E731
                ok_torch = same_bits(tfn(), ref)
                tms = bench_ms(tfn)
                del ref, bit, codes_t
                out_b = 2 * n
                moved = per_set
                rows_out.append({
                    "bits": bits, "group": group, "elements": n, "bit_identical": ok,
                    "torch_bit_identical": ok_torch, "ms": ms, "rotated_sets": k,
                    "validate_ms": val_ms, "host_us_per_call": call_us, "torch_ms": tms,
                    "out_GBps": out_b / ms / 1e6, "read_GBps": (moved - out_b) / ms / 1e6,
                    "moved_GBps": moved / ms / 1e6, "copy_GBps": copy_bw[n],
                    "of_copy": moved / ms / 1e6 / copy_bw[n], "speedup_vs_torch": tms / ms,
                })
                del payload, payloads, scales, outs, byte, shift
        del idx
    return rows_out, copy_bw


BASELINE_SHAPES = [("tok_emb.weight", (1024, 512))] + [
    (f"blocks.{i}.{name}.weight", shape) for i in range(9) for name, shape in [
        ("attn.q", (512, 512)), ("attn.k", (256, 512)), ("attn.v", (256, 512)),
        ("attn.proj", (512, 512)), ("mlp.fc", (1024, 512)), ("mlp.proj", (512, 1024))]]


def fake_quant_rows(dev: torch.device) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(1)
    shapes = BASELINE_SHAPES if not CPU_CHECK else BASELINE_SHAPES[:3]
    ws = [torch.randn(s, device=dev, generator=g) * 0.02 for _, s in shapes]
    out = []
    for text in ["int6:sdclip=12.5", "int6:sdclip=12.5:group=128", "int6", "int4:asym:group=64"]:
        spec = QuantSpec.parse(text)
        # against the CPU reference: eager torch on CUDA is checked too, it is not the reference
        refs = [schemes.fake_quant(w.cpu(), spec).to(dev) for w in ws]
        ok = all(same_bits(gpu.fake_quant(w, spec), r) for w, r in zip(ws, refs))
        ok_torch = all(same_bits(schemes.fake_quant(w, spec), r) for w, r in zip(ws, refs))
        tables = [gpu.group_scales(w, spec) for w in ws]
        fused = lambda: [gpu.fake_quant(w, spec) for w in ws]  # noqa: E731
        two_pass = lambda: [gpu.fake_quant_with_scales(w, spec, *gpu.group_scales(w, spec)) for w in ws]  # noqa: E731
        kernel = lambda: [gpu.fake_quant_with_scales(w, spec, s, z) for w, (s, z) in zip(ws, tables)]  # noqa: E731
        eager = lambda: [schemes.fake_quant(w, spec) for w in ws]  # noqa: E731
        f_ms, t_ms, k_ms, e_ms = bench_ms(fused), bench_ms(two_pass), bench_ms(kernel), bench_ms(eager)
        out.append({"spec": text, "tensors": len(ws), "params": sum(w.numel() for w in ws),
                    "row_kernel": gpu._rows_stat(spec) is not None, "bit_identical": ok,
                    "torch_bit_identical": ok_torch,
                    "fused_ms": f_ms, "two_pass_ms": t_ms, "per_element_kernel_only_ms": k_ms,
                    "torch_eager_ms": e_ms, "speedup": e_ms / f_ms})
    return out


def best_s(fn, repeat: int = 3) -> float:
    return wall_ms(fn, repeat) / 1e3


def load_row(dev: torch.device) -> dict:
    g = torch.Generator(device=dev).manual_seed(2)
    spec = QuantSpec.parse("int6:sdclip=12.5")
    qs = {}
    for name, shape in (BASELINE_SHAPES if not CPU_CHECK else BASELINE_SHAPES[:3]):
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
        ref, got = cpu_then_copy(), container.load_to_device(path, dev)
        ok = sorted(ref) == sorted(got) and all(same_bits(got[k], ref[k]) for k in ref)
        return {"artifact_bytes": len(data), "params": sum(math.prod(q.shape) for q in qs.values()),
                "tensors": len(qs), "coder": "rans", "bit_identical": ok,
                "host_decode_s": best_s(lambda: container.read_artifact(path)),
                "load_to_device_s": best_s(lambda: container.load_to_device(path, dev)),
                "pgolf_codec_load_cuda_s": best_s(lambda: container.load(path, dev)),
                "cpu_load_then_copy_s": best_s(cpu_then_copy),
                "torch_gpu_dequant_s": best_s(torch_gpu)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dequant_bench.json"))
    ap.add_argument("--sizes", default="4M,16M,64M", help="element counts, e.g. 4M,16M,64M")
    ap.add_argument("--widths", default="2,3,4,5,6,7,8")
    ap.add_argument("--cpu-check", action="store_true",
                    help="no GPU: run the self-checks through the Triton interpreter at small sizes "
                         "(sizes divided by 1024, timings meaningless), write nothing")
    args = ap.parse_args()
    global CPU_CHECK
    sizes = [int(float(s[:-1]) * 2**20) if s[-1] in "Mm" else int(s) for s in args.sizes.split(",")]
    widths = [int(b) for b in args.widths.split(",")]
    if args.cpu_check:
        # Must precede the first kernel use: that is when the kernels are wrapped, and
        # `triton.jit` picks the interpreter only when this is set.
        os.environ["TRITON_INTERPRET"] = "1"
        CPU_CHECK = True
        dev = torch.device("cpu")
        sizes = [max(4096, n // 1024) for n in sizes]
        if not gpu.kernels_available(dev):
            print("dequant_bench: --cpu-check needs Triton", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available() or not gpu.kernels_available("cuda"):
        print("dequant_bench: needs a CUDA GPU and Triton (or --cpu-check)", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
    t0 = time.perf_counter()
    deq, copy_bw = dequant_rows(sizes, widths, dev)
    print(f"{'bits':>4} {'group':>5} {'elems':>7} {'sets':>4} {'ms':>7} {'out GB/s':>9} {'moved GB/s':>10} "
          f"{'copy GB/s':>9} {'of copy':>7} {'valid ms':>8} {'host us':>7} {'torch ms':>8} {'speedup':>7} exact")
    for r in deq:
        print(f"{r['bits']:>4} {r['group']:>5} {r['elements'] / 2**20:>6.3g}M {r['rotated_sets']:>4} {r['ms']:>7.3f} "
              f"{r['out_GBps']:>9.0f} {r['moved_GBps']:>10.0f} {r['copy_GBps']:>9.0f} {r['of_copy']:>7.1%} "
              f"{r['validate_ms']:>8.3f} {r['host_us_per_call']:>7.1f} {r['torch_ms']:>8.3f} "
              f"{r['speedup_vs_torch']:>6.1f}x {r['bit_identical'] and r['torch_bit_identical']}")
    print("ms: device time of one loader call (validate=False, preallocated out), CUDA-graph replay over "
          "rotated sets; valid ms: validate=True's extra stream check (device + host sync); host us: "
          "host time of one eager call")
    fq = fake_quant_rows(dev)
    print(f"\n{'fake-quant spec':<28} {'row kernel':>10} {'fused ms':>8} {'2-pass ms':>9} {'kernel ms':>9} "
          f"{'torch ms':>8} {'speedup':>7} exact")
    for r in fq:
        print(f"{r['spec']:<28} {str(r['row_kernel']):>10} {r['fused_ms']:>8.3f} {r['two_pass_ms']:>9.3f} "
              f"{r['per_element_kernel_only_ms']:>9.3f} {r['torch_eager_ms']:>8.3f} {r['speedup']:>6.1f}x "
              f"{r['bit_identical']}")
    ld = load_row(dev)
    print(f"\nartifact {ld['artifact_bytes']:,} B, {ld['params']:,} params (int6, rANS): host decode "
          f"{ld['host_decode_s'] * 1e3:.1f} ms; load_to_device {ld['load_to_device_s'] * 1e3:.1f} ms; "
          f"CPU load + copy {ld['cpu_load_then_copy_s'] * 1e3:.1f} ms; torch GPU dequant "
          f"{ld['torch_gpu_dequant_s'] * 1e3:.1f} ms; exact {ld['bit_identical']}")
    big = [r for r in deq if r["elements"] >= 4 * 2**20] or deq
    exact = (all(r["bit_identical"] for r in deq + fq) and all(r["torch_bit_identical"] for r in deq)
             and ld["bit_identical"])
    summary = {"all_bit_identical": exact, "min_of_copy": min(r["of_copy"] for r in big),
               "median_of_copy": float(np.median([r["of_copy"] for r in big])),
               "target_of_copy": TARGET_OF_COPY,
               "meets_target": all(r["of_copy"] >= TARGET_OF_COPY for r in big),
               "seconds": time.perf_counter() - t0}
    print(f"\nmin {summary['min_of_copy']:.1%} / median {summary['median_of_copy']:.1%} of copy bandwidth "
          f"(target {TARGET_OF_COPY:.0%}); all exact: {exact}; {summary['seconds']:.0f} s")
    if CPU_CHECK:
        print("cpu check: self-checks ran through the Triton interpreter; nothing written")
        return 0 if exact else 1
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
