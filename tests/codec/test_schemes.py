"""Quantization numerics: spec grammar, exact fake_quant == dequantize(quantize), edge cases."""
from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pgolf_codec import QuantSpec, Recipe, dequantize, fake_quant, fake_quant_ste, quantize
from pgolf_codec.schemes import Q8_TABLE, SCHEMES, n_groups, rows_view_shape

SPECS = [
    "int1", "int2", "int3:asym", "int4:group=64", "int5:sdclip=3", "int6:sdclip=12.5:group=128",
    "int7:percentile=99.5", "int8", "int8:scale=q8", "int6:scale=bf16", "int4:asym:group=16:scale=q8",
    "int2:asym:sdclip=2.5:group=7", "int5:mse", "int3:asym:mse=5:group=32", "int1:asym", "ternary",
    "ternary:group=32:scale=q8", "ternary:mse=8", "int6:percentile=99.9:group=50", "fp16", "bf16", "fp32",
]


@st.composite
def tensors(draw, max_rows=9, max_len=97):
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.integers(0, max_rows))] + [draw(st.integers(0, max_len)) for _ in range(ndim - 1)]
    if ndim == 3:
        shape[2] = min(shape[2], 5)
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "heavy", "zeros", "const", "tiny", "huge"]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "heavy":
        w = w ** 3
    elif kind == "zeros":
        w = torch.zeros(shape)
    elif kind == "const":
        w = torch.full(shape, -0.5)
    elif kind == "tiny":
        w = w * 1e-30
    elif kind == "huge":
        w = w * 1e30
    return w


@pytest.mark.parametrize("text", SPECS)
def test_parse_roundtrip(text):
    spec = QuantSpec.parse(text)
    assert str(spec) == text
    assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "int9", "int0", "int6:group=-1", "int6:sdclip=0", "int6:percentile=101",
                                 "ternary:asym", "fp16:group=8", "int6:foo", "int6:scale=fp8", "int6:mse=1",
                                 "int6:max=3", "int6:sdclip=nan"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        QuantSpec.parse(bad)


@pytest.mark.parametrize("text", SPECS)
@settings(max_examples=12)
@given(w=tensors())
def test_fake_quant_is_dequantize_of_quantize(text, w):
    spec = QuantSpec.parse(text)
    if spec.is_float and w.abs().max().item() if w.numel() else False:
        w = w.clamp(-6e4, 6e4)  # fp16 passthrough of 1e30 is inf by definition; keep the check exact
    q = quantize(w, spec)
    d = dequantize(q)
    f = fake_quant(w, spec)
    assert d.shape == w.shape and f.dtype == torch.float32
    assert torch.equal(d, f)
    assert torch.isfinite(d).all()
    if not spec.is_float:
        rows, row_len = rows_view_shape(tuple(w.shape))
        assert q.codes.dtype == torch.uint8 and tuple(q.codes.shape) == (rows, row_len)
        assert tuple(q.scales.shape) == (rows, n_groups(row_len, spec.group))
        if q.codes.numel():
            assert int(q.codes.max()) < spec.levels
        if q.scales.numel():
            assert (q.scales > 0).all() and torch.isfinite(q.scales).all()
        if spec.scale_dtype == "fp16":
            assert torch.equal(q.scales, q.scales.half().float())  # rounded before use


def test_zero_rows_and_groups_have_finite_scales():
    w = torch.zeros(3, 10)
    w[1] = torch.linspace(-1, 1, 10)
    for text in ("int6", "int4:asym:group=4", "int8:scale=q8", "ternary", "int1", "int6:scale=bf16:mse"):
        q = quantize(w, QuantSpec.parse(text))
        assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
        out = dequantize(q)
        if text == "int1":  # no zero level: a zero row decodes to +floor scale, still finite
            assert (out[0] == q.scales[0, 0]).all() and float(q.scales[0, 0]) == 2.0**-24
        else:
            assert torch.equal(out[0], torch.zeros(10)) and torch.equal(out[2], torch.zeros(10))


def test_symmetric_int_error_bound_and_exact_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    for b in range(2, 9):
        q = quantize(w, QuantSpec(bits=b))
        err = (dequantize(q) - w).abs()
        assert (err <= q.scales * 0.5 + 1e-7 + (w.abs() - q.scales * ((1 << (b - 1)) - 1)).clamp(min=0)).all()
        qmax = (1 << (b - 1)) - 1
        assert int(q.codes.max()) <= 2 * qmax


def test_clipping_reduces_range():
    torch.manual_seed(1)
    w = torch.randn(8, 4096)
    w[:, 0] = 50.0  # an outlier per row
    s_max = quantize(w, QuantSpec.parse("int6")).scales
    s_sd = quantize(w, QuantSpec.parse("int6:sdclip=4")).scales
    s_pct = quantize(w, QuantSpec.parse("int6:percentile=99")).scales
    assert (s_sd < s_max / 5).all() and (s_pct < s_max / 5).all()


def test_mse_clip_not_worse_than_max():
    torch.manual_seed(2)
    w = torch.randn(32, 512) ** 3
    for base in ("int4", "int3:asym:group=64", "ternary"):
        e_max = (fake_quant(w, QuantSpec.parse(base)) - w).pow(2).sum(-1)
        e_mse = (fake_quant(w, QuantSpec.parse(base + ":mse")) - w).pow(2).sum(-1)
        if base == "ternary":  # the grid includes the absmean ratio 1.0 only approximately
            assert e_mse.sum() <= e_max.sum()
        else:
            assert (e_mse <= e_max + 1e-6).all()


def test_q8_table_is_correctly_rounded():
    getcontext().prec = 60
    for e in range(256):
        exact = Decimal(2) ** (Decimal(-e) / 16)
        got = Decimal(float(Q8_TABLE[e]))
        nxt = Decimal(float(np.nextafter(np.float32(Q8_TABLE[e]), np.float32(2))))
        prv = Decimal(float(np.nextafter(np.float32(Q8_TABLE[e]), np.float32(0))))
        assert abs(got - exact) <= abs(nxt - exact) and abs(got - exact) <= abs(prv - exact)


def test_q8_relative_scale_error_is_half_a_step():
    torch.manual_seed(3)
    w = torch.randn(200, 64) * torch.logspace(-3, 0, 200)[:, None]
    q8 = quantize(w, QuantSpec.parse("int8:scale=q8")).scales
    ref = w.abs().amax(-1, keepdim=True) / 127
    ratio = (q8 / ref).log2() * 16
    assert ratio.abs().max() <= 0.5 + 1e-3


def test_fake_quant_keeps_dtype_and_ste_gradient_is_identity():
    w = torch.randn(4, 32, requires_grad=True)
    out = fake_quant_ste(w, QuantSpec.parse("int4"))
    assert torch.equal(out.detach(), fake_quant(w.detach(), QuantSpec.parse("int4")))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    wb = torch.randn(4, 32).bfloat16()
    assert fake_quant(wb, QuantSpec.parse("int6")).dtype == torch.bfloat16


def test_fake_quant_compiles_without_graph_breaks():
    spec = QuantSpec.parse("int6:sdclip=12.5:group=64")
    w = torch.randn(64, 256)
    explained = torch._dynamo.explain(lambda x: fake_quant(x, spec))(w)
    assert explained.graph_break_count == 0


def test_quantize_rejects_non_finite_and_non_float():
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([1.0, float("nan")]), QuantSpec())
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.arange(4), QuantSpec())


def test_scheme_table_consistent_with_specs():
    for name, info in SCHEMES.items():
        spec = QuantSpec.parse(name)
        assert spec.name == name and spec.bits == info.bits and spec.levels == info.levels


def test_recipe_first_match_wins_and_roundtrips(tmp_path):
    r = Recipe.parse("tok_emb*=int8;*.norm.weight=fp16\n*=int6:sdclip=12.5")
    assert r.spec_for("tok_emb.weight") == QuantSpec.parse("int8")
    assert r.spec_for("blocks.0.norm.weight").kind == "fp16"
    assert str(r.spec_for("blocks.0.attn.q.weight")) == "int6:sdclip=12.5"
    assert Recipe.parse(str(r)) == r
    assert Recipe.coerce("int6:sdclip=12.5").spec_for("x") == QuantSpec.parse("int6:sdclip=12.5")
    with pytest.raises(ValueError, match="no rule"):
        Recipe.parse("a*=int8").spec_for("b")
    (tmp_path / "r.toml").write_text('"tok_emb*" = "int8"\n"*" = "int6:group=64"\n')
    (tmp_path / "r.json").write_text('{"rules": [{"pattern": "tok_emb*", "scheme": "int8"}, {"pattern": "*", "scheme": "int6:group=64"}]}')
    assert Recipe.load(tmp_path / "r.toml") == Recipe.load(tmp_path / "r.json") == Recipe.parse("tok_emb*=int8;*=int6:group=64")
    (tmp_path / "bad.toml").write_text('"x" = 3\n')
    with pytest.raises(ValueError):
        Recipe.load(tmp_path / "bad.toml")


def test_gaussian_code_entropy_follows_step():
    # the design fact the coders rely on: entropy ≈ 2.05 + log2(σ/Δ) bits for Gaussian rows
    torch.manual_seed(4)
    w = torch.randn(64, 4096)
    q = quantize(w, QuantSpec.parse("int6:sdclip=12.5"))
    counts = np.bincount(q.codes.numpy().ravel(), minlength=64).astype(float)
    p = counts[counts > 0] / counts.sum()
    h = -(p * np.log2(p)).sum()
    step = float(q.scales.mean())
    assert abs(h - (2.05 + math.log2(1.0 / step))) < 0.1


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that equality also tells -0.0 from 0.0."""
    t = t.detach().contiguous().reshape(-1)
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("text", SPECS)
@settings(max_examples=10)
@given(w=tensors(), bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fake_quant_ste_forward_is_fake_quant_exactly_and_gradient_is_identity(text, w, bf16, seed):
    spec = QuantSpec.parse(text)
    w = (w.bfloat16() if bf16 else w).requires_grad_(True)
    out = fake_quant_ste(w, spec)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(_bits(out), _bits(fake_quant(w.detach(), spec)))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(w.dtype)
    out.backward(g)
    assert torch.equal(_bits(w.grad), _bits(g))


@pytest.mark.parametrize("text", [s for s in SPECS if not QuantSpec.parse(s).is_float])
@settings(max_examples=10)
@given(w=tensors())
def test_group_scales_are_the_tables_quantize_stores(text, w):
    from pgolf_codec.schemes import group_scales

    spec = QuantSpec.parse(text)
    if w.numel() == 0:
        return
    q = quantize(w, spec)
    gs = group_scales(w.reshape(rows_view_shape(tuple(w.shape))), spec)
    assert torch.equal(_bits(gs.scales), _bits(q.scales))
    for got, want in ((gs.zeros, q.zeros), (gs.scale_codes, q.scale_codes), (gs.scale_ref, q.scale_ref)):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got.to(want.dtype), want)


def test_scale_statistics_do_not_depend_on_summation_order():
    # QAT computes scales in a compiled graph on the GPU, the exporter in eager code, possibly on
    # the CPU: their reductions sum in different orders. The clip statistics (before the scale is
    # rounded to fp16, which would hide most differences) must not care.
    from pgolf_codec.schemes import _clip_bounds, _grouped

    g = torch.Generator().manual_seed(7)
    for spec in (QuantSpec.parse("int6:sdclip=12.5"), QuantSpec.parse("int5:asym:sdclip=4:group=256"),
                 QuantSpec.parse("ternary")):
        w = torch.randn(64, 4096, generator=g) * 0.03 + 0.001
        G = spec.group or w.shape[1]
        flipped = w.view(64, -1, G).flip(-1).reshape(64, -1)  # same values per group, other order
        (wa, count, gs), (wb, _, _) = _grouped(w, spec), _grouped(flipped, spec)
        for a, b in zip(_clip_bounds(wa, count, gs, spec), _clip_bounds(wb, count, gs, spec)):
            assert torch.equal(a, b), spec


def _mse_scales_one_ratio_at_a_time(w2: torch.Tensor, spec: QuantSpec):
    """The mse clip search written the plain way: each grid ratio in order, a strictly smaller
    error wins (ties keep the larger ratio); the vectorized search must choose the same tables."""
    from pgolf_codec.schemes import _clip_bounds, _codes_from_scale, _grouped, _mse_grid, _scale_and_zero, _values

    wg, count, g = _grouped(w2.float(), spec)
    base = QuantSpec(spec.kind, spec.bits, spec.symmetric, spec.group, spec.scale_dtype)
    best = None
    lo1, hi1 = _clip_bounds(wg, count, g, base)
    for r in _mse_grid(spec):
        lo, hi = lo1 * r, hi1 * r
        s, z, _, _ = _scale_and_zero(lo, hi, base)
        err = ((_values(_codes_from_scale(wg, s, z, base), s, z, base) - wg) ** 2).sum(-1)
        if best is None:
            best = [err, lo, hi]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, lo, best[1]), torch.where(better, hi, best[2])]
    return _scale_and_zero(best[1], best[2], spec)


@settings(max_examples=60, deadline=None)
@given(scheme=st.sampled_from(["int2:asym:mse", "int3:mse", "int4:mse=5:group=16", "ternary:mse=8",
                               "int2:mse:scale=q8", "int5:asym:mse:group=7:scale=bf16", "int1:mse"]),
       rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans())
def test_mse_search_matches_the_one_ratio_at_a_time_search(scheme, rows, cols, seed, ties):
    """The batched mse search picks the tables the sequential one does, bit for bit (ties included:
    small-integer weights make many ratios score the same error)."""
    from pgolf_codec.schemes import group_scales

    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (rows, cols), generator=gen).float() if ties else torch.randn(rows, cols, generator=gen)
    spec = QuantSpec.parse(scheme)
    got = group_scales(w, spec)
    want = _mse_scales_one_ratio_at_a_time(w, spec)
    assert torch.equal(got.scales, want[0])
    assert (got.zeros is None) == (want[1] is None) and (want[1] is None or torch.equal(got.zeros, want[1]))
    if want[2] is not None:
        assert torch.equal(got.scale_codes, want[2]) and torch.equal(got.scale_ref, want[3])
