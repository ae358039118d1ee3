"""Triton dequant and fused fake-quant kernels, run on the CPU through the Triton interpreter,
compared bit for bit with the reference in `pgolf_codec.schemes`."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")

from pgolf_codec import gpu, schemes  # noqa: E402
from pgolf_codec.errors import BadPayload  # noqa: E402
from pgolf_codec.schemes import QuantSpec, Quantized  # noqa: E402

from .triton_cases import (FEW, OUT_DTYPES, assert_bit_equal, every_code, pack_codes,  # noqa: E402
                           refuse_generic_kernel, scale_edge_rows, shapes, specs, weights)

# tests/conftest.py runs the session interpreted on a machine without a GPU (CI). On a GPU machine
# Triton runs compiled and these CPU-tensor tests do not apply: test_triton_gpu.py runs the same
# checks on CUDA tensors there. The kernels compile for sm_90 without a GPU in test_gpu_sm90.py,
# and benchmarks/dequant_bench.py checks them against the host decode on CUDA.
if not gpu._interpreting():
    pytest.skip("the kernels on CPU tensors need TRITON_INTERPRET=1 for the whole session",
                allow_module_level=True)


def test_kernels_run_interpreted() -> None:
    # Everything below would silently test the torch fallback if this failed.
    assert gpu.kernels_available("cpu")


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(OUT_DTYPES), packed=st.booleans())
def test_dequant_matches_reference(spec, shape, seed, dtype, packed) -> None:
    q = schemes.quantize(weights(shape, seed), spec)
    got = gpu.dequantize_packed(pack_codes(q, packed), shape, spec, q.scales, q.zeros, dtype, packed=packed)
    assert_bit_equal(got, schemes.dequantize(q, dtype))


@pytest.mark.parametrize("bits", range(1, 9))
def test_dequant_every_width_every_code(bits: int) -> None:
    # Every code value at every bit offset: 8 rows x (2^b + 5) codes covers all field
    # alignments, and row_len not a multiple of 8 makes fields straddle row boundaries.
    for symmetric in (True, False):
        spec = QuantSpec(kind="int", bits=bits, symmetric=symmetric, group=5)
        row_len = (1 << bits) + 5
        codes = (torch.arange(8 * row_len) * 7 % (1 << bits)).to(torch.uint8).view(8, row_len)
        ng = schemes.n_groups(row_len, 5)
        scales = torch.rand(8, ng, generator=torch.Generator().manual_seed(bits)).half().float() + 0.01
        zeros = None if symmetric else (torch.arange(8 * ng) % (1 << bits)).to(torch.uint8).view(8, ng)
        q = Quantized(spec, (8, row_len), codes, scales, zeros)
        payload = pack_codes(q, True)
        for dtype in OUT_DTYPES:
            assert_bit_equal(gpu.dequantize_packed(payload, (8, row_len), spec, scales, zeros, dtype),
                             schemes.dequantize(q, dtype))


def test_dequant_ternary_every_byte() -> None:
    # All 243 valid bytes, each of its five trits decoded at every position.
    spec = QuantSpec(kind="ternary")
    codes = torch.from_numpy(np.array([(v // 3**d) % 3 for v in range(243) for d in range(5)], np.uint8))
    q = Quantized(spec, (5, 243), codes.view(5, 243), torch.full((5, 1), 0.75))
    payload = pack_codes(q, True)
    assert payload.numel() == 243 and sorted(payload.tolist()) == list(range(243))
    assert_bit_equal(gpu.dequantize_packed(payload, (5, 243), spec, q.scales), schemes.dequantize(q))


def test_bf16_output_rounds_half_to_even() -> None:
    # q * scale landing exactly halfway between two bf16 values: 1 + 2^-8 rounds down to 1,
    # 1 + 3*2^-8 rounds up to 1 + 2^-6 (RNE), and the same for negatives.
    spec = QuantSpec(kind="int", bits=4)
    scales = torch.tensor([[1 + 2**-8], [1 + 3 * 2**-8], [1 + 2**-7 + 2**-8]], dtype=torch.float32)
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 1)
    q = Quantized(spec, (3, 16), codes, scales)
    got = gpu.dequantize_packed(pack_codes(q, True), (3, 16), spec, scales, dtype=torch.bfloat16)
    assert_bit_equal(got, schemes.dequantize(q, torch.bfloat16))
    assert got[0, 8].item() == 1.0 and got[1, 8].item() == 1 + 2**-6


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(OUT_DTYPES))
def test_fake_quant_matches_reference(spec, shape, seed, dtype) -> None:
    w = weights(shape, seed, dtype)
    assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))


@pytest.mark.parametrize("text", ["int6", "int3:group=4", "int8:asym", "int1", "ternary", "int2:asym:group=3"])
def test_fake_quant_ties_round_half_to_even(text: str) -> None:
    # Rows whose max pins the scale to a power of two, and whose other entries are exact
    # half-integer multiples of it: every quotient is a tie, and only round-half-to-even on an
    # IEEE quotient reproduces the reference codes.
    spec = QuantSpec.parse(text)
    qmax = 1 if spec.kind == "ternary" or spec.bits == 1 else (1 << (spec.bits - 1)) - 1
    halves = torch.arange(-2 * qmax - 3, 2 * qmax + 4, dtype=torch.float32) / 2
    s = 2.0**-5
    row = torch.cat([halves, torch.tensor([float(qmax), -float(qmax)])]) * s
    w = torch.stack([row, row.flip(0), -row])
    assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))


def test_fake_quant_mse_and_percentile_clips() -> None:
    w = weights((12, 96), 3)
    for text in ["int5:mse=4", "int4:pct=99:group=32", "int3:asym:mse=3:group=48", "ternary:mse=5"]:
        spec = QuantSpec.parse(text)
        assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))


def test_float_specs_and_empty_tensors_fall_back() -> None:
    w = weights((4, 9), 5)
    for text in ["fp16", "bf16", "fp32"]:
        spec = QuantSpec.parse(text)
        assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))
    spec = QuantSpec.parse("int6:group=4")
    for shape in [(0,), (0, 7), (3, 0)]:
        q = schemes.quantize(torch.zeros(shape), spec)
        got = gpu.dequantize_packed(torch.zeros(0, dtype=torch.uint8), shape, spec, q.scales)
        assert got.shape == shape
        assert gpu.fake_quant(torch.zeros(shape), spec).shape == shape


def test_wide_indexing_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors of >= 2^28 elements switch to int64 indices; the interpreter cannot afford one,
    # so force the flag on a small tensor and check the arithmetic is unchanged.
    real = gpu._geometry
    monkeypatch.setattr(gpu, "_geometry", lambda shape, spec: dataclasses.replace(real(shape, spec), wide=True))
    for text in ["int5:group=8", "ternary", "int7:asym"]:
        spec = QuantSpec.parse(text)
        w = weights((9, 70), 2)
        q = schemes.quantize(w, spec)
        assert_bit_equal(gpu.dequantize_packed(pack_codes(q, True), (9, 70), spec, q.scales, q.zeros),
                         schemes.dequantize(q))
        assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))


def test_fallback_without_kernels_gives_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec.parse("int3:asym:group=16")
    w = weights((10, 50), 8)
    q = schemes.quantize(w, spec)
    payload = pack_codes(q, True)
    fast = gpu.dequantize_packed(payload, (10, 50), spec, q.scales, q.zeros, torch.bfloat16)
    monkeypatch.setattr(gpu, "kernels_available", lambda device="cuda": False)
    slow = gpu.dequantize_packed(payload, (10, 50), spec, q.scales, q.zeros, torch.bfloat16)
    assert_bit_equal(fast, slow)
    with pytest.raises(RuntimeError):
        gpu.fake_quant_with_scales(w, spec, *gpu.group_scales(w, spec))
    assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))


def test_bad_streams_are_rejected() -> None:
    spec6 = QuantSpec.parse("int6")
    q = schemes.quantize(weights((3, 7), 1), spec6)  # 21 codes * 6 bits = 15.75 bytes
    good = pack_codes(q, True)
    gpu.check_stream(good, 21, spec6)
    with pytest.raises(BadPayload, match="bytes"):
        gpu.dequantize_packed(good[:-1], (3, 7), spec6, q.scales)
    padded = good.clone()
    padded[-1] |= 0x80  # a bit past the last code
    with pytest.raises(BadPayload, match="padding"):
        gpu.dequantize_packed(padded, (3, 7), spec6, q.scales)
    with pytest.raises(BadPayload, match="alphabet"):
        gpu.dequantize_packed(torch.full((21,), 64, dtype=torch.uint8), (3, 7), spec6, q.scales, packed=False)

    tern = QuantSpec.parse("ternary")
    with pytest.raises(BadPayload, match="243"):
        gpu.dequantize_packed(torch.tensor([243, 0], dtype=torch.uint8), (10,), tern, torch.ones(1, 1))
    with pytest.raises(BadPayload, match="padding trit"):  # 7 trits: the last byte holds 2
        gpu.dequantize_packed(torch.tensor([0, 9], dtype=torch.uint8), (7,), tern, torch.ones(1, 1))

    with pytest.raises(ValueError, match="scales"):
        gpu.dequantize_packed(good, (3, 7), spec6, torch.ones(3, 2))
    with pytest.raises(ValueError, match="scales"):
        gpu.dequantize_packed(good, (3, 7), spec6, torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero points"):
        gpu.dequantize_packed(good, (3, 7), spec6, q.scales, torch.zeros(3, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="zero points"):
        gpu.dequantize_packed(good, (3, 7), QuantSpec.parse("int6:asym"), q.scales)
    with pytest.raises(ValueError, match="dtype"):
        gpu.dequantize_packed(good, (3, 7), spec6, q.scales, dtype=torch.float64)
    with pytest.raises(ValueError, match="1-D uint8"):
        gpu.dequantize_packed(good.to(torch.int16), (3, 7), spec6, q.scales)


def test_load_to_device_matches_cpu_load(tmp_path) -> None:
    from pgolf_codec import container

    tensors = {
        "tok_emb.weight": weights((64, 32), 1),
        "blocks.0.attn.q.weight": weights((32, 32), 2),
        "blocks.0.mlp.fc.weight": weights((48, 32), 3, torch.bfloat16),
        "blocks.0.mlp.proj.weight": weights((32, 48), 4),
        "blocks.0.attn.k.weight": weights((16, 32), 5),
        "blocks.0.norm.weight": weights((32,), 6),
        "empty": torch.zeros(0, 4),
    }
    recipe = ("tok_emb*=int8:group=16;*.q.*=int5:asym:group=8;*.fc.*=ternary;*.proj.*=int3:scale=q8;"
              "*.k.*=int1:scale=bf16;*norm*=fp16;*=int6")
    path = tmp_path / "model.pgolf"
    container.write_artifact(path, tensors, recipe)
    ref = container.load(path)
    got = container.load_to_device(path, "cpu")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert_bit_equal(got[name], ref[name])
    half = container.load_to_device(path, "cpu", torch.bfloat16)
    for name in ref:
        assert_bit_equal(half[name], ref[name].to(torch.bfloat16))


@pytest.mark.parametrize("coder", ["raw", "rans"])  # raw: bit-packed streams; rans: one code per byte
def test_load_to_device_uploads_stored_streams_bit_exact(tmp_path, coder: str) -> None:
    from pgolf_codec import container

    schemes_ = [f"int{b}" for b in range(1, 9)] + ["ternary", "int4:asym:group=8", "int2:scale=q8:group=16"]
    tensors = {f"w{i}": weights((9, 37), i) for i in range(len(schemes_))}
    tensors["norm"] = weights((37,), 99)
    recipe = ";".join(f"w{i}={s}" for i, s in enumerate(schemes_)) + ";norm=bf16"
    path = tmp_path / f"{coder}.pgolf"
    container.write_artifact(path, tensors, recipe, coder=coder)
    streams = container.read_artifact(path, unpack=False).streams
    assert len(streams) == len(schemes_)
    if coder == "raw":
        assert all(cs.packed for cs in streams.values() if cs.spec.bits < 8)
    else:
        assert not all(cs.packed for cs in streams.values())
    ref = container.read_artifact(path).tensors
    got = container.load_to_device(path, "cpu")  # the Triton kernels, interpreted
    assert list(got) == list(ref)
    for name in ref:
        assert_bit_equal(got[name], ref[name])
    for name, t in container.load(path).items():
        assert_bit_equal(t, ref[name])


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_fake_quant_ste_forward_is_schemes_fake_quant(spec: QuantSpec, shape, seed: int) -> None:
    w = weights(shape, seed).requires_grad_(True)
    y = gpu.fake_quant_ste(w, spec)
    assert_bit_equal(y.detach(), schemes.fake_quant(w.detach(), spec))
    assert_bit_equal(y.detach(), schemes.fake_quant_ste(w, spec).detach())
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    y.backward(g)
    assert_bit_equal(w.grad, g)


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_group_scales_match_quantize(spec: QuantSpec, shape, seed: int) -> None:
    w = weights(shape, seed)
    q = schemes.quantize(w, spec)
    scales, zeros = gpu.group_scales(w, spec)
    assert_bit_equal(scales, q.scales)
    assert (zeros is None) == (q.zeros is None)
    if zeros is not None:
        assert torch.equal(zeros.to(torch.uint8), q.zeros)


@pytest.mark.parametrize("bits", range(1, 9))
def test_chunk_kernel_every_width_every_code(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows of whole 8-code chunks take the chunk kernel. Every code value lands at every field
    # position of a chunk (`every_code`), under per-row scales, groups of 8 and 16, symmetric and
    # asymmetric codes, packed and one code per byte, into every output dtype (fp32 takes the
    # word-load path, 16-bit outputs the byte tile).
    refuse_generic_kernel(monkeypatch)
    for symmetric, group, packed in [(True, 0, True), (False, 8, True), (True, 16, False), (False, 0, False)]:
        q = every_code(bits, symmetric, 8, 8 * ((1 << bits) // 8 + 3), group)
        payload = pack_codes(q, packed)
        for dtype in OUT_DTYPES:
            got = gpu.dequantize_packed(payload, q.shape, q.spec, q.scales, q.zeros, dtype, packed=packed)
            assert_bit_equal(got, schemes.dequantize(q, dtype))


@pytest.mark.parametrize("text,shape", [
    ("int6", (3, 4128)),  # rows longer than a tile: two column blocks, the second mostly masked
    ("int3:group=128", (2, 4120)),  # ...with groups, the last group short (4120 = 32*128 + 24)
    ("int2:asym:group=24", (37, 48)),  # many short rows per tile, the last tile partly empty
    ("int1", (5, 8)),
    ("ternary", (4, 64)),  # one code per byte only: packed 5-trit streams take the fallback
])
def test_chunk_kernel_tiles(text: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec.parse(text)
    q = schemes.quantize(weights(shape, 11), spec)
    refuse_generic_kernel(monkeypatch)
    for dtype in OUT_DTYPES:
        got = gpu.dequantize_packed(pack_codes(q, spec.kind != "ternary"), shape, spec, q.scales, q.zeros,
                                    dtype, packed=spec.kind != "ternary")
        assert_bit_equal(got, schemes.dequantize(q, dtype))


def test_chunk_kernel_wide_indices_and_unaligned_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec.parse("int4:asym:group=16")
    q = schemes.quantize(weights((5, 64), 12), spec)
    payload = pack_codes(q, True)
    ref = schemes.dequantize(q)
    plan = gpu._chunk_plan(5, 64, 4, spec, 4)
    assert plan is not None and not plan.wide
    # int64 indices (forced here; real above 2^31 elements) compute the same addresses.
    real = gpu._chunk_plan
    with monkeypatch.context() as mp:
        mp.setattr(gpu, "_chunk_plan", lambda *a: dataclasses.replace(real(*a), wide=True))
        assert_bit_equal(gpu.dequantize_packed(payload, (5, 64), spec, q.scales, q.zeros), ref)
    # A payload view at an odd address: the fp32 path falls back to byte loads.
    buf = torch.zeros(payload.numel() + 1, dtype=torch.uint8)
    buf[1:] = payload
    assert gpu._chunk_word(4, buf[1:]) == 1 and gpu._chunk_word(4, payload) == 2
    assert gpu._chunk_word(8, payload) == 4 and gpu._chunk_word(6, payload) == 2 and gpu._chunk_word(5, payload) == 1
    assert_bit_equal(gpu.dequantize_packed(buf[1:], (5, 64), spec, q.scales, q.zeros), ref)


def test_dequant_into_preallocated_out() -> None:
    spec = QuantSpec.parse("int5:group=32")
    q = schemes.quantize(weights((4, 96), 13), spec)
    payload = pack_codes(q, True)
    out = torch.full((4, 96), float("nan"), dtype=torch.bfloat16)
    got = gpu.dequantize_packed(payload, (4, 96), spec, q.scales, dtype=torch.bfloat16, out=out)
    assert got is out
    assert_bit_equal(out, schemes.dequantize(q, torch.bfloat16))
    bad_outs = [torch.empty(4, 95, dtype=torch.bfloat16), torch.empty(4, 96),
                torch.empty(96, 4, dtype=torch.bfloat16).t()]
    for bad in bad_outs:
        with pytest.raises(ValueError, match="out"):
            gpu.dequantize_packed(payload, (4, 96), spec, q.scales, dtype=torch.bfloat16, out=bad)


def _no_torch_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the two-pass path (scales in torch, then the per-element kernel) fail, so a test
    proves the one-kernel row path ran."""
    def refuse(*args, **kwargs):
        raise AssertionError("the two-pass fake-quant path ran")
    monkeypatch.setattr(gpu, "group_scales", refuse)


@pytest.mark.parametrize("text", [f"int{b}" for b in range(2, 9)] + [
    "int4:group=64", "int6:group=48:scale=bf16", "int3:group=40", "int8:scale=bf16",
    "int4:asym", "int2:asym:group=24", "int7:asym:scale=bf16", "int1:asym:group=16",
    "int6:sdclip=12.5", "int6:sdclip=12.5:group=128", "int5:sdclip=2.5:scale=bf16", "int1:sdclip=1",
    "ternary:sdclip=1.5:group=32", "int4:asym:sdclip=3:group=64", "int3:asym:sdclip=0.5:scale=bf16",
])
def test_fake_quant_rows_kernel(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # One kernel per tensor computes the scales itself ("max") or from schemes' sdclip bounds:
    # groups with a short last group (96 = 2*40 + 16), rows of many widths, rows that fill
    # several per program and a row longer than a group of 4096, in every weight dtype.
    spec = QuantSpec.parse(text)
    _no_torch_scales(monkeypatch)
    for shape in [(7, 96), (3, 4, 10), (300,), (2, 5000)]:
        for dtype in OUT_DTYPES:
            w = weights(shape, len(text) + shape[0], dtype)
            assert_bit_equal(gpu.fake_quant(w, spec), schemes.fake_quant(w, spec))


def test_fake_quant_rows_kernel_scale_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    # All-zero rows (scale clamped up to the floor), huge rows (clamped down to the fp16
    # ceiling: every quotient saturates), fp16-subnormal scales, scales that are exact bf16/fp16
    # ties, and asymmetric rows entirely above or below zero (zero point 0 or top).
    _no_torch_scales(monkeypatch)
    rows = scale_edge_rows()
    for text in ["int6", "int6:scale=bf16", "int4:asym", "int4:asym:scale=bf16", "int8:group=8"]:
        spec = QuantSpec.parse(text)
        assert_bit_equal(gpu.fake_quant(rows, spec), schemes.fake_quant(rows, spec))
    # A NaN weight turns its whole group NaN, as in the reference (NaN payloads may differ).
    bad = rows.clone()
    bad[3, 5] = float("nan")
    for text in ["int6", "int4:asym:scale=bf16", "int6:sdclip=2", "int8:group=8"]:
        spec = QuantSpec.parse(text)
        got, ref = gpu.fake_quant(bad, spec), schemes.fake_quant(bad, spec)
        assert torch.equal(got.isnan(), ref.isnan()) and bool(ref[3, :8].isnan().all())
        keep = ~ref.isnan()
        assert_bit_equal(got[keep], ref[keep])


def test_fake_quant_rows_kernel_scope() -> None:
    assert gpu._rows_stat(QuantSpec.parse("int6")) == 0
    assert gpu._rows_stat(QuantSpec.parse("int2:asym")) == 0
    assert gpu._rows_stat(QuantSpec.parse("int6:sdclip=12.5")) == 1
    for text in ["int1", "ternary", "int6:pct=99", "int4:mse", "int6:scale=q8", "int6:sdclip=2:scale=q8"]:
        assert gpu._rows_stat(QuantSpec.parse(text)) is None
