"""Quantization schemes: `QuantSpec`, `Recipe`, `quantize`, `dequantize`, `fake_quant`.

Numerics are normative (spec/FORMAT.md "Numerics"): everything in float32, the scale is
rounded to its stored dtype *before* it is used, codes are round-half-to-even(w / scale)
(IEEE division) clamped, and a value is one float32 multiply `float32(q) * scale`.
`fake_quant(w) == dequantize(quantize(w))` bit for bit on CPU and CUDA.

A tensor of shape (d0, d1, ...) is viewed as `rows = d0` rows of `row_len = d1*d2*...`
elements (a 1-D tensor is one row); each row is split into groups of `group` elements
(0 = the whole row; the last group may be shorter) and every group has one scale.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

KINDS = ("int", "ternary", "fp16", "bf16", "fp32")
SCALE_DTYPES = ("fp16", "bf16", "q8")
CLIPS = ("max", "percentile", "sdclip", "mse")


class SchemeInfo(NamedTuple):
    """One row of the scheme table (mirrored, row for row, in spec/FORMAT.md)."""

    kind: str
    bits: int  # nominal bits per weight reported by the table
    levels: int  # code alphabet size (0 for float passthrough)
    packed_bits: float  # bits per weight once bit-packed (transform 1)


# The one scheme table.  tests/codec/test_spec_doc.py checks FORMAT.md against it.
SCHEMES: dict[str, SchemeInfo] = {
    **{f"int{b}": SchemeInfo("int", b, 1 << b, float(b)) for b in range(1, 9)},
    "ternary": SchemeInfo("ternary", 2, 3, 1.6),
    "fp16": SchemeInfo("fp16", 16, 0, 16.0),
    "bf16": SchemeInfo("bf16", 16, 0, 16.0),
    "fp32": SchemeInfo("fp32", 32, 0, 32.0),
}

# Bytes stored per group scale; q8 adds one float32 reference per tensor.
SCALE_BYTES = {"fp16": 2, "bf16": 2, "q8": 1}

# Scales are clamped to [floor, ceiling] before rounding so that an all-zero group gets a
# finite, non-zero scale (codes 0 -> value 0) and no scale is a float32 subnormal (which
# some GPU paths flush to zero).  fp16 subnormals are float32 normals, so fp16 keeps them.
_SCALE_RANGE = {
    "fp16": (2.0**-24, 65504.0),
    "bf16": (2.0**-126, float(torch.finfo(torch.bfloat16).max)),
    "q8": (2.0**-100, float(torch.finfo(torch.float32).max)),
}

# q8 scales: scale = ref * Q8_TABLE[e], e in 0..255, ref = per-tensor float32 max scale.
# Steps of 2^(1/16) (~4.4 %) over 16 octaves.  Values are float32(2^(-e/16)) correctly
# rounded; the code is chosen against the geometric midpoints Q8_MIDPOINTS, so no
# transcendental function runs at quantization time (identical on every device).
Q8_STEPS_PER_OCTAVE = 16
Q8_TABLE = torch.tensor([2.0 ** (-e / Q8_STEPS_PER_OCTAVE) for e in range(256)], dtype=torch.float32)
_Q8_MIDPOINTS_ASC = torch.tensor(
    [2.0 ** (-(e + 0.5) / Q8_STEPS_PER_OCTAVE) for e in range(254, -1, -1)], dtype=torch.float32
)

_MSE_GRID_DEFAULT = 16
_TOKEN_KIND = re.compile(r"^(int([1-8])|ternary|fp16|bf16|fp32)$")
_INT = re.compile(r"^[0-9]{1,9}$")  # option values: plain ASCII decimals, no sign, '_' or spaces
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$")


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.  Immutable; `QuantSpec.parse(str(s)) == s`.

    kind: "int" | "ternary" | "fp16" | "bf16" | "fp32" (the last three are passthrough).
    bits: 1..8 for int (ternary: 2, floats: 16/32; derived when parsing).
    symmetric: symmetric codes (False: integer zero point per group, int only).
    group: elements per scale along a row; 0 = one scale per row.
    scale_dtype: "fp16" | "bf16" | "q8" (8-bit log-domain, relative to a per-tensor max).
    clip: "max" | "percentile" | "sdclip" | "mse"; clip_param: percentile in (0, 100],
      k for k·std, or the number of grid points for mse (0 = 16).
    """

    kind: str = "int"
    bits: int = 8
    symmetric: bool = True
    group: int = 0
    scale_dtype: str = "fp16"
    clip: str = "max"
    clip_param: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantSpec: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        want_bits = {"ternary": 2, "fp16": 16, "bf16": 16, "fp32": 32}.get(self.kind)
        if want_bits is not None and self.bits != want_bits:
            object.__setattr__(self, "bits", want_bits)
        if self.kind == "int" and not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"QuantSpec: int bits must be 1..8, got {self.bits!r}")
        if self.kind != "int" and not self.symmetric:
            raise ValueError(f"QuantSpec: {self.kind} has no asymmetric variant")
        if not (isinstance(self.group, int) and 0 <= self.group <= 1 << 24):
            raise ValueError(f"QuantSpec: group must be an int in 0..2^24, got {self.group!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec: scale dtype {self.scale_dtype!r} not in {SCALE_DTYPES}")
        if self.clip not in CLIPS:
            raise ValueError(f"QuantSpec: clip {self.clip!r} not in {CLIPS}")
        p = float(self.clip_param)
        if not math.isfinite(p):
            raise ValueError("QuantSpec: clip_param must be finite")
        if self.clip == "percentile" and not 0.0 < p <= 100.0:
            raise ValueError(f"QuantSpec: percentile must be in (0, 100], got {p}")
        if self.clip == "sdclip" and not p > 0.0:
            raise ValueError(f"QuantSpec: sdclip k must be > 0, got {p}")
        if self.clip == "mse" and not (p == 0 or (p.is_integer() and 2 <= p <= 256)):
            raise ValueError(f"QuantSpec: mse grid size must be an integer in 2..256, got {p}")
        if self.clip == "max" and p != 0.0:
            raise ValueError("QuantSpec: clip 'max' takes no parameter")
        if self.is_float and (self.group or self.clip != "max" or self.scale_dtype != "fp16"):
            raise ValueError(f"QuantSpec: {self.kind} passthrough takes no group/clip/scale options")

    @property
    def is_float(self) -> bool:
        """True for fp16/bf16/fp32 passthrough (no codes, no scales)."""
        return self.kind in ("fp16", "bf16", "fp32")

    @property
    def name(self) -> str:
        """The scheme-table key: "int6", "ternary", "fp16", ..."""
        return f"int{self.bits}" if self.kind == "int" else self.kind

    @property
    def levels(self) -> int:
        """Code alphabet size (2^bits, 3 for ternary, 0 for passthrough)."""
        return SCHEMES[self.name].levels

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse `KIND[:asym][:CLIP[=P]][:group=N][:scale=fp16|bf16|q8]` (options in any order).

        CLIP is `max`, `percentile=P` (alias `pct=P`), `sdclip=K` or `mse[=GRID]`; `sym` is
        the written-out default of `asym`.  Each option at most once (one CLIP), values plain
        decimals (spec/FORMAT.md §3 "Scheme strings"); float kinds take no options.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("QuantSpec.parse: empty scheme")
        head, *opts = [t.strip() for t in text.strip().split(":")]
        m = _TOKEN_KIND.match(head)
        if not m:
            raise ValueError(f"QuantSpec.parse: unknown scheme {head!r} in {text!r} (int1..int8, ternary, fp16, bf16, fp32)")
        kw: dict = {"kind": "int" if m.group(2) else head, "bits": int(m.group(2) or 8)}
        if opts and head in ("fp16", "bf16", "fp32"):
            raise ValueError(f"QuantSpec.parse: {head} takes no options, got {text!r}")
        seen: set[str] = set()
        for opt in opts:
            key, eq, val = opt.partition("=")
            family = "clip" if key in ("max", "percentile", "pct", "sdclip", "mse") else key
            try:
                if family in seen:  # each option at most once (one CLIP): no last-one-wins
                    raise ValueError
                seen.add(family)
                if key in ("sym", "asym") and not eq:
                    kw["symmetric"] = key == "sym"
                elif key == "group" and _INT.match(val):
                    kw["group"] = int(val)
                elif key == "scale":
                    kw["scale_dtype"] = val
                elif key == "max" and not eq:
                    kw["clip"], kw["clip_param"] = "max", 0.0
                elif key in ("percentile", "pct", "sdclip") and _DECIMAL.match(val):
                    kw["clip"], kw["clip_param"] = ("sdclip" if key == "sdclip" else "percentile"), float(val)
                elif key == "mse" and (not eq or (_INT.match(val) and int(val) > 0)):  # mse=0 is not "mse"
                    kw["clip"], kw["clip_param"] = "mse", float(val) if eq else 0.0
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"QuantSpec.parse: bad or repeated option {opt!r} in {text!r}") from None
        return cls(**kw)

    def __str__(self) -> str:
        parts = [self.name]
        if not self.symmetric:
            parts.append("asym")
        if self.clip == "mse":
            parts.append("mse" if self.clip_param == 0 else f"mse={_fmt_num(self.clip_param)}")
        elif self.clip != "max":
            parts.append(f"{self.clip}={_fmt_num(self.clip_param)}")
        if self.group:
            parts.append(f"group={self.group}")
        if self.scale_dtype != "fp16":
            parts.append(f"scale={self.scale_dtype}")
        return ":".join(parts)


@dataclass(frozen=True)
class Quantized:
    """A quantized tensor, exactly what the container stores.

    codes: uint8 (rows, row_len), the unsigned code of every element; for passthrough
      specs, the tensor itself in the stored float dtype, shape (rows, row_len).
    scales: float32 (rows, n_groups), already rounded to the stored scale dtype.
    zeros: uint8 (rows, n_groups) integer zero points (asymmetric only), else None.
    scale_codes: uint8 (rows, n_groups), the q8 exponent codes (q8 only), else None.
    scale_ref: float32 0-d tensor, the q8 per-tensor reference scale (q8 only), else None.
    """

    spec: QuantSpec
    shape: tuple[int, ...]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    scale_codes: torch.Tensor | None = None
    scale_ref: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def row_len(self) -> int:
        return int(self.codes.shape[1])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def rows_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row_len) of a tensor shape: (d0, prod(d1...)); a 0-D or 1-D tensor is one row."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(shape[1:])


def n_groups(row_len: int, group: int) -> int:
    """Number of scales per row: 0 for empty rows, 1 for per-row, ceil(row_len/group) else."""
    if row_len == 0:
        return 0
    return 1 if group == 0 or group >= row_len else -(-row_len // group)


def _qmax(spec: QuantSpec) -> int:
    """Largest |q| of a symmetric code (1 for int1 and ternary)."""
    return 1 if spec.kind == "ternary" or spec.bits == 1 else (1 << (spec.bits - 1)) - 1


def _grouped(w2: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Zero-pad rows to whole groups: (wg (rows, ng, G), count (ng,) float32, G)."""
    rows, row_len = w2.shape
    ng = n_groups(row_len, spec.group)
    g = row_len if ng <= 1 else spec.group
    pad = ng * g - row_len
    wg = torch.nn.functional.pad(w2, (0, pad)).view(rows, ng, g)
    count = torch.full((ng,), float(g), dtype=torch.float32, device=w2.device)
    if pad:
        count[-1] = float(g - pad)
    return wg, count, g


def _valid_mask(count: torch.Tensor, g: int) -> torch.Tensor:
    """(ng, G) bool: which slots of each group are real elements (not padding)."""
    return torch.arange(g, device=count.device, dtype=torch.float32)[None, :] < count[:, None]


def _percentile(x: torch.Tensor, count: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Linear-interpolated p-th percentile of each group of x (rows, ng, G) ignoring padding."""
    srt = torch.where(mask, x, torch.full_like(x, float("inf"))).sort(dim=-1).values
    pos = (p / 100.0) * (count - 1.0)  # (ng,)
    lo = pos.floor()
    frac = (pos - lo)[None, :]
    lo_i = lo.long()
    hi_i = torch.minimum(lo_i + 1, (count - 1.0).long())
    idx = lambda i: i[None, :, None].expand(x.shape[0], -1, 1)  # noqa: E731
    a = srt.gather(-1, idx(lo_i)).squeeze(-1)
    b = srt.gather(-1, idx(hi_i)).squeeze(-1)
    return a + (b - a) * frac


def _round_scale(raw: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Round raw float32 scales (rows, ng) to the stored dtype: (scale, q8 codes, q8 ref)."""
    lo, hi = _SCALE_RANGE[spec.scale_dtype]
    raw = raw.clamp(lo, hi)
    if spec.scale_dtype == "fp16":
        return raw.to(torch.float16).float(), None, None
    if spec.scale_dtype == "bf16":
        return raw.to(torch.bfloat16).float(), None, None
    if raw.dim() == 3:  # a stack of candidate tables (the mse search): one reference per table
        ref = raw.amax(dim=(1, 2), keepdim=True)
    else:
        ref = raw.amax() if raw.numel() else torch.zeros((), dtype=torch.float32, device=raw.device)
    ratio = raw / ref
    mids = _Q8_MIDPOINTS_ASC.to(raw.device)
    # e = number of midpoints strictly greater than ratio: nearest step in the log domain.
    e = 255 - torch.searchsorted(mids, ratio.contiguous(), right=True)
    e = e.clamp(0, 255)
    return ref * Q8_TABLE.to(raw.device)[e], e.to(torch.uint8), ref


def _codes_from_scale(wg, scale, zero, spec):
    """Integer codes (as float32, (rows, ng, G)) of wg under per-group scale (and zero point)."""
    t = wg / scale[..., None]
    if not spec.symmetric:
        top = float((1 << spec.bits) - 1)
        return (torch.round(t) + zero[..., None]).clamp(0.0, top)
    qmax = _qmax(spec)
    if spec.kind == "int" and spec.bits == 1:
        return (t >= 0).float()  # q = +1 for w >= 0 else -1; code = (q + 1) / 2
    return torch.round(t).clamp(-qmax, qmax) + qmax


def _values(codes, scale, zero, spec):
    """Dequantized float32 values of codes (rows, ng, G): one multiply float32(q) * scale."""
    if not spec.symmetric:
        q = codes - zero[..., None]
    elif spec.kind == "int" and spec.bits == 1:
        q = codes * 2.0 - 1.0
    else:
        q = codes - float(_qmax(spec))
    return q * scale[..., None]


def _scale_and_zero(lo_c, hi_c, spec):
    """Raw scale and zero point (float32 (rows, ng)) from clip bounds; the scale gets rounded first."""
    if spec.symmetric:
        scale, sc, ref = _round_scale(_div(hi_c, _qmax(spec)), spec)
        return scale, None, sc, ref
    top = float((1 << spec.bits) - 1)
    lo_c = torch.clamp(lo_c, max=0.0)
    hi_c = torch.clamp(hi_c, min=0.0)
    scale, sc, ref = _round_scale(_div(hi_c - lo_c, top), spec)
    zero = torch.round(-lo_c / scale).clamp(0.0, top)
    return scale, zero, sc, ref


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c with IEEE division on every device: CUDA turns a division by a Python scalar into a
    multiplication by its reciprocal, which can differ in the last bit (and then in the scale)."""
    return x / torch.full_like(x, float(c))


def _mean_sd(wg, mask, n):
    """Per-group mean and standard deviation, accumulated in float64 and returned in float32.

    Sums in float32 depend on the reduction order, which differs between the CPU, CUDA and a
    compiled graph; in float64 those differences vanish before the result is rounded to float32,
    so QAT (compiled, on the GPU) and the exporter agree on every scale."""
    w = wg.double()
    mean = w.sum(-1) / n
    var = torch.where(mask, (w - mean[..., None]) ** 2, 0.0).sum(-1) / n  # where, not *: inf·0
    return mean.float(), var.sqrt().float()


def _clip_bounds(wg, count, g, spec):
    """Clip bounds (lo, hi) per group, float32 (rows, ng).  Symmetric: lo is unused (= -hi)."""
    mask = _valid_mask(count, g)
    n = count[None, :]
    if spec.symmetric:
        a = wg.abs()
        amax = a.amax(dim=-1)
        if spec.clip == "percentile":
            c = _percentile(a, count, mask, spec.clip_param)
        elif spec.clip == "sdclip":
            mean, sd = _mean_sd(wg, mask, n)
            # not capped at max|w|: k sets the step (rate) directly, k·std/qmax, even when
            # that wastes outer codes — the entropy coder makes unused codes free
            c = spec.clip_param * sd
        elif spec.kind == "ternary" or spec.bits == 1:
            c = (a.double().sum(-1) / n).float()  # absmean: the natural scale of 1-bit and ternary codes
        else:
            c = amax
        return -c, c
    big = torch.full_like(wg, float("inf"))
    wmin = torch.where(mask, wg, big).amin(-1)
    wmax = torch.where(mask, wg, -big).amax(-1)
    if spec.clip == "percentile":
        lo = _percentile(wg, count, mask, 100.0 - spec.clip_param)
        hi = _percentile(wg, count, mask, spec.clip_param)
    elif spec.clip == "sdclip":
        mean, sd = _mean_sd(wg, mask, n)
        lo, hi = mean - spec.clip_param * sd, mean + spec.clip_param * sd
    else:
        lo, hi = wmin, wmax
    return lo, hi


def _mse_grid(spec: QuantSpec) -> list[float]:
    """Clip ratios searched by clip="mse": multiples of the "max" clip bound."""
    n = int(spec.clip_param) or _MSE_GRID_DEFAULT
    lo, hi = (0.5, 2.0) if spec.kind == "ternary" or spec.bits == 1 else (0.5, 1.0)
    return [hi - (hi - lo) * i / (n - 1) for i in range(n)]


class GroupScales(NamedTuple):
    """Per-group tables that `quantize` picks for a (rows, row_len) tensor.

    scales: float32 (rows, n_groups), already rounded to the stored scale dtype.
    zeros: integer-valued float32 (rows, n_groups) zero points (asymmetric only), else None.
    scale_codes / scale_ref: the q8 exponent codes (uint8 (rows, n_groups)) and the float32
      0-d reference scale (q8 only), else None.
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None
    scale_codes: torch.Tensor | None
    scale_ref: torch.Tensor | None


def _group_scales(wg: torch.Tensor, count: torch.Tensor, g: int, spec: QuantSpec) -> GroupScales:
    if spec.clip == "mse":
        # Every grid ratio at once along a leading axis (R, rows, ng[, G]): one fused pass over the
        # weights under torch.compile instead of R unrolled ones (which made a QAT graph's compile
        # time grow by the grid size per matrix). The same choice as trying the ratios in grid order
        # and keeping a strictly smaller error: argmin returns the first minimum, so ties keep the
        # larger clip ratio. `lo * r` with r a float32 tensor is the float32 product `lo * float(r)`.
        base = QuantSpec(spec.kind, spec.bits, spec.symmetric, spec.group, spec.scale_dtype)
        lo1, hi1 = _clip_bounds(wg, count, g, base)
        ratios = torch.tensor(_mse_grid(spec), dtype=torch.float32, device=wg.device)[:, None, None]
        lo_r, hi_r = lo1[None] * ratios, hi1[None] * ratios
        s, z, _, _ = _scale_and_zero(lo_r, hi_r, base)
        err = ((_values(_codes_from_scale(wg[None], s, z, base), s, z, base) - wg[None]) ** 2).sum(-1)
        pick = err.argmin(0, keepdim=True)
        lo, hi = lo_r.gather(0, pick).squeeze(0), hi_r.gather(0, pick).squeeze(0)
    else:
        lo, hi = _clip_bounds(wg, count, g, spec)
    return GroupScales(*_scale_and_zero(lo, hi, spec))


def group_scales(w2: torch.Tensor, spec: QuantSpec) -> GroupScales:
    """The scale computation of `quantize` alone: clip bound per group → raw scale → rounded
    to the stored dtype (+ zero points), for a float32 (rows, row_len) tensor on any device.

    `quantize(w).scales == group_scales(w2).scales` bit for bit (w2 = w viewed as rows);
    devices that fuse the per-element pass (`pgolf_codec.gpu`) take their tables from here.
    """
    if spec.is_float:
        raise ValueError(f"group_scales: {spec} is a float passthrough, it has no scales")
    if w2.dim() != 2:
        raise ValueError(f"group_scales: expected a (rows, row_len) tensor, got shape {tuple(w2.shape)}")
    wg, count, g = _grouped(w2.float(), spec)
    return _group_scales(wg, count, g, spec)


def _quantize_grouped(w2: torch.Tensor, spec: QuantSpec):
    """Core path shared by quantize and fake_quant: (codes, scale, zero, q8 codes, q8 ref, G)."""
    wg, count, g = _grouped(w2, spec)
    scale, zero, sc, ref = _group_scales(wg, count, g, spec)
    return _codes_from_scale(wg, scale, zero, spec), scale, zero, sc, ref, g


def _float_dtype(spec: QuantSpec) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec.kind]


def quantize(w: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize a floating tensor of any shape (empty allowed) under `spec`.

    Raises ValueError for a non-floating dtype or non-finite values.  Runs on w's device.
    """
    if not torch.is_floating_point(w):
        raise ValueError(f"quantize: expected a floating tensor, got {w.dtype}")
    w = w.detach()
    shape = tuple(int(d) for d in w.shape)
    rows, row_len = rows_view_shape(shape)
    w2 = w.float().reshape(rows, row_len)
    if w2.numel() and not bool(torch.isfinite(w2).all()):
        src = w.reshape(rows, row_len)
        bad = ~torch.isfinite(src)
        if bool(bad.any()):
            raise ValueError(f"quantize: tensor has NaN or Inf values (first: {_first(bad, src, shape)})")
        raise ValueError(f"quantize: value beyond the float32 range ({_first(~torch.isfinite(w2), src, shape)})")
    empty_scales = torch.zeros((rows, 0), dtype=torch.float32, device=w.device)
    if spec.is_float:
        return Quantized(spec, shape, w2.to(_float_dtype(spec)), empty_scales)
    ng = n_groups(row_len, spec.group)
    if w2.numel() == 0:
        codes = torch.zeros((rows, row_len), dtype=torch.uint8, device=w.device)
        scales = torch.zeros((rows, ng), dtype=torch.float32, device=w.device)
        u8 = lambda: torch.zeros((rows, ng), dtype=torch.uint8, device=w.device)  # noqa: E731
        ref = torch.zeros((), dtype=torch.float32, device=w.device)
        q8 = spec.scale_dtype == "q8"
        return Quantized(spec, shape, codes, scales, None if spec.symmetric else u8(),
                         u8() if q8 else None, ref if q8 else None)
    codes, scale, zero, sc, ref, _ = _quantize_grouped(w2, spec)
    codes = codes.reshape(rows, -1)[:, :row_len].to(torch.uint8)
    return Quantized(spec, shape, codes, scale, None if zero is None else zero.to(torch.uint8), sc, ref)


def _first(mask: torch.Tensor, w: torch.Tensor, shape: tuple[int, ...]) -> str:
    """'VALUE at index (i, j, ...)' of the first element of w (viewed as `shape`) where mask is set."""
    i = int(mask.reshape(-1).to(torch.uint8).argmax())
    idx, rest = [], i
    for d in reversed(shape):
        idx.append(rest % d)
        rest //= d
    return f"{float(w.reshape(-1)[i]):.6g} at index {tuple(reversed(idx))}"


def check_representable(w: torch.Tensor, q: Quantized) -> None:
    """ValueError naming the value when `q = quantize(w, q.spec)` does not hold w's values.

    Float passthrough: a finite value that rounds to inf (fp16 tops out at 65504).  Int and
    ternary: a group whose scale would exceed the largest scale its dtype stores (fp16
    65504, bf16 ~3.4e38), so its values would decode clipped to qmax times that maximum.
    Writers call this before storing q; training's fake-quant paths do not (same numerics).
    """
    spec = q.spec
    if spec.is_float:
        bad = torch.isinf(q.codes)
        if bool(bad.any()):
            top = float(torch.finfo(_float_dtype(spec)).max)
            raise ValueError(f"value {_first(bad, w.detach(), q.shape)} overflows {spec.kind} (largest {top:.6g}); "
                             "use fp32 or an int scheme")
        return
    hi = _SCALE_RANGE[spec.scale_dtype][1]
    if spec.scale_dtype == "q8" or not q.scales.numel() or float(q.scales.max()) < hi:
        return
    w2 = w.detach().float().reshape(q.rows, q.row_len)
    need = float(group_scales(w2, replace(spec, scale_dtype="q8")).scale_ref)  # the largest raw scale
    if need > hi:
        big = w2.abs() == w2.abs().max()
        raise ValueError(f"value {_first(big, w.detach(), q.shape)} needs a scale of {need:.6g}, above the largest "
                         f"{spec.scale_dtype} scale {hi:.6g} (it would decode as at most "
                         f"{_qmax(spec) * hi if spec.symmetric else ((1 << spec.bits) - 1) * hi:.6g}); "
                         "use ':scale=q8' or a float scheme")


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of a `Quantized` as a tensor of its original shape (float32 math, then `dtype`)."""
    spec = q.spec
    if spec.is_float:
        return q.codes.float().reshape(q.shape).to(dtype)
    rows, row_len = q.rows, q.row_len
    if rows * row_len == 0:
        return torch.zeros(q.shape, dtype=dtype, device=q.codes.device)
    ng = q.scales.shape[1]
    g = row_len if ng <= 1 else spec.group
    pad = ng * g - row_len
    codes = torch.nn.functional.pad(q.codes.float(), (0, pad)).view(rows, ng, g)
    zero = None if q.zeros is None else q.zeros.float()
    vals = _values(codes, q.scales, zero, spec)
    return vals.reshape(rows, -1)[:, :row_len].reshape(q.shape).to(dtype)


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`dequantize(quantize(w, spec))` without building a `Quantized` (bit for bit the same).

    Vectorized torch with no `.item()` and no data-dependent Python branches, so it runs
    every training step and under torch.compile.  Math in float32; the result has w's dtype.
    """
    shape = w.shape
    rows, row_len = rows_view_shape(tuple(shape))
    w2 = w.float().reshape(rows, row_len)
    if spec.is_float:
        return w2.to(_float_dtype(spec)).float().reshape(shape).to(w.dtype)
    if w2.numel() == 0:
        return torch.zeros_like(w)
    codes, scale, zero, _, _, _ = _quantize_grouped(w2, spec)
    vals = _values(codes, scale, zero, spec)
    return vals.reshape(rows, -1)[:, :row_len].reshape(shape).to(w.dtype)


def fake_quant_ste(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Straight-through estimator for QAT: forward = fake_quant(w) bit for bit, gradient = identity.

    Written as `q - (w.detach() - w)`: the subtracted term is exactly +0.0 and `q - 0.0 == q`
    for every q, -0.0 included (fp16/bf16 passthrough of a tiny negative weight).  The
    textbook `w + (q - w).detach()` rounds (w + (q - w) != q in float32), and `q + (w - w.detach())`
    turns -0.0 into +0.0; either way the trained forward would not be what the codec decodes.
    """
    return fake_quant(w.detach(), spec) - (w.detach() - w)


class Recipe:
    """Ordered (glob pattern, QuantSpec) rules; the first pattern matching a tensor name wins.

    Patterns use `fnmatch` case-sensitively ("*" also matches dots).
    Text form: `"tok_emb*=int8;*=int6:sdclip=12.5"` (";" or newlines separate rules).
    """

    def __init__(self, rules: list[tuple[str, QuantSpec]]):
        if not rules:
            raise ValueError("Recipe: needs at least one rule")
        for pat, spec in rules:
            if not isinstance(pat, str) or not pat or "=" in pat or ";" in pat:
                raise ValueError(f"Recipe: bad pattern {pat!r}")
            if not isinstance(spec, QuantSpec):
                raise ValueError(f"Recipe: rule {pat!r} needs a QuantSpec, got {type(spec).__name__}")
        self.rules: tuple[tuple[str, QuantSpec], ...] = tuple(rules)

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        rules = []
        for part in re.split(r"[;\n]", text):
            part = part.strip()
            if not part or part.startswith("#"):
                continue
            pat, eq, spec = part.partition("=")
            if not eq:
                raise ValueError(f"Recipe.parse: rule {part!r} is not PATTERN=SCHEME")
            rules.append((pat.strip(), QuantSpec.parse(spec)))
        return cls(rules)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a TOML or JSON file: either `{"rules": [{"pattern": P, "scheme": S}, ...]}` or
        a flat ordered table `{P: S, ...}` (TOML: top-level `"tok_emb*" = "int8"` lines)."""
        import tomllib  # here, not at import: a bundle on Python 3.10 reads no TOML

        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"Recipe.load: {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Recipe.load: {path}: expected a table")
        if "rules" in data:
            items = data["rules"]
            if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
                raise ValueError(f"Recipe.load: {path}: 'rules' must be a list of tables")
            pairs = [(r.get("pattern"), r.get("scheme")) for r in items]
        else:
            pairs = list(data.items())
        if not all(isinstance(p, str) and isinstance(s, str) for p, s in pairs):
            raise ValueError(f"Recipe.load: {path}: every rule needs a string pattern and scheme")
        return cls([(p, QuantSpec.parse(s)) for p, s in pairs])

    @classmethod
    def coerce(cls, recipe: "Recipe | str | QuantSpec") -> "Recipe":
        """A Recipe from a Recipe, its text form, or a single spec (applied to every tensor)."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, QuantSpec):
            return cls([("*", recipe)])
        try:  # a bare scheme ("int6:sdclip=12.5") applies to every tensor
            return cls([("*", QuantSpec.parse(recipe))])
        except ValueError:
            return cls.parse(recipe)

    def spec_for(self, name: str) -> QuantSpec:
        """The spec of the first rule matching `name`; ValueError when none matches."""
        for pat, spec in self.rules:
            if fnmatch.fnmatchcase(name, pat):
                return spec
        raise ValueError(f"Recipe: no rule matches tensor {name!r} (add a final '*=...' rule)")

    def __str__(self) -> str:
        return ";".join(f"{p}={s}" for p, s in self.rules)

    def __repr__(self) -> str:
        return f"Recipe.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)
