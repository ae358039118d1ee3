"""The attention block's fused kernels: ``fused=qk`` and ``fused=xsa`` (``pgolf_train.fused``).

``qk``: QK-norm, the rotary embedding and q's per-head gain as one kernel over the projection's
output (and one for their backward, which recomputes the norm from the input). Compiled, the
reference path makes five kernels of them per layer in the ``h200`` profile (a norm reduction, the
rotation, the gain, the same two for k) and four in the backward, ~7 activation-sized tensors read
or written that the fused pair does not need.

``xsa``: exclusive self-attention, o = y − (y·v̂) v̂ with v̂ = v / ‖v‖ per token and K/V head, as one
kernel that reads the attention output and v once and writes o in the layout the output projection
reads ([B, T, H, D]); its backward is one kernel too (dy, and dv through the normalization). The
reference path makes four kernels forward (7 activation units of traffic against 2.5) and three
backward.

Both keep the reference's bf16 roundings in their forward (each product, sum and cast rounded where
eager rounds it), so the forward matches the compiled reference to the last bit or so; backward
math runs in float32 with one rounding at the end. Without Triton (or off CUDA without the
interpreter) the wrappers run the model's own ops instead, autograd and all.

``attention_forward`` is ``CausalSelfAttention.forward`` with these swapped in; ``apply_fusions``
makes each attention module of a model a ``FusedAttention`` (that forward, the same parameters), so
the model file (which ships in every artifact) carries none of this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf_train import triton_env
from pgolf_train.model import CausalSelfAttention, _weight, apply_rope, rms_norm
from pgolf_train.triton_env import tl, triton

# Launch settings per kernel: ((token, head) rows per program, warps). They can change bits, not
# only speed: the layout splits a row over more or fewer threads, reordering its sums. Timed at the
# h200 shapes, alone and in the step, by benchmarks/fused_attn_bench.py (bit-equal settings only).
LAUNCH = {"qk_fwd": (32, 4), "qk_bwd": (32, 4), "xsa_fwd": (32, 4), "xsa_bwd": (32, 4)}
XSA_EPS = 1e-12  # F.normalize's


def _round(x, DT: tl.constexpr):
    """x rounded to the model's dtype and back: the rounding an eager op in that dtype applies."""
    return x.to(DT).to(tl.float32)


def _row_index(R, T, H, BLOCK_R: tl.constexpr):
    """This program's rows r = (b·T + t)·H + h of R, all four kernels': (r, r < R, h, b·T + t, t, b)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h, bt = rows % H, rows // H
    return rows, rows < R, h, bt, bt % T, bt // T


def _v_tile(v_ptr, b, k, t, svb, svh, svt, rm, D, BLOCK_D: tl.constexpr):
    """The xsa kernels' v rows (b, k, t) of v [B, KV, T, D]: the column index, the tile's mask and
    the tile [BLOCK_R, BLOCK_D] in float32."""
    d = tl.arange(0, BLOCK_D)
    md = rm[:, None] & (d[None, :] < D)
    vb = b.to(tl.int64) * svb + k.to(tl.int64) * svh + t.to(tl.int64) * svt
    return d, md, tl.load(v_ptr + vb[:, None] + d[None, :], mask=md, other=0.0).to(tl.float32)


# The kernels' names for their helpers, Triton functions jitted with them (``_kernel``).
_rnd = _ridx = _vt = None


def _qk_fwd(x_ptr, sxb, sxt, sxh, cos_ptr, sin_ptr, g_ptr, out_ptr, rstd_ptr, R, T, HX, D, HALF, eps,
            HAS_GAIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows r = (b·T + t)·HX + h of x [B, T, HX, D] (last stride 1) → out [B, T, HX, D] contiguous:
    rope(rms_norm(x)) (· gain[h]); rstd [R] float32 saved for the backward."""
    DT = out_ptr.dtype.element_ty
    rows, rm, h, bt, t, b = _ridx(R, T, HX, BLOCK_R)
    base = b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + h.to(tl.int64) * sxh
    obase = rows.to(tl.int64) * D
    d = tl.arange(0, BLOCK_D)
    md = rm[:, None] & (d[None, :] < D)
    x = tl.load(x_ptr + base[:, None] + d[None, :], mask=md, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rm)
    n = _rnd(x * rstd[:, None], DT)  # the rest (unrotated dims): the normed value
    if HAS_GAIN:
        g = _rnd(tl.load(g_ptr + h, mask=rm, other=1.0), DT)[:, None]
        n = _rnd(n * g, DT)
    mr = md & (d[None, :] >= 2 * HALF)
    tl.store(out_ptr + obase[:, None] + d[None, :], n.to(DT), mask=mr)
    i = tl.arange(0, BLOCK_H)
    mh = rm[:, None] & (i[None, :] < HALF)
    x1 = tl.load(x_ptr + base[:, None] + i[None, :], mask=mh, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base[:, None] + HALF + i[None, :], mask=mh, other=0.0).to(tl.float32)
    n1, n2 = _rnd(x1 * rstd[:, None], DT), _rnd(x2 * rstd[:, None], DT)
    c = _rnd(tl.load(cos_ptr + t[:, None] * HALF + i[None, :], mask=mh, other=0.0), DT)
    s = _rnd(tl.load(sin_ptr + t[:, None] * HALF + i[None, :], mask=mh, other=0.0), DT)
    o1 = _rnd(_rnd(n1 * c, DT) + _rnd(n2 * s, DT), DT)
    o2 = _rnd(_rnd(n2 * c, DT) - _rnd(n1 * s, DT), DT)
    if HAS_GAIN:
        o1, o2 = o1 * g, o2 * g
    tl.store(out_ptr + obase[:, None] + i[None, :], o1.to(DT), mask=mh)
    tl.store(out_ptr + obase[:, None] + HALF + i[None, :], o2.to(DT), mask=mh)


def _qk_bwd(x_ptr, sxb, sxt, sxh, do_ptr, sdb, sdt, sdh, cos_ptr, sin_ptr, g_ptr, rstd_ptr, dx_ptr, dg_ptr,
            R, T, HX, D, HALF, HAS_GAIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_H: tl.constexpr):
    """d out (any strides, last 1) → dx [B, T, HX, D] contiguous and, with a gain, each row's
    d loss / d gain[h] in dg [R] float32 (summed per head by the caller)."""
    DT = dx_ptr.dtype.element_ty
    rows, rm, h, bt, t, b = _ridx(R, T, HX, BLOCK_R)
    base = b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + h.to(tl.int64) * sxh
    dbase = b.to(tl.int64) * sdb + t.to(tl.int64) * sdt + h.to(tl.int64) * sdh
    obase = rows.to(tl.int64) * D
    rstd = tl.load(rstd_ptr + rows, mask=rm, other=0.0)[:, None]
    d = tl.arange(0, BLOCK_D)
    mr = rm[:, None] & (d[None, :] < D) & (d[None, :] >= 2 * HALF)
    xr = tl.load(x_ptr + base[:, None] + d[None, :], mask=mr, other=0.0).to(tl.float32)
    dor = tl.load(do_ptr + dbase[:, None] + d[None, :], mask=mr, other=0.0).to(tl.float32)
    i = tl.arange(0, BLOCK_H)
    mh = rm[:, None] & (i[None, :] < HALF)
    x1 = tl.load(x_ptr + base[:, None] + i[None, :], mask=mh, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base[:, None] + HALF + i[None, :], mask=mh, other=0.0).to(tl.float32)
    do1 = tl.load(do_ptr + dbase[:, None] + i[None, :], mask=mh, other=0.0).to(tl.float32)
    do2 = tl.load(do_ptr + dbase[:, None] + HALF + i[None, :], mask=mh, other=0.0).to(tl.float32)
    c = _rnd(tl.load(cos_ptr + t[:, None] * HALF + i[None, :], mask=mh, other=0.0), DT)
    s = _rnd(tl.load(sin_ptr + t[:, None] * HALF + i[None, :], mask=mh, other=0.0), DT)
    n1, n2, nr = x1 * rstd, x2 * rstd, xr * rstd
    if HAS_GAIN:  # the gain multiplies the rounded rotation (the forward's o before · g)
        r1 = _rnd(_rnd(_rnd(n1, DT) * c, DT) + _rnd(_rnd(n2, DT) * s, DT), DT)
        r2 = _rnd(_rnd(_rnd(n2, DT) * c, DT) - _rnd(_rnd(n1, DT) * s, DT), DT)
        dg = tl.sum(do1 * r1 + do2 * r2, 1) + tl.sum(dor * _rnd(nr, DT), 1)
        tl.store(dg_ptr + rows, dg, mask=rm)
        g = _rnd(tl.load(g_ptr + h, mask=rm, other=1.0), DT)[:, None]
        do1, do2, dor = do1 * g, do2 * g, dor * g
    dn1 = do1 * c - do2 * s  # the rotation's transpose
    dn2 = do1 * s + do2 * c
    dot = (tl.sum(dn1 * n1 + dn2 * n2, 1) + tl.sum(dor * nr, 1))[:, None] / D
    tl.store(dx_ptr + obase[:, None] + i[None, :], (rstd * (dn1 - n1 * dot)).to(DT), mask=mh)
    tl.store(dx_ptr + obase[:, None] + HALF + i[None, :], (rstd * (dn2 - n2 * dot)).to(DT), mask=mh)
    tl.store(dx_ptr + obase[:, None] + d[None, :], (rstd * (dor - nr * dot)).to(DT), mask=mr)


def _xsa_fwd(y_ptr, syb, syh, syt, v_ptr, svb, svh, svt, o_ptr, R, T, KV, D, eps,
             G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r = (b·T + t)·KV + k: v [B, KV, T, D] and the G query heads k·G + j of y [B, H, T, D]
    (any strides, last 1) → o [B, T, H, D] contiguous, o = y − (y·v̂) v̂ in the reference's roundings."""
    DT = o_ptr.dtype.element_ty
    rows, rm, k, bt, t, b = _ridx(R, T, KV, BLOCK_R)
    d, md, v = _vt(v_ptr, b, k, t, svb, svh, svt, rm, D, BLOCK_D)
    nrm = tl.maximum(_rnd(tl.sqrt(tl.sum(v * v, 1)), DT), eps)
    vn = _rnd(v / nrm[:, None], DT)
    for j in tl.static_range(G):
        hq = k * G + j
        yb = b.to(tl.int64) * syb + hq.to(tl.int64) * syh + t.to(tl.int64) * syt
        y = tl.load(y_ptr + yb[:, None] + d[None, :], mask=md, other=0.0).to(tl.float32)
        a = _rnd(tl.sum(_rnd(y * vn, DT), 1), DT)
        o = _rnd(y - _rnd(a[:, None] * vn, DT), DT)
        ob = (bt.to(tl.int64) * (KV * G) + hq) * D
        tl.store(o_ptr + ob[:, None] + d[None, :], o.to(DT), mask=md)


def _xsa_bwd(y_ptr, syb, syh, syt, v_ptr, svb, svh, svt, do_ptr, sdb, sdt, sdh, dy_ptr, dv_ptr, R, T, KV, D, eps,
             G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """d o [B, T, H, D] (any strides, last 1) → dy [B, H, T, D] and dv [B, T, KV, D], both contiguous:
    dy = do − (do·v̂) v̂; d v̂ = −Σ_j (y_j·v̂) do_j + (do_j·v̂) y_j, then through v̂ = v / max(‖v‖, eps)."""
    DT = dy_ptr.dtype.element_ty
    rows, rm, k, bt, t, b = _ridx(R, T, KV, BLOCK_R)
    d, md, v = _vt(v_ptr, b, k, t, svb, svh, svt, rm, D, BLOCK_D)
    raw = tl.sqrt(tl.sum(v * v, 1))
    nrm = tl.maximum(raw, eps)
    u = v / nrm[:, None]  # v̂ unrounded: the derivative's
    vn = _rnd(v / tl.maximum(_rnd(raw, DT), eps)[:, None], DT)  # the forward's v̂
    dvn = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for j in tl.static_range(G):
        hq = k * G + j
        yb = b.to(tl.int64) * syb + hq.to(tl.int64) * syh + t.to(tl.int64) * syt
        db = b.to(tl.int64) * sdb + t.to(tl.int64) * sdt + hq.to(tl.int64) * sdh
        y = tl.load(y_ptr + yb[:, None] + d[None, :], mask=md, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + db[:, None] + d[None, :], mask=md, other=0.0).to(tl.float32)
        a = tl.sum(y * vn, 1)[:, None]
        e = tl.sum(do * vn, 1)[:, None]
        yo = ((b.to(tl.int64) * (KV * G) + hq) * T + t) * D
        tl.store(dy_ptr + yo[:, None] + d[None, :], (do - e * vn).to(DT), mask=md)
        dvn -= a * do + e * y
    live = (raw > eps)[:, None]  # below eps the norm is the constant eps: no radial term
    dv = (dvn - tl.where(live, u * tl.sum(u * dvn, 1)[:, None], 0.0)) / nrm[:, None]
    tl.store(dv_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], dv.to(DT), mask=md)


def _kernel(fn):
    """``fn`` jitted (``triton_env.jit``), with the helpers the kernels call (Triton functions too,
    under the names they read from this module's globals: ``_rnd``, ``_ridx`` and ``_vt``)."""
    global _rnd, _ridx, _vt
    if _rnd is None:
        _rnd, _ridx, _vt = triton_env.jit(_round), triton_env.jit(_row_index), triton_env.jit(_v_tile)
    return triton_env.jit(fn)


def _eps(x: Tensor) -> float:
    """F.rms_norm's default eps: its compute dtype's (float32 for bf16 input)."""
    return torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps


def _qk_reference(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> Tensor:
    """The model's ops on x [B, T, HX, D] → [B, T, HX, D]: rope(rms_norm(x)) (· gain per head)."""
    y = apply_rope(rms_norm(x).transpose(1, 2), cos, sin)
    if gain is not None:
        y = y * gain.to(y.dtype)[:, None, None]
    return y.transpose(1, 2)


def _xsa_reference(y: Tensor, v: Tensor) -> Tensor:
    """The model's ops: y [B, H, T, D], v [B, KV, T, D] → o [B, H, T, D]."""
    B, H, T, D = y.shape
    yg, vn = y.reshape(B, v.size(1), -1, T, D), F.normalize(v, dim=-1)[:, :, None]
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(y.shape)


def _launch(fn, name: str, R: int, *args, **kw) -> None:
    """``fn`` jitted, over R rows with ``LAUNCH[name]``'s rows per program and warps."""
    rows, warps = LAUNCH[name]
    _kernel(fn)[(triton.cdiv(R, rows),)](*args, BLOCK_R=rows, num_warps=warps, **kw)


@torch.library.custom_op("pgolf::qk_norm_rope", mutates_args=())
def _qk_op(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    B, T, HX, D = x.shape
    out = torch.empty(B, T, HX, D, dtype=x.dtype, device=x.device)
    rstd = torch.empty(B * T * HX, dtype=torch.float32, device=x.device)
    half = cos.size(-1)
    _launch(_qk_fwd, "qk_fwd", rstd.numel(),
        x, x.stride(0), x.stride(1), x.stride(2), cos.contiguous(), sin.contiguous(), gain if gain is not None else rstd,
        out, rstd, rstd.numel(), T, HX, D, half, _eps(x), HAS_GAIN=gain is not None,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_H=triton.next_power_of_2(half))
    return out, rstd


@_qk_op.register_fake
def _(x, cos, sin, gain):
    B, T, HX, D = x.shape
    return x.new_empty(B, T, HX, D), x.new_empty(B * T * HX, dtype=torch.float32)


@torch.library.custom_op("pgolf::qk_norm_rope_bwd", mutates_args=())
def _qk_bwd_op(do: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, rstd: Tensor
               ) -> tuple[Tensor, Tensor]:
    """→ dx [B, T, HX, D] contiguous, d gain [HX] float32 (empty without a gain)."""
    B, T, HX, D = x.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    dx = torch.empty(B, T, HX, D, dtype=x.dtype, device=x.device)
    dg = torch.empty(rstd.numel() if gain is not None else 0, dtype=torch.float32, device=x.device)
    half = cos.size(-1)
    _launch(_qk_bwd, "qk_bwd", rstd.numel(),
        x, x.stride(0), x.stride(1), x.stride(2), do, do.stride(0), do.stride(1), do.stride(2),
        cos.contiguous(), sin.contiguous(), gain if gain is not None else rstd, rstd, dx, dg if gain is not None else rstd,
        rstd.numel(), T, HX, D, half, HAS_GAIN=gain is not None,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_H=triton.next_power_of_2(half))
    return dx, (dg.view(-1, HX).sum(0) if gain is not None else dg)


@_qk_bwd_op.register_fake
def _(do, x, cos, sin, gain, rstd):
    B, T, HX, D = x.shape
    return x.new_empty(B, T, HX, D), x.new_empty(HX if gain is not None else 0, dtype=torch.float32)


def _qk_setup(ctx, inputs, output):
    x, cos, sin, gain = inputs
    ctx.save_for_backward(x, cos, sin, gain, output[1])
    ctx.has_gain = gain is not None
    ctx.mark_non_differentiable(output[1])


def _qk_backward(ctx, dout, _drstd):
    x, cos, sin, gain, rstd = ctx.saved_tensors
    dx, dg = _qk_bwd_op(dout, x, cos, sin, gain if ctx.has_gain else None, rstd)
    return dx, None, None, (dg.to(gain.dtype) if ctx.has_gain else None)


_qk_op.register_autograd(_qk_backward, setup_context=_qk_setup)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None = None) -> Tensor:
    """x [B, T, HX, D] (a projection's output viewed per head) → [B, HX, T, D]: the model's
    ``apply_rope(rms_norm(x.transpose(1, 2)), cos, sin)`` (· ``gain[h]`` when given), one kernel each way.
    Without Triton for x's device, or x's rows not contiguous, it is those ops (autograd as usual)."""
    if not triton_env.use_triton(x) or x.stride(-1) != 1:
        return _qk_reference(x, cos, sin, gain).transpose(1, 2)
    return _qk_op(x, cos, sin, gain)[0].transpose(1, 2)


@torch.library.custom_op("pgolf::xsa", mutates_args=())
def _xsa_op(y: Tensor, v: Tensor) -> Tensor:
    """y [B, H, T, D], v [B, KV, T, D] → o [B, T, H, D] contiguous."""
    B, H, T, D = y.shape
    KV = v.size(1)
    o = torch.empty(B, T, H, D, dtype=y.dtype, device=y.device)
    R = B * T * KV
    _launch(_xsa_fwd, "xsa_fwd", R,
        y, y.stride(0), y.stride(1), y.stride(2), v, v.stride(0), v.stride(1), v.stride(2), o, R, T, KV, D, XSA_EPS,
        G=H // KV, BLOCK_D=triton.next_power_of_2(D))
    return o


@_xsa_op.register_fake
def _(y, v):
    B, H, T, D = y.shape
    return y.new_empty(B, T, H, D)


@torch.library.custom_op("pgolf::xsa_bwd", mutates_args=())
def _xsa_bwd_op(do: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """d o [B, T, H, D] → dy [B, H, T, D] contiguous, dv [B, T, KV, D] contiguous."""
    B, H, T, D = y.shape
    KV = v.size(1)
    if do.stride(-1) != 1:
        do = do.contiguous()
    dy = torch.empty(B, H, T, D, dtype=y.dtype, device=y.device)
    dv = torch.empty(B, T, KV, D, dtype=v.dtype, device=v.device)
    R = B * T * KV
    _launch(_xsa_bwd, "xsa_bwd", R,
        y, y.stride(0), y.stride(1), y.stride(2), v, v.stride(0), v.stride(1), v.stride(2),
        do, do.stride(0), do.stride(1), do.stride(2), dy, dv, R, T, KV, D, XSA_EPS,
        G=H // KV, BLOCK_D=triton.next_power_of_2(D))
    return dy, dv


@_xsa_bwd_op.register_fake
def _(do, y, v):
    B, H, T, D = y.shape
    return y.new_empty(B, H, T, D), v.new_empty(B, T, v.size(1), D)


def _xsa_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _xsa_backward(ctx, do):
    y, v = ctx.saved_tensors
    dy, dv = _xsa_bwd_op(do, y, v)
    return dy, dv.transpose(1, 2)


_xsa_op.register_autograd(_xsa_backward, setup_context=_xsa_setup)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention: y [B, H, T, D] (attention output), v [B, KV, T, D] → [B, H, T, D],
    each query head's output minus its component along its own token's (normalized) value; the
    result is a transposed view of a [B, T, H, D] tensor, so ``.transpose(1, 2).reshape(B, T, C)`` is free.
    Without Triton for y's device, or rows not contiguous, it is the model's ops (autograd as usual)."""
    if not triton_env.use_triton(y) or y.stride(-1) != 1 or v.stride(-1) != 1:
        return _xsa_reference(y, v)
    return _xsa_op(y, v).transpose(1, 2)


def attention_forward(m, x: Tensor, cos: Tensor, sin: Tensor, scale: float | None, mask=None) -> Tensor:
    """``CausalSelfAttention.forward`` of module ``m`` with ``qk_norm_rope`` (``m.fused_qk``) and
    ``xsa`` (``m.fused_xsa``, where ``m.xsa``) in place of the model's ops, and the document
    segments of ``pgolf_train.doc_attn`` (a 1-D ``mask``) in place of its boolean mask; otherwise
    the same computation."""
    B, T, C = x.shape
    lin = (m.c_q, m.c_k, m.c_v)
    if m.fuse_qkv and not any(l._forward_hooks for l in lin):
        kvd = m.kv * m.hd
        q, k, v = F.linear(x, torch.cat([_weight(l) for l in lin]).to(x.dtype)).split([C, kvd, kvd], -1)
    else:
        q, k, v = (l(x) for l in lin)
    q, k = q.view(B, T, m.h, m.hd), k.view(B, T, m.kv, m.hd)
    v = v.view(B, T, m.kv, m.hd).transpose(1, 2)
    if m.fused_qk:
        q, k = qk_norm_rope(q, cos, sin, m.q_gain), qk_norm_rope(k, cos, sin)
    else:
        q = apply_rope(rms_norm(q.transpose(1, 2)), cos, sin) * m.q_gain.to(q.dtype)[:, None, None]
        k = apply_rope(rms_norm(k.transpose(1, 2)), cos, sin)
    if m.fused_fa4 and mask is None:  # FlashAttention 4 (pgolf_train.fa4_attn): [B, T, heads, D] in and out
        from pgolf_train.fa4_attn import fa4_attention

        y = fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)
    elif mask is not None and mask.dim() == 1:  # doc_attention's segments (fusion "varlen", pgolf_train.doc_attn)
        from pgolf_train.doc_attn import varlen_attention

        # [B*T, heads, D]: a view where q, k, v are [B, T, heads, D] underneath (qk's output, v), else a copy
        flat = [t.transpose(1, 2).reshape(B * T, -1, m.hd) for t in (q, k, v)]
        y = varlen_attention(*flat, mask, T, scale).view(B, T, m.h, m.hd).transpose(1, 2)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
    if m.xsa:
        y = xsa(y, v) if m.fused_xsa else _xsa_reference(y, v)
    if m.gate_w is not None:
        y = y * torch.sigmoid(F.linear(x, m.gate_w.to(x.dtype))).transpose(1, 2)[..., None]
    return m.proj(y.transpose(1, 2).reshape(B, T, C))


class FusedAttention(CausalSelfAttention):
    """The model's attention module with ``attention_forward``: the same parameters and state dict.
    ``bind`` switches a module's class to it and back, which ``torch.compile`` traces as any module
    (a bound partial on the instance it cannot) and ``copy.deepcopy`` carries."""
    fused_qk = fused_xsa = fused_fa4 = False
    forward = attention_forward


def bind(model: torch.nn.Module, qk: bool, fuse_xsa: bool, varlen: bool = False, fa4: bool = False) -> None:
    """Make every attention module of ``model`` a ``FusedAttention`` with these switches (all
    False: a ``CausalSelfAttention`` again, the model file's forward). ``varlen``: the model hands
    attention document segments (``pgolf_train.doc_attn``), which only ``attention_forward`` reads.
    ``fa4``: causal attention by FlashAttention 4 (``pgolf_train.fa4_attn``) in place of SDPA."""
    fused = qk or fuse_xsa or varlen or fa4
    for m in model.modules():
        if not isinstance(m, CausalSelfAttention):
            continue
        m.__dict__.pop("fused_qk", None)
        m.__dict__.pop("fused_xsa", None)
        m.__dict__.pop("fused_fa4", None)
        m.__class__ = FusedAttention if fused else CausalSelfAttention
        if fused:
            m.fused_qk, m.fused_xsa, m.fused_fa4 = qk, fuse_xsa, fa4
