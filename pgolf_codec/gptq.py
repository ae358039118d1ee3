"""GPTQ: Hessian-aware rounding of one weight matrix into a codec ``Quantized``, plus low-rank
error correction.

Given a linear layer ``y = x Wᵀ`` (W: ``rows × cols``) and the input second moment
``H = E[xᵀx]`` (``cols × cols``), the expected squared output error of a quantized Ŵ is
``tr((W−Ŵ) H (W−Ŵ)ᵀ)``. GPTQ (Frantar et al., 2022) quantizes columns one at a time and pushes
each column's rounding error onto the not-yet-quantized columns through the inverse Hessian,
so later columns compensate for earlier ones. Numerics follow the codec exactly: codes are
computed with the spec's stored (already rounded) scales, so ``dequantize`` of the result is
bit for bit the Ŵ that GPTQ optimised against.

Scales. Per-row specs (``group == 0``) take their scales from the spec's clip rule applied to
the original weights before the sweep. Per-group specs fix a group's scale the first time the
sweep reaches one of its columns, from the group's *current* (error-updated) weights — the
pending lazy-batch updates of the current block are applied to that snapshot, so it is exactly
the values the sweep would see. Without ``act_order`` this is the usual "scale at the group's
first column"; with ``act_order`` groups stay contiguous in the *original* column order (the
layout the codec stores) and the first column reached is the group's highest-Hessian column.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .lowrank import LOWRANK_A, LOWRANK_B, apply_lowrank  # noqa: F401 (re-exported)

from pgolf_codec.schemes import Quantized, QuantSpec, _round_scale, dequantize, quantize

__all__ = ["gptq_quantize", "gptq_quantize_many", "hessian_error", "lowrank_correction", "apply_lowrank",
           "LOWRANK_A", "LOWRANK_B"]



def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((w − w_hat) H (w − w_hat)ᵀ)`` in float64: expected squared output error per input
    vector, summed over output rows. ``w``, ``w_hat``: ``rows × cols``; ``H``: ``cols × cols``."""
    e = (w.reshape(w.shape[0], -1).double() - w_hat.reshape(w.shape[0], -1).double())
    return float(((e @ H.double().to(e.device)) * e).sum())


def _check(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int, int]:
    if spec.kind not in ("int", "ternary"):
        raise ValueError(f"GPTQ needs an integer or ternary spec, got {spec}")
    if w.dim() == 0:
        raise ValueError("GPTQ needs a tensor with at least one dimension")
    rows = w.shape[0] if w.dim() > 1 else 1
    cols = w.numel() // rows if rows else 0
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the row length {cols}")
    if not torch.isfinite(H).all() or not torch.isfinite(w).all():
        raise ValueError("weights and Hessian must be finite")
    return w.reshape(rows, cols), rows, cols


def _levels(spec: QuantSpec) -> tuple[int, int]:
    """Integer range ``[qmin, qmax]`` of the *signed* value q (symmetric) or of the code (asymmetric)."""
    if spec.kind == "ternary":
        return -1, 1
    if not spec.symmetric:
        return 0, 2 ** spec.bits - 1
    if spec.bits == 1:
        return -1, 1
    qmax = 2 ** (spec.bits - 1) - 1
    return -qmax, qmax


def _round_column(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cmax: torch.Tensor | float,
                  sign_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codec numerics for one column: returns (uint8 codes, float32 dequantized values).

    Every integer/ternary layout is written as ``code = clamp(round(x/scale) + zero, 0, cmax)``,
    ``value = (code − zero)·scale``: asymmetric specs use their zero points, symmetric ones
    ``zero = −qmin``, ``cmax = qmax − qmin`` (integer arithmetic in fp32 is exact, so this is
    bit for bit ``clamp(q, qmin, qmax)``). One form lets rows of different bit widths and clips
    share a sweep: ``scale``, ``zero`` and ``cmax`` may differ per row. ``sign_only``: int1,
    which has no zero level.
    """
    if sign_only:
        q = torch.where(x >= 0, 1.0, -1.0)
        return ((q + 1) / 2).to(torch.uint8), q * scale
    # torch.round is round-half-to-even, the codec's rule; the division is plain IEEE fp32.
    code = (torch.round(x / scale) + zero).clamp_min(0.0)
    code = torch.minimum(code, cmax) if isinstance(cmax, torch.Tensor) else code.clamp_max(cmax)
    return code.to(torch.uint8), (code - zero) * scale


def _row_params(spec: QuantSpec, zeros: torch.Tensor | None) -> tuple[torch.Tensor | float, float]:
    """(zero, cmax) of :func:`_round_column` for ``spec``: the stored zero points when asymmetric."""
    lo, hi = _levels(spec)
    if spec.kind == "int" and not spec.symmetric:
        return zeros.to(torch.float32), float(hi)
    return float(-lo), float(hi - lo)


def _group_scales(x: torch.Tensor, spec: QuantSpec, q8_ref: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Stored scales, zero points and q8 scale codes of the clip rule for each row of ``x``
    (``rows × n``, one group per row), all float32 except the uint8 q8 codes.

    q8 scales are relative to one per-tensor reference, which must be fixed before the sweep
    (``q8_ref``, from the clip rule on the original weights): the group's scale is computed in
    fp16, clamped to the reference (an error-updated group can outgrow it: that is a little
    extra clipping) and rounded to the q8 grid against it.
    """
    q8 = spec.scale_dtype == "q8"
    q = quantize(x, replace(spec, group=0, scale_dtype="fp16" if q8 else spec.scale_dtype))
    scale = q.scales[:, 0]
    zero = None if q.zeros is None else q.zeros[:, 0].to(torch.float32)
    if not q8:
        return scale, zero, None
    # Appending the reference keeps it the maximum, so the rounding is against exactly q8_ref.
    raw = torch.cat([torch.minimum(scale, q8_ref), q8_ref.reshape(1)])[None, :]
    rounded, codes, _ = _round_scale(raw, spec)
    return rounded[0, :-1], zero, codes[0, :-1]


def _cholesky_inverse_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with λ = damp·mean(diag H), raising λ ×10 until
    the factorisation succeeds (a PSD Hessian estimated from few tokens can be near-singular)."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(8):
        lam = damp * mean_diag * (10 ** attempt)
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("Hessian is not positive definite even after heavy damping; check the calibration data")


def _sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_col) -> torch.Tensor:
    """The GPTQ column sweep over ``W`` (rows × cols, already in processing order) with the upper
    Cholesky factor ``Hinv`` of the damped inverse Hessian. ``round_col(j, x, W1, Err1, i1, i2)``
    rounds column ``j`` (values ``x``) and returns (codes, dequantized values); ``W1``/``Err1``
    (rows × block) are the block state for group-scale snapshots. Returns the uint8 codes in
    processing order; ``W`` is updated in place (the pending lazy updates)."""
    rows, cols = W.shape
    codes = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The block is held column-major (block × rows): the per-column read and the rank-1
        # update then touch contiguous memory, which matters once many specs are stacked.
        W1t = W[:, i1:i2].t().contiguous()
        Err1t = torch.zeros_like(W1t)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            x = W1t[j]
            c, v = round_col(i1 + j, x, W1t.t(), Err1t.t(), i1, i2)
            codes[i1 + j] = c
            err = (x - v) / Hinv1[j, j]
            W1t[j:] -= Hinv1[j, j:][:, None] * err[None, :]
            Err1t[j] = err
        W[:, i2:] -= Err1t.t() @ Hinv[i1:i2, i2:]
    return codes.t()


def _row_scaled(spec: QuantSpec, cols: int) -> bool:
    """Specs whose scales are fixed per row before the sweep (no group snapshots): these can
    share one stacked sweep. int1 keeps its own (sign-only rounding)."""
    per_row = not spec.group or spec.group >= cols
    return per_row and not (spec.kind == "int" and spec.bits == 1)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True) -> Quantized:
    """Quantize ``w`` (``rows × cols``; higher-rank tensors are viewed as rows) with GPTQ.

    ``H``: ``cols × cols`` input second moment ``E[xᵀx]`` (any positive scale; float32/64).
    ``spec``: an ``int`` or ``ternary`` QuantSpec. ``block_size``: columns per lazy batch
    update. ``damp``: diagonal dampening as a fraction of mean(diag H). ``act_order``: process
    columns by decreasing Hessian diagonal. Runs on ``w``'s device (CUDA when ``w`` is there).

    Dead inputs (zero Hessian diagonal: the input is always 0) get diagonal 1 and their weights
    set to 0, which costs nothing in output error. Returns a ``Quantized`` whose ``dequantize``
    is exactly the GPTQ solution; measure its quality with :func:`hessian_error`.
    """
    return gptq_quantize_many(w, H, [spec], block_size=block_size, damp=damp, act_order=act_order)[0]


def gptq_quantize_many(w: torch.Tensor, H: torch.Tensor, specs: list[QuantSpec], *, block_size: int = 128,
                       damp: float = 0.01, act_order: bool = True) -> list[Quantized]:
    """:func:`gptq_quantize` of one weight under several specs, each result identical to a
    separate call. The damped inverse-Hessian factor depends only on ``H``, ``damp`` and the
    column order, so it is computed once. GPTQ treats rows independently given that factor, so
    all per-row-scale specs (any bits, clip, symmetric or not) are swept together as one stacked
    ``(n·rows) × cols`` matrix: the column loop — Python-bound on CPU, launch-bound on GPU —
    runs once instead of n times. Grouped specs get their own sweep (their scales are fixed
    from per-spec snapshots during it). Repeated specs are computed once."""
    specs = list(specs)
    if not specs:
        return []
    for spec in specs:
        W2, rows, cols = _check(w, H, spec)
    if W2.numel() == 0:
        return [quantize(w, spec) for spec in specs]
    dev = W2.device
    W = W2.to(torch.float32).clone()
    Hd = H.to(dev, torch.float64).clone()  # fp64 for the factorisation: H spans many decades
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(torch.diag(Hd), descending=True, stable=True) if act_order else torch.arange(cols, device=dev)
    W = W[:, perm]
    Hinv = _cholesky_inverse_upper(Hd[perm][:, perm], damp).to(torch.float32)
    inv_perm = torch.argsort(perm)
    shape = tuple(int(d) for d in w.shape)

    unique = list(dict.fromkeys(specs))
    done: dict[QuantSpec, Quantized] = {}
    stacked = [s for s in unique if _row_scaled(s, cols)]
    if stacked:
        refs = [quantize(W2, s) for s in stacked]  # clip-rule scales of the original weights
        params = [_row_params(s, r.zeros) for s, r in zip(stacked, refs)]
        scale = torch.cat([r.scales[:, 0] for r in refs])
        zero = torch.cat([torch.as_tensor(z, dtype=torch.float32, device=dev).reshape(-1).expand(rows) for z, _ in params])
        cmax = torch.cat([torch.full((rows,), c, dtype=torch.float32, device=dev) for _, c in params])
        codes = _sweep(W.repeat(len(stacked), 1), Hinv, block_size,
                       lambda j, x, *_: _round_column(x, scale, zero, cmax))[:, inv_perm]
        for k, (s, r) in enumerate(zip(stacked, refs)):
            done[s] = replace(r, shape=shape, codes=codes[k * rows:(k + 1) * rows].contiguous())
    for spec in unique:
        if spec not in done:
            done[spec] = _gptq_grouped(W2, W.clone(), Hinv, perm, inv_perm, spec, block_size, shape)
    return [done[s] for s in specs]


def _gptq_grouped(W2: torch.Tensor, W: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor,
                  inv_perm: torch.Tensor, spec: QuantSpec, block_size: int, shape: tuple[int, ...]) -> Quantized:
    """One spec's sweep with group scales fixed when the sweep first reaches a group (see the
    module notes); also int1. ``W``: the permuted working copy, consumed."""
    rows, cols = W.shape
    dev = W.device
    ref = quantize(W2, spec)  # clip-rule scales of the original weights (per-row specs keep them)
    group = spec.group if spec.group and spec.group < cols else 0
    n_groups = math.ceil(cols / group) if group else 1
    col_group = (perm // group) if group else torch.zeros(cols, dtype=torch.long, device=dev)
    pos = inv_perm  # permuted position of each original column
    asym = spec.kind == "int" and not spec.symmetric
    q8 = spec.scale_dtype == "q8"
    sign_only = spec.kind == "int" and spec.bits == 1
    scales = ref.scales.clone()
    zeros = ref.zeros.to(torch.float32) if asym else None
    scale_codes = ref.scale_codes.clone() if q8 else None
    fixed = [not group] * n_groups
    col_group_list = col_group.tolist()
    zero_sym, cmax = _row_params(spec, ref.zeros)

    def round_col(jg: int, x: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, i1: int, i2: int):
        g = col_group_list[jg]
        if not fixed[g]:
            # Snapshot of the group's current values: in-block columns from W1, later
            # columns from W minus the block's pending (not yet applied) lazy update.
            j = jg - i1
            members = pos[g * group:min((g + 1) * group, cols)]
            snap = torch.empty(rows, len(members), dtype=torch.float32, device=dev)
            inside = members < i2
            snap[:, inside] = W1[:, members[inside] - i1]
            out = members[~inside]
            if len(out):
                snap[:, ~inside] = W[:, out] - Err1[:, :j] @ Hinv[i1:i1 + j, out]
            order = torch.argsort(perm[members])  # original column order within the group
            sc, z, e = _group_scales(snap[:, order], spec, ref.scale_ref)
            scales[:, g] = sc
            if asym:
                zeros[:, g] = z
            if q8:
                scale_codes[:, g] = e
            fixed[g] = True
        return _round_column(x, scales[:, g], zeros[:, g] if asym else zero_sym, cmax, sign_only)

    codes = _sweep(W, Hinv, block_size, round_col)
    return replace(ref, shape=shape, codes=codes[:, inv_perm],
                   scales=scales, zeros=None if zeros is None else zeros.to(torch.uint8),
                   scale_codes=scale_codes)


def lowrank_correction(w: torch.Tensor, w_hat: torch.Tensor, rank: int, spec_for_factors: QuantSpec,
                       H: torch.Tensor | None = None) -> tuple[Quantized, Quantized]:
    """Quantized factors ``A`` (``rows × rank``) and ``B`` (``rank × cols``) with
    ``w_hat + A·B`` closer to ``w``: the best rank-``rank`` fit of the residual in the
    ``H``-weighted norm ``‖(E − AB) H^{1/2}‖`` (plain Frobenius when ``H`` is None).

    With ``H = L Lᵀ`` the optimum is the truncated SVD of ``E L``. ``A`` is quantized first
    (round-to-nearest with the spec's clip rule); ``B`` is then refitted by least squares
    against the quantized ``Â`` — the optimal B for a fixed Â does not depend on H — and
    quantized with GPTQ under ``H`` so its rounding error is also Hessian-aware.
    """
    if w.dim() != 2 or w_hat.shape != w.shape:
        raise ValueError(f"low-rank correction needs matching 2-D tensors, got {tuple(w.shape)} and {tuple(w_hat.shape)}")
    rows, cols = w.shape
    Hf = H if H is not None else torch.eye(cols, dtype=torch.float32, device=w.device)
    _check(w, Hf, spec_for_factors)
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank must be in 1..{min(rows, cols)}, got {rank}")
    E = w.double() - w_hat.double()
    M = E
    if H is not None:
        Hd = H.to(E.device, torch.float64)
        # A tiny ridge makes a rank-deficient H (dead inputs) factorisable without changing the fit.
        ridge = 1e-8 * float(torch.diag(Hd).mean().clamp_min(1e-30))
        M = E @ torch.linalg.cholesky(Hd + ridge * torch.eye(cols, dtype=Hd.dtype, device=Hd.device))
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    A = (U[:, :rank] * S[:rank].sqrt()).float()
    qa = quantize(A, spec_for_factors)
    A_hat = dequantize(qa).double()
    B = (torch.linalg.pinv(A_hat) @ E).float()  # pinv: Â may be rank-deficient after rounding
    qb = gptq_quantize(B, Hf, spec_for_factors)
    return qa, qb


