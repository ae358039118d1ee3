"""GPTQ against round-to-nearest, codec consistency, dead inputs, and low-rank correction."""
from __future__ import annotations

import pytest
import torch

from pgolf_codec.gptq import apply_lowrank, gptq_quantize, gptq_quantize_many, hessian_error, lowrank_correction
from pgolf_codec.schemes import QuantSpec, dequantize, quantize

ROWS, COLS = 48, 160


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and a strongly correlated input Hessian E[xᵀx] (like real activations)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g)
    mix = torch.randn(COLS, COLS, generator=g) * 0.3 + torch.eye(COLS)
    x = torch.randn(2048, COLS, generator=g) @ mix
    return w, x.T @ x / len(x)


SCHEMES = ["int3", "int4", "int6", "int6:sdclip=3", "int4:group=32", "int3:group=64:scale=q8",
           "int4:asym:group=32", "int5:percentile=99.5", "ternary", "ternary:group=32", "int2"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_round_to_nearest(layer, scheme: str, act_order: bool) -> None:
    w, H = layer
    spec = QuantSpec.parse(scheme)
    rtn = hessian_error(w, dequantize(quantize(w, spec)), H)
    q = gptq_quantize(w, H, spec, act_order=act_order, block_size=64)
    assert q.spec == spec and q.shape == tuple(w.shape) and q.codes.dtype == torch.uint8
    assert q.codes.shape == (ROWS, COLS) and q.scales.shape == quantize(w, spec).scales.shape
    assert int(q.codes.max()) < spec.levels
    err = hessian_error(w, dequantize(q), H)
    assert err < 0.9 * rtn, f"{scheme}: GPTQ {err:.1f} vs RTN {rtn:.1f}"


@pytest.mark.parametrize("scheme", ["int4", "int4:group=32", "int3:asym:group=64", "ternary", "int1"])
def test_diagonal_hessian_reduces_to_round_to_nearest(layer, scheme: str) -> None:
    # With a diagonal H there is no cross-column error feedback: GPTQ must round exactly like the codec.
    w, H = layer
    spec = QuantSpec.parse(scheme)
    q = gptq_quantize(w, torch.diag(torch.diag(H)), spec, act_order=True)
    ref = quantize(w, spec)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales)


@pytest.mark.parametrize("act_order", [True, False])
def test_many_specs_match_separate_calls(layer, act_order: bool) -> None:
    # The shared factorisation and the stacked sweep of per-row specs (mixed bits, clips,
    # asymmetric, ternary) must give bit for bit what one call per spec gives; grouped, q8 and
    # int1 specs take their own sweep, and repeated specs come back once each, in order.
    w, H = layer
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0  # a dead input as well
    names = ["int4:sdclip=6", "int6:sdclip=12.5", "int8", "int3:asym", "ternary", "int1",
             "int4:group=32", "int3:group=64:scale=q8", "int4:asym:group=32", "int4:sdclip=6"]
    specs = [QuantSpec.parse(n) for n in names]
    many = gptq_quantize_many(w, H, specs, act_order=act_order, block_size=64)
    assert len(many) == len(specs)
    for spec, q in zip(specs, many):
        ref = gptq_quantize(w, H, spec, act_order=act_order, block_size=64)
        assert q.spec == spec and q.shape == ref.shape and q.codes.is_contiguous()
        assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales), spec
        assert (q.zeros is None) == (ref.zeros is None) and (q.zeros is None or torch.equal(q.zeros, ref.zeros))
        assert (q.scale_codes is None) == (ref.scale_codes is None)
        assert q.scale_codes is None or torch.equal(q.scale_codes, ref.scale_codes)
    assert torch.equal(many[0].codes, many[-1].codes)
    assert gptq_quantize_many(w, H, []) == []


def test_stored_values_are_what_gptq_chose(layer) -> None:
    # Re-quantizing the dequantized GPTQ tensor with its own scales must reproduce the codes:
    # every code is the codec's rounding of a representable value.
    w, H = layer
    q = gptq_quantize(w, H, QuantSpec.parse("int4:group=32"), act_order=True)
    v = dequantize(q).view(ROWS, -1, 32)
    codes = torch.round(v / q.scales[..., None]).clamp(-7, 7) + 7
    assert torch.equal(codes.reshape(ROWS, COLS).to(torch.uint8), q.codes)


def test_block_size_does_not_change_the_result(layer) -> None:
    w, H = layer
    spec = QuantSpec.parse("int4:group=32")
    a = gptq_quantize(w, H, spec, block_size=16)
    b = gptq_quantize(w, H, spec, block_size=COLS)
    # Lazy batching is an exact reordering of the same updates (up to fp32 rounding).
    assert (a.codes != b.codes).float().mean() < 0.01
    assert hessian_error(w, dequantize(a), H) == pytest.approx(hessian_error(w, dequantize(b), H), rel=0.02)


def test_dead_inputs(layer) -> None:
    w, H = layer
    H = H.clone()
    dead = torch.tensor([0, 5, 77])
    H[dead, :] = 0
    H[:, dead] = 0
    q = gptq_quantize(w, H, QuantSpec.parse("int4"))
    assert torch.all(dequantize(q)[:, dead] == 0)
    assert hessian_error(w, dequantize(q), H) < hessian_error(w, dequantize(quantize(w, QuantSpec.parse("int4"))), H)
    # A completely dead layer: H = 0 must not crash.
    qz = gptq_quantize(w, torch.zeros(COLS, COLS), QuantSpec.parse("int6"))
    assert torch.all(dequantize(qz) == 0)


def test_rejects_bad_input(layer) -> None:
    w, H = layer
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, H[:10, :10], QuantSpec.parse("int4"))
    with pytest.raises(ValueError, match="integer or ternary"):
        gptq_quantize(w, H, QuantSpec.parse("fp16"))
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(w, bad, QuantSpec.parse("int4"))


def test_lowrank_correction_reduces_error(layer) -> None:
    w, H = layer
    spec = QuantSpec.parse("int3")
    w_hat = dequantize(gptq_quantize(w, H, spec))
    base = hessian_error(w, w_hat, H)
    fspec = QuantSpec.parse("int8")
    qa, qb = lowrank_correction(w, w_hat, 8, fspec, H=H)
    assert qa.shape == (ROWS, 8) and qb.shape == (8, COLS)
    sd = {"x.weight": w_hat, "x.weight.lr_a": dequantize(qa), "x.weight.lr_b": dequantize(qb), "y": torch.ones(3)}
    folded = apply_lowrank(sd)
    assert set(folded) == {"x.weight", "y"}
    err = hessian_error(w, folded["x.weight"], H)
    assert err < 0.9 * base
    # The Hessian-weighted fit beats the plain Frobenius fit in the Hessian norm.
    pa, pb = lowrank_correction(w, w_hat, 8, fspec)
    assert err < hessian_error(w, w_hat + dequantize(pa) @ dequantize(pb), H)


def test_apply_lowrank_rejects_malformed() -> None:
    w = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="no matching"):
        apply_lowrank({"w": w, "w.lr_a": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="no matching"):
        apply_lowrank({"w": w, "w.lr_b": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="do not match"):
        apply_lowrank({"w": w, "w.lr_a": torch.zeros(4, 2), "w.lr_b": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match="not in the state dict"):
        apply_lowrank({"w.lr_a": torch.zeros(4, 2), "w.lr_b": torch.zeros(2, 6)})
