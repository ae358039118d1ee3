"""The codec's Triton kernels (pgolf_codec/gpu.py) compiled on a real GPU, compared bit for bit
with the reference in `pgolf_codec.schemes` computed on the CPU.

test_triton.py runs these kernels through the Triton interpreter on CPU tensors; this file runs
the same checks on CUDA tensors with the kernels compiled (tests/conftest.py sets
TRITON_INTERPRET=0 when CUDA is available), where the hardware's float casts, reductions and
NaN handling are the ones that count: the device dequantizer (every width and code, the chunk
kernel and its tiles, int64 indices), the fused fake-quant (both paths, ties, clips, the STE
gradient), the scale tables, tensors at the `h200` trainer's shapes, and
`container.load_to_device`. Each input is built on the CPU (triton_cases.py), then uploaded.

GPU machines only: the module skips without CUDA, without Triton, or when interpreting. Run it
with ``python3 -m pytest -q tests/codec/test_triton_gpu.py`` or as part of
``GPU_TESTS="tests/codec/test_triton_gpu.py ..." STAGES=tests benchmarks/h200_step.sh``.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pgolf_codec import container, gpu, schemes
from pgolf_codec.schemes import QuantSpec, Quantized

from .triton_cases import (FEW, OUT_DTYPES, assert_bit_equal, every_code, pack_codes,
                           refuse_generic_kernel, scale_edge_rows, shapes, specs, weights)


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (test_triton.py runs the same checks interpreted on the CPU)"
    if importlib.util.find_spec("triton") is None:
        return "needs Triton"
    if gpu._interpreting():
        return "TRITON_INTERPRET=1: these tests check the compiled kernels"
    return None


_SKIP = _skip_reason()
if _SKIP is not None:
    pytest.skip(_SKIP, allow_module_level=True)

DEV = "cuda"


@pytest.fixture(autouse=True, scope="module")
def _compiled_kernels() -> None:
    # Without kernels every function below falls back to the torch reference and each test
    # would compare schemes with itself. Checked (and Triton's kernels wrapped) before any test
    # monkeypatches a kernel.
    assert gpu.kernels_available(DEV)


def test_kernels_run_compiled() -> None:
    assert gpu.kernels_available(DEV) and not gpu._interpreting()


def cuda(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEV)


def dequant(q: Quantized, packed: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`gpu.dequantize_packed` of q's stream (`pack_codes`), all inputs uploaded."""
    got = gpu.dequantize_packed(cuda(pack_codes(q, packed)), q.shape, q.spec, cuda(q.scales), cuda(q.zeros),
                                dtype, packed=packed)
    assert got.device.type == "cuda"
    return got


def check_dequant(q: Quantized, packed: bool = True, dtypes=OUT_DTYPES) -> None:
    for dtype in dtypes:
        assert_bit_equal(dequant(q, packed, dtype), schemes.dequantize(q, dtype))


def check_fake_quant(w: torch.Tensor, spec: QuantSpec) -> None:
    """`gpu.fake_quant` of w uploaded equals `schemes.fake_quant` of w on the CPU."""
    got = gpu.fake_quant(cuda(w), spec)
    assert got.device.type == "cuda"
    assert_bit_equal(got, schemes.fake_quant(w, spec))


# ---------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(OUT_DTYPES), packed=st.booleans())
def test_dequant_matches_reference(spec, shape, seed, dtype, packed) -> None:
    q = schemes.quantize(weights(shape, seed), spec)
    assert_bit_equal(dequant(q, packed, dtype), schemes.dequantize(q, dtype))


@pytest.mark.parametrize("bits", range(1, 9))
def test_dequant_every_width_every_code(bits: int) -> None:
    # 8 rows of 2^b + 5 codes: fields at every alignment, straddling row (and group) boundaries.
    for symmetric in (True, False):
        check_dequant(every_code(bits, symmetric, 8, (1 << bits) + 5, 5))


def test_dequant_ternary_every_byte() -> None:
    # All 243 valid bytes, each of its five trits decoded at every position.
    spec = QuantSpec(kind="ternary")
    codes = torch.from_numpy(np.array([(v // 3**d) % 3 for v in range(243) for d in range(5)], np.uint8))
    q = Quantized(spec, (5, 243), codes.view(5, 243), torch.full((5, 1), 0.75))
    assert sorted(pack_codes(q, True).tolist()) == list(range(243))
    check_dequant(q)


def test_bf16_output_rounds_half_to_even() -> None:
    # Products exactly halfway between two bf16 values: the hardware cast must round to even
    # (1 + 2^-8 -> 1, 1 + 3*2^-8 -> 1 + 2^-6), negatives alike.
    scales = torch.tensor([[1 + 2**-8], [1 + 3 * 2**-8], [1 + 2**-7 + 2**-8]], dtype=torch.float32)
    q = Quantized(QuantSpec(kind="int", bits=4), (3, 16), torch.arange(16, dtype=torch.uint8).repeat(3, 1), scales)
    got = dequant(q, dtype=torch.bfloat16)
    assert_bit_equal(got, schemes.dequantize(q, torch.bfloat16))
    assert got[0, 8].item() == 1.0 and got[1, 8].item() == 1 + 2**-6


@pytest.fixture
def no_generic_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk kernel must run: the per-element fallback fails."""
    refuse_generic_kernel(monkeypatch)


@pytest.mark.parametrize("bits", range(1, 9))
def test_chunk_kernel_every_width_every_code(bits: int, no_generic_kernel) -> None:
    # Rows of whole 8-code chunks (at least 2^b of them): every code at every field position of
    # a chunk, per-row and grouped scales, both kinds, packed and one code per byte, every output
    # dtype (fp32: the word loads and half-chunk stores; 16-bit: the byte tile).
    for symmetric, group, packed in [(True, 0, True), (False, 8, True), (True, 16, False), (False, 0, False)]:
        check_dequant(every_code(bits, symmetric, 8, 8 * ((1 << bits) // 8 + 3), group), packed)


@pytest.mark.parametrize("text,shape", [
    ("int6", (3, 4128)),  # rows longer than a tile: two column blocks, the second mostly masked
    ("int3:group=128", (2, 4120)),  # ...with groups, the last group short
    ("int2:asym:group=24", (37, 48)),  # many short rows per tile, the last tile partly empty
    ("int1", (5, 8)),
    ("ternary", (4, 64)),  # one code per byte only: packed 5-trit streams take the fallback
])
def test_chunk_kernel_tiles(text: str, shape: tuple[int, int], no_generic_kernel) -> None:
    spec = QuantSpec.parse(text)
    check_dequant(schemes.quantize(weights(shape, 11), spec), packed=spec.kind != "ternary")


def test_chunk_kernel_wide_indices_and_unaligned_payload(monkeypatch: pytest.MonkeyPatch, no_generic_kernel) -> None:
    spec = QuantSpec.parse("int4:asym:group=16")
    q = schemes.quantize(weights((5, 64), 12), spec)
    ref = schemes.dequantize(q)
    real = gpu._chunk_plan
    with monkeypatch.context() as mp:  # int64 indices (real above 2^31 elements), forced
        mp.setattr(gpu, "_chunk_plan", lambda *a: dataclasses.replace(real(*a), wide=True))
        assert_bit_equal(dequant(q), ref)
    # A payload view at an odd address: the fp32 path falls back to byte loads.
    payload = cuda(pack_codes(q, True))
    buf = torch.zeros(payload.numel() + 1, dtype=torch.uint8, device=DEV)
    buf[1:] = payload
    assert gpu._chunk_word(4, buf[1:]) == 1 and gpu._chunk_word(4, payload) == 2
    for dtype in OUT_DTYPES:
        got = gpu.dequantize_packed(buf[1:], (5, 64), spec, cuda(q.scales), cuda(q.zeros), dtype)
        assert_bit_equal(got, schemes.dequantize(q, dtype))


def test_wide_indexing_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors of >= 2^28 elements switch the per-element kernels to int64 indices: forced here.
    real = gpu._geometry
    monkeypatch.setattr(gpu, "_geometry", lambda shape, spec: dataclasses.replace(real(shape, spec), wide=True))
    for text in ["int5:group=8", "ternary", "int7:asym"]:
        spec = QuantSpec.parse(text)
        w = weights((9, 70), 2)
        check_dequant(schemes.quantize(w, spec))
        check_fake_quant(w, spec)


# ---------------------------------------------------------------------------------------------
# Fake quantization and scale tables
# ---------------------------------------------------------------------------------------------


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(OUT_DTYPES))
def test_fake_quant_matches_reference(spec, shape, seed, dtype) -> None:
    check_fake_quant(weights(shape, seed, dtype), spec)


@pytest.mark.parametrize("text", ["int6", "int3:group=4", "int8:asym", "int1", "ternary", "int2:asym:group=3"])
def test_fake_quant_ties_round_half_to_even(text: str) -> None:
    # The row max pins the scale to a power of two and the other entries are half-integer
    # multiples of it: every quotient is a tie, which only round-half-to-even on an IEEE
    # quotient reproduces.
    spec = QuantSpec.parse(text)
    qmax = 1 if spec.kind == "ternary" or spec.bits == 1 else (1 << (spec.bits - 1)) - 1
    halves = torch.arange(-2 * qmax - 3, 2 * qmax + 4, dtype=torch.float32) / 2
    row = torch.cat([halves, torch.tensor([float(qmax), -float(qmax)])]) * 2.0**-5
    check_fake_quant(torch.stack([row, row.flip(0), -row]), spec)


def test_fake_quant_mse_and_percentile_clips() -> None:
    w = weights((12, 96), 3)
    for text in ["int5:mse=4", "int4:pct=99:group=32", "int3:asym:mse=3:group=48", "ternary:mse=5"]:
        check_fake_quant(w, QuantSpec.parse(text))


@pytest.fixture
def no_torch_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the two-pass path (scales in torch, then the per-element kernel) fail, so a test
    proves the one-kernel row path ran."""
    def refuse(*args, **kwargs):
        raise AssertionError("the two-pass fake-quant path ran")
    monkeypatch.setattr(gpu, "group_scales", refuse)


@pytest.mark.parametrize("text", [
    "int6", "int2", "int8:scale=bf16", "int4:group=64", "int6:group=48:scale=bf16", "int3:group=40",
    "int4:asym", "int2:asym:group=24", "int7:asym:scale=bf16", "int1:asym:group=16",
    "int6:sdclip=12.5", "int6:sdclip=12.5:group=128", "int5:sdclip=2.5:scale=bf16", "int1:sdclip=1",
    "ternary:sdclip=1.5:group=32", "int4:asym:sdclip=3:group=64", "int3:asym:sdclip=0.5:scale=bf16",
])
def test_fake_quant_rows_kernel(text: str, no_torch_scales) -> None:
    # The one-kernel path, whose "max" bound is a hardware reduction here: short last groups,
    # several rows per program, a row longer than a group of 4096, every weight dtype. Not every
    # shape in every dtype, as interpreted: each pair is another compiled kernel per spec.
    spec = QuantSpec.parse(text)
    for shape, dtype in [((7, 96), torch.float32), ((7, 96), torch.bfloat16), ((3, 4, 10), torch.float16),
                         ((300,), torch.bfloat16), ((2, 5000), torch.float32)]:
        check_fake_quant(weights(shape, len(text) + shape[0], dtype), spec)


def test_fake_quant_rows_kernel_scale_edges(no_torch_scales) -> None:
    # All-zero rows (scale floor), huge rows (fp16 ceiling), fp16-subnormal scales, scales that
    # are exact fp16/bf16 ties, asymmetric rows entirely above or below zero.
    rows = scale_edge_rows()
    for text in ["int6", "int6:scale=bf16", "int4:asym", "int4:asym:scale=bf16", "int8:group=8"]:
        check_fake_quant(rows, QuantSpec.parse(text))
    # A NaN weight turns its whole group NaN, as in the reference: a hardware max reduction
    # would skip it, so the kernel checks for NaNs itself (NaN payloads may differ).
    bad = rows.clone()
    bad[3, 5] = float("nan")
    for text in ["int6", "int4:asym:scale=bf16", "int6:sdclip=2", "int8:group=8"]:
        spec = QuantSpec.parse(text)
        got, ref = gpu.fake_quant(cuda(bad), spec).cpu(), schemes.fake_quant(bad, spec)
        assert torch.equal(got.isnan(), ref.isnan()) and bool(ref[3, :8].isnan().all())
        keep = ~ref.isnan()
        assert_bit_equal(got[keep], ref[keep])


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_fake_quant_ste_forward_is_schemes_fake_quant(spec: QuantSpec, shape, seed: int) -> None:
    w_cpu = weights(shape, seed)
    w = cuda(w_cpu).requires_grad_(True)
    y = gpu.fake_quant_ste(w, spec)
    assert y.device.type == "cuda"
    assert_bit_equal(y.detach(), schemes.fake_quant(w_cpu, spec))
    assert_bit_equal(y.detach(), schemes.fake_quant_ste(w_cpu.requires_grad_(True), spec).detach())
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    y.backward(cuda(g))
    assert_bit_equal(w.grad, g)


@FEW
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_group_scales_match_quantize(spec: QuantSpec, shape, seed: int) -> None:
    # The tables of the two-pass path, computed by torch on the GPU.
    w = weights(shape, seed)
    q = schemes.quantize(w, spec)
    scales, zeros = gpu.group_scales(cuda(w), spec)
    assert scales.device.type == "cuda"
    assert_bit_equal(scales, q.scales)
    assert (zeros is None) == (q.zeros is None)
    if zeros is not None:
        assert torch.equal(zeros.cpu().to(torch.uint8), q.zeros)


# ---------------------------------------------------------------------------------------------
# Tensors at the trainer's shapes, and the loader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,text", [
    ((1536, 512), "int4:mse"),  # h200.toml: *.weight=int4:mse, the MLP's fc (model_dim 512, mlp_mult 3)
    ((512, 1536), "int4:mse"),  # ...and its proj
    ((4096, 512), "int8:percentile=99.99984"),  # tok_emb (vocab 4096)
])
def test_trainer_shapes(shape: tuple[int, int], text: str) -> None:
    spec = QuantSpec.parse(text)
    # Seed 1: the mse search's squared errors are float32 sums, whose rounding follows each
    # device's reduction order, so a row whose two best grid ratios' errors lie within ~1e-6
    # (relative) of each other could pick another clip on the GPU than on the CPU; with seed 1
    # the closest pair of any row is 4e-6 apart (6e-6 in float32 weights), 1e-7 is the rounding.
    w = weights(shape, 1)
    q = schemes.quantize(w, spec)
    # The artifact's codes (bit-packed: raw coder; one per byte: rANS), decoded on the GPU.
    for packed in (True, False):
        check_dequant(q, packed)
    wd = cuda(w)
    # The per-element fake-quant kernel under the CPU's tables, then the whole QAT forward
    # (tables from torch on the GPU).
    got = gpu.fake_quant_with_scales(wd, spec, cuda(q.scales), cuda(q.zeros))
    assert_bit_equal(got, schemes.dequantize(q))
    scales, _ = gpu.group_scales(wd, spec)
    differ = (scales.cpu() != q.scales).any(1)
    assert not bool(differ.any()), f"{int(differ.sum())} rows' scales differ from the CPU's (first row " \
        f"{int(differ.nonzero()[0])}): schemes' clip search, not a kernel"
    check_fake_quant(w, spec)
    check_fake_quant(w.bfloat16(), spec)


@pytest.mark.parametrize("coder", ["raw", "rans"])  # raw: bit-packed streams; rans: one code per byte
def test_load_to_device_uploads_stored_streams_bit_exact(tmp_path, coder: str) -> None:
    schemes_ = [f"int{b}" for b in range(1, 9)] + [
        "ternary", "int4:asym:group=8", "int2:scale=q8:group=16", "int5:asym:group=8", "int3:scale=q8"]
    tensors = {f"w{i}": weights((9, 37) if i % 2 else (24, 64), i) for i in range(len(schemes_))}
    tensors["norm"] = weights((37,), 99)
    tensors["empty"] = torch.zeros(0, 4)
    recipe = ";".join(f"w{i}={s}" for i, s in enumerate(schemes_)) + ";norm=bf16;empty=int6"
    path = tmp_path / f"{coder}.pgolf"
    container.write_artifact(path, tensors, recipe, coder=coder)
    streams = container.read_artifact(path, unpack=False).streams
    if coder == "raw":
        assert all(cs.packed for name, cs in streams.items() if cs.spec.bits < 8 and name != "empty")
    else:
        assert not all(cs.packed for cs in streams.values())
    ref = container.read_artifact(path).tensors
    got = container.load_to_device(path, DEV)
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].device.type == "cuda"
        assert_bit_equal(got[name], ref[name])
    half = container.load_to_device(path, DEV, torch.bfloat16)
    for name in ref:
        assert_bit_equal(half[name], ref[name].to(torch.bfloat16))
