"""Shared pieces of the Triton kernel tests (test_triton.py interpreted on the CPU,
test_triton_gpu.py compiled on CUDA): inputs built on the CPU, and a bit-for-bit comparison
that accepts tensors on any device. No tests here, and no skip: importing needs no Triton."""
from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from pgolf_codec import bitpack, schemes
from pgolf_codec.schemes import QuantSpec, Quantized

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The interpreter runs a kernel as numpy on whole tiles (and the GPU compiles one kernel per new
# set of constants): a handful of examples per property covers every code path without making
# the file slow.
FEW = settings(max_examples=12, deadline=None)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality also distinguishes -0.0 and NaNs."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b have the same dtype, shape and bits; compared on the CPU, so either may be a
    CUDA tensor."""
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    diff = (bits_of(a) != bits_of(b)).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} elements differ, first at {diff[0].item()}: " \
        f"{a.reshape(-1)[diff[0]].item()!r} vs {b.reshape(-1)[diff[0]].item()!r}"


def pack_codes(q: Quantized, packed: bool) -> torch.Tensor:
    """q's codes as the uint8 stream `gpu.dequantize_packed` reads (on the CPU): bit-packed
    (5 trits per byte for ternary), or with packed=False one code per byte."""
    codes = q.codes.reshape(-1).numpy()
    if not packed:
        return torch.from_numpy(codes.copy())
    if q.spec.kind == "ternary":
        return torch.from_numpy(bitpack.pack_trits(codes))
    return torch.from_numpy(bitpack.pack(codes, q.spec.bits))


@st.composite
def specs(draw) -> QuantSpec:
    kind = draw(st.sampled_from(["int", "int", "int", "ternary"]))
    bits = draw(st.integers(1, 8)) if kind == "int" else 2
    symmetric = kind == "ternary" or draw(st.booleans())
    clip, clip_param = draw(st.sampled_from([("max", 0.0), ("max", 0.0), ("sdclip", 2.5)]))
    return QuantSpec(kind=kind, bits=bits, symmetric=symmetric,
                     group=draw(st.sampled_from([0, 0, 1, 7, 16, 32, 128])),
                     scale_dtype=draw(st.sampled_from(["fp16", "bf16", "q8"])),
                     clip=clip, clip_param=clip_param)


shapes = st.one_of(
    st.tuples(st.integers(1, 300)),
    st.tuples(st.integers(1, 40), st.integers(1, 300)),
    st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 40)),
)


def weights(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian weights on the CPU, rows scaled over a few orders of magnitude, ~5% exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:1] + (1,) * (len(shape) - 1), generator=g))
    w[torch.rand(shape, generator=g) < 0.05] = 0.0  # exact zeros: code at the zero point
    return w.to(dtype)


def every_code(bits: int, symmetric: bool, rows: int, row_len: int, group: int) -> Quantized:
    """Every code value at every position of an 8-code chunk (so at every bit offset of a
    field), neighbouring codes different; random scales, zero points cycling through the levels."""
    spec = QuantSpec(kind="int", bits=bits, symmetric=symmetric, group=group)
    i = torch.arange(rows * row_len)
    codes = ((i // 8 + 3 * (i % 8)) % (1 << bits)).to(torch.uint8)
    assert all(codes[p::8].unique().numel() == 1 << bits for p in range(8))
    codes = codes.view(rows, row_len)
    ng = schemes.n_groups(row_len, group)
    scales = torch.rand(rows, ng, generator=torch.Generator().manual_seed(bits)).half().float() + 0.01
    zeros = None if symmetric else (torch.arange(rows * ng) * 5 % (1 << bits)).to(torch.uint8).view(rows, ng)
    return Quantized(spec, (rows, row_len), codes, scales, zeros)


def scale_edge_rows() -> torch.Tensor:
    """Rows at the scale table's edges, float32 (7, 16): all zeros (the scale floor), huge (the fp16
    ceiling: every quotient saturates), fp16-subnormal scales, scales that are exact fp16 and bf16
    ties (1 + 2^-11 is halfway between two fp16 values), asymmetric rows entirely above or below zero."""
    tie16 = 1 + 2**-11
    return torch.stack([
        torch.zeros(16),
        torch.linspace(-1.0, 1.0, 16) * 3e38,
        torch.linspace(-1e-6, 2e-6, 16),
        torch.linspace(-31, 31, 16) * tie16,
        torch.linspace(-31, 31, 16) * (1 + 2**-8),
        torch.linspace(0.5, 3.0, 16),
        torch.linspace(-3.0, -0.5, 16),
    ])


def refuse_generic_kernel(monkeypatch) -> None:
    """Make the one-code-per-element fallback kernel fail, so a test proves the chunk kernel ran."""
    from pgolf_codec import gpu

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the per-element fallback kernel ran")
    monkeypatch.setattr(gpu, "_dequant_kernel", Refuse())
