"""Device-side dequantization and fused fake-quant (Triton).

Codes go to the GPU as bytes (bit-packed, or one code per byte) and are expanded there in one
pass. Rows (and groups) of whole 8-code chunks, i.e. every real weight matrix, take the chunk
kernel: 8 b-bit codes are exactly b bytes, read once per chunk and cut apart with constant
shifts, with one scale (and zero point) load per chunk and vector stores. Everything else
(5-trit streams, ragged rows or groups) reads each element's code straight from the stream
(LSB-first b-bit fields, base-3 digits of 5-trit bytes, or a whole byte). Both write
`float32(q) * scale` cast to the output dtype. `fake_quant` runs one kernel per tensor that
finds each group's scale and quantizes it in registers (see `_rows_stat` for which specs). The
numerics are exactly those of `pgolf_codec.schemes` (`spec/FORMAT.md`): the kernels are
bit-identical to `dequantize` and `fake_quant`, on the GPU and under the Triton interpreter
(`TRITON_INTERPRET=1`) alike.

Triton is optional: it is imported on first use, and every public function falls back to the
reference torch path on the CPU (or when Triton is missing) with the same numbers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from pgolf_codec import bitpack, schemes
from pgolf_codec.schemes import QuantSpec, Quantized, dequantize, n_groups, rows_view_shape
from pgolf_codec.streams import check_stream, stream_nbytes

# Bound by `_triton()` on first use, so that importing the codec never imports Triton. The kernel
# bodies below reference these module globals; Triton resolves them when it compiles.
triton: Any = None
tl: Any = None

# How an unsigned code maps to the signed integer q (value = float32(q) * scale). The kind is a
# compile-time constant of the kernels.
KIND_SYM = 0  # symmetric b >= 2: q = code - (2^(b-1) - 1)
KIND_BINARY = 1  # symmetric b = 1: q = 2*code - 1
KIND_TERNARY = 2  # q = code - 1 (5 trits per byte)
KIND_ASYM = 3  # q = code - z, z a per-(row, group) integer zero point

# Elements per program. 4096 keeps each program's stores long and contiguous (8 warps x 16 B)
# while giving ~16K programs on a 64M-element tensor.
_TILE = 4096

# The chunk kernel (`_dequant_chunk_kernel`, the path of every b-bit stream whose rows and
# groups are whole 8-code chunks): 8 consecutive codes of b bits are exactly b bytes, so a
# thread loads a chunk's bytes once (one 2..8-byte load when b is a power of two), cuts the 8
# codes out with constant shifts and writes 8 contiguous outputs (one 16-byte store for 16-bit
# outputs). _CHUNKS chunks per program = 4096 elements; with 4 warps that is 4 chunks
# (32 outputs) per thread, enough independent loads in flight per thread to cover DRAM latency.
_CHUNKS = 512
_CHUNK_WARPS = 4


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions; `_kernels()` wraps them with `triton.jit` on first use)
# ---------------------------------------------------------------------------------------------


def _tile_index(rows, row_len, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # A BLOCK_R x BLOCK_C tile of the (rows, row_len) view; i is the row-major element index,
    # which is also the element's position in the packed code stream.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    if WIDE:
        r = r.to(tl.int64)
    m = (r < rows) & (c < row_len)
    return r, c, r * row_len + c, m


def _scale_index(r, c, n_groups, GROUP: tl.constexpr):
    # GROUP == 0: one scale per row (a [BLOCK_R, 1] column broadcast over the tile). A constexpr
    # group size turns `c // GROUP` into a shift or a multiply-high instead of a division.
    if GROUP == 0:
        idx = r
    else:
        idx = r * n_groups + c // GROUP
    return idx


def _store_out(out_ptr, i, val, m, OUT_BF16_SW: tl.constexpr):
    if OUT_BF16_SW:
        # fp32 -> bf16 round-half-to-even done on the bits: the interpreter's own bf16 cast
        # truncates, and the tests must exercise exactly the arithmetic the GPU runs.
        u = val.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        u = tl.where(val != val, 0x7FC0, u)  # any NaN -> the canonical quiet NaN, as torch does
        tl.store(out_ptr + i, u.to(tl.uint16).to(tl.int16, bitcast=True), mask=m)
    else:
        tl.store(out_ptr + i, val.to(out_ptr.dtype.element_ty), mask=m)


def _q_of(code, z, BITS: tl.constexpr, KIND: tl.constexpr):
    # The signed level of an unsigned code: symmetric, int1, ternary, or asymmetric (minus z).
    if KIND == 0:
        q = code - ((1 << (BITS - 1)) - 1)
    elif KIND == 1:
        q = 2 * code - 1
    elif KIND == 2:
        q = code - 1
    else:
        q = code - z
    return q


def _q_from_code(code, zeros_ptr, sidx, zmask, BITS: tl.constexpr, KIND: tl.constexpr):
    z = 0
    if KIND == 3:
        z = tl.load(zeros_ptr + sidx, mask=zmask, other=0).to(tl.int32)
    return _q_of(code, z, BITS, KIND)


def _dequant_kernel(payload_ptr, scales_ptr, zeros_ptr, out_ptr, rows, row_len, n_groups, n_bytes,
                    FIELD: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr,
                    OUT_BF16_SW: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # FIELD: bits per code in the stream (8 = one code per byte), 0 = 5 trits per byte.
    r, c, i, m = _tile_index(rows, row_len, WIDE, BLOCK_R, BLOCK_C)
    if FIELD == 0:
        # Trit d of byte v is floor(v / 3^d) mod 3. For v < 256 both steps are exact as
        # multiply-high: floor(v/3^d) = (v * ceil(2^16/3^d)) >> 16 and t mod 3 = t - 3((171t) >> 9).
        byte = i // 5
        d = (i - byte * 5).to(tl.int32)
        v = tl.load(payload_ptr + byte, mask=m, other=0).to(tl.int32)
        mul = tl.where(d == 0, 65536, tl.where(d == 1, 21846, tl.where(d == 2, 7282,
                                                                        tl.where(d == 3, 2428, 810))))
        t = (v * mul) >> 16
        code = t - 3 * ((t * 171) >> 9)
    elif FIELD == 8:
        code = tl.load(payload_ptr + i, mask=m, other=0).to(tl.int32)
    else:
        bit = i * FIELD
        byte = bit >> 3
        v = tl.load(payload_ptr + byte, mask=m, other=0).to(tl.int32)
        if 8 % FIELD != 0:
            # A field may straddle two bytes (b in {3, 5, 6, 7}); the second byte can lie past the
            # end of the buffer only for the final field, whose high bits are then absent.
            hi = tl.load(payload_ptr + byte + 1, mask=m & (byte + 1 < n_bytes), other=0).to(tl.int32)
            v = v | (hi << 8)
        code = (v >> (bit & 7).to(tl.int32)) & ((1 << FIELD) - 1)
    sidx = _scale_index(r, c, n_groups, GROUP)
    if GROUP == 0:
        smask = r < rows
    else:
        smask = m
    s = tl.load(scales_ptr + sidx, mask=smask, other=0.0)
    q = _q_from_code(code, zeros_ptr, sidx, smask, BITS, KIND)
    # One IEEE multiply of two fp32 values (nothing to contract into an FMA), then the cast.
    _store_out(out_ptr, i, q.to(tl.float32) * s, m, OUT_BF16_SW)


def _chunk_field(lo, hi, S: tl.constexpr, FIELD: tl.constexpr):
    # The code at bits [S, S + FIELD) of a chunk's 64-bit little-endian word (lo, hi). S is a
    # compile-time constant, so this is one constant shift (or a funnel shift when the field
    # crosses the 32-bit boundary) and a mask: no per-element index arithmetic.
    if S + FIELD <= 32:
        v = lo >> S
    elif S >= 32:
        v = hi >> (S - 32)
    else:
        v = (lo >> S) | (hi << (32 - S))
    return v & ((1 << FIELD) - 1)


def _chunk_codes(lo, hi, FIRST: tl.constexpr, N: tl.constexpr, FIELD: tl.constexpr):
    # Codes FIRST..FIRST+N-1 of a chunk (N = 4 or 8) as [.., 2, 2(, 2)], in order once flattened:
    # a join adds a minor axis of 2, so joining (evens, odds) at every level lays the codes out
    # contiguously in each thread's registers, ready for one vector store.
    if N == 4:
        c = tl.join(tl.join(_chunk_field(lo, hi, FIRST * FIELD, FIELD),
                            _chunk_field(lo, hi, (FIRST + 2) * FIELD, FIELD)),
                    tl.join(_chunk_field(lo, hi, (FIRST + 1) * FIELD, FIELD),
                            _chunk_field(lo, hi, (FIRST + 3) * FIELD, FIELD)))
    else:
        c = tl.join(tl.join(tl.join(_chunk_field(lo, hi, 0 * FIELD, FIELD), _chunk_field(lo, hi, 4 * FIELD, FIELD)),
                            tl.join(_chunk_field(lo, hi, 2 * FIELD, FIELD), _chunk_field(lo, hi, 6 * FIELD, FIELD))),
                    tl.join(tl.join(_chunk_field(lo, hi, 1 * FIELD, FIELD), _chunk_field(lo, hi, 5 * FIELD, FIELD)),
                            tl.join(_chunk_field(lo, hi, 3 * FIELD, FIELD), _chunk_field(lo, hi, 7 * FIELD, FIELD))))
    return c


def _chunk_values(lo, hi, s, z, FIRST: tl.constexpr, N: tl.constexpr, FIELD: tl.constexpr,
                  BITS: tl.constexpr, KIND: tl.constexpr, NC: tl.constexpr):
    # float32(q) * scale of codes FIRST..FIRST+N-1 of NC chunks, as [NC, N].
    code = tl.reshape(_chunk_codes(lo, hi, FIRST, N, FIELD), [NC, N]).to(tl.int32)
    q = _q_of(code, z, BITS, KIND)
    # One IEEE multiply of two fp32 values, as in `schemes`.
    return q.to(tl.float32) * s


def _dequant_chunk_kernel(payload_ptr, scales_ptr, zeros_ptr, out_ptr, rows, upr, n_groups,
                          FIELD: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr,
                          WORD: tl.constexpr, GROUP: tl.constexpr, OUT_BF16_SW: tl.constexpr,
                          HALVES: tl.constexpr, WIDE: tl.constexpr, BR: tl.constexpr, UC: tl.constexpr):
    # Tile: BR rows x UC chunks of 8 codes; upr = chunks per row (row_len / 8). FIELD bits per
    # code in the stream (8 also for one code per byte); chunk j is bytes [j*FIELD, j*FIELD+FIELD).
    k = tl.arange(0, BR * UC)
    if BR == 1:
        # Long rows: the whole tile is in one row, so its scale (per-row specs) is one load.
        r = tl.program_id(0)
        if WIDE:
            r = r.to(tl.int64)
        cu = tl.program_id(1) * UC + k
        m = cu < upr
    else:
        r = tl.program_id(0) * BR + k // UC  # constexpr UC: a shift
        if WIDE:
            r = r.to(tl.int64)
        cu = k % UC
        m = (r < rows) & (cu < upr)
    chunk = r * upr + cu
    b = tl.arange(0, 8)[None, :]
    # The chunk's 64 bits (lo, hi) from its FIELD bytes, in one of two ways picked by the
    # stores' layout, so that loads and stores agree on which thread owns which chunk and the
    # compiler does not reshuffle through shared memory (checked on sm_90 code; int1 to a
    # 4-byte output is the one case left with a small shuffle):
    if not HALVES:
        # 16-bit outputs, 8 per thread per chunk: a [chunks, 8] byte tile (columns >= FIELD
        # masked off; one 2-, 4- or 8-byte load for b = 2, 4, 8) summed into two 32-bit words
        # in registers (the byte shifts are disjoint, so the sum is an OR).
        byt = tl.load(payload_ptr + chunk[:, None] * FIELD + b, mask=m[:, None] & (b < FIELD), other=0)
        byt = byt.to(tl.uint32) << (8 * (b % 4)).to(tl.uint32)
        lo, hi = tl.split(tl.sum(tl.reshape(byt, [BR * UC, 2, 4]), axis=2))
    else:
        # 32-bit outputs, 4 per thread per store: FIELD / WORD little-endian words of WORD
        # bytes per chunk, one row of loads per word (`_chunk_word` picks WORD: 1, 2 or 4).
        if WORD == 4:
            words = payload_ptr.to(tl.pointer_type(tl.uint32))
        elif WORD == 2:
            words = payload_ptr.to(tl.pointer_type(tl.uint16))
        else:
            words = payload_ptr
        lo = tl.zeros([BR * UC], dtype=tl.uint32)
        hi = tl.zeros([BR * UC], dtype=tl.uint32)
        for j in tl.static_range(FIELD // WORD):
            v = tl.load(words + chunk * (FIELD // WORD) + j, mask=m, other=0).to(tl.uint32)
            if 8 * WORD * j < 32:
                lo = lo | (v << (8 * WORD * j))
            else:
                hi = hi | (v << (8 * WORD * j - 32))
    # One scale (and zero point) per chunk: a chunk never crosses a group (GROUP % 8 == 0).
    if GROUP == 0:
        sidx = r
        smask = r < rows
    else:
        sidx = r * n_groups + cu // (GROUP // 8)
        smask = m
    s = tl.load(scales_ptr + sidx, mask=smask, other=0.0)
    z = 0
    if KIND == 3:
        z = tl.load(zeros_ptr + sidx, mask=smask, other=0).to(tl.int32)
    if not (BR == 1 and GROUP == 0):  # else s and z are scalars of the tile's one row
        s = s[:, None]
        if KIND == 3:
            z = z[:, None]
    if HALVES:
        # 4-byte outputs: each half chunk is one 16-byte store, built in the layout it is stored
        # from (one 8-wide tensor would be reshuffled through shared memory before the stores).
        h = tl.arange(0, 4)[None, :]
        for half in tl.static_range(2):
            val = _chunk_values(lo, hi, s, z, 4 * half, 4, FIELD, BITS, KIND, BR * UC)
            _store_out(out_ptr, chunk[:, None] * 8 + 4 * half + h, val, m[:, None], OUT_BF16_SW)
    else:
        val = _chunk_values(lo, hi, s, z, 0, 8, FIELD, BITS, KIND, BR * UC)
        _store_out(out_ptr, chunk[:, None] * 8 + b, val, m[:, None], OUT_BF16_SW)


def _fake_quant_kernel(w_ptr, scales_ptr, zeros_ptr, out_ptr, rows, row_len, n_groups,
                       BITS: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr,
                       OUT_BF16_SW: tl.constexpr, WIDE: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, i, m = _tile_index(rows, row_len, WIDE, BLOCK_R, BLOCK_C)
    w = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
    sidx = _scale_index(r, c, n_groups, GROUP)
    if GROUP == 0:
        smask = r < rows
    else:
        smask = m
    s = tl.load(scales_ptr + sidx, mask=smask, other=1.0)
    # IEEE-rounded division (Triton's `/` on fp32 is the approximate one), then rint.
    t = tl.div_rn(w, s)
    # rint by the fp32 adder: for |t| < 2^22, (t + 1.5*2^23) - 1.5*2^23 is t rounded half to
    # even (libdevice `rint` has no interpreter implementation); larger |t| is clamped anyway.
    x = (t + 12582912.0) - 12582912.0
    if KIND == 0:
        qmax = (1 << (BITS - 1)) - 1
        code = (tl.minimum(tl.maximum(x, -qmax), qmax) + qmax).to(tl.int32)
    elif KIND == 1:
        code = (t >= 0).to(tl.int32)  # the sign of the unrounded quotient (-0.0 counts as >= 0)
    elif KIND == 2:
        code = (tl.minimum(tl.maximum(x, -1.0), 1.0) + 1.0).to(tl.int32)
    else:
        z = tl.load(zeros_ptr + sidx, mask=smask, other=0).to(tl.float32)
        code = tl.minimum(tl.maximum(x + z, 0.0), (1 << BITS) - 1).to(tl.int32)
    # Dequantize exactly as `_dequant_kernel` does, from the integer code.
    q = _q_from_code(code, zeros_ptr, sidx, smask, BITS, KIND)
    _store_out(out_ptr, i, q.to(tl.float32) * s, m, OUT_BF16_SW)


def _round_scale_bf16(x):
    # fp32 -> bf16 -> fp32 round-half-to-even on the bits, for positive finite x (the clamped
    # raw scale): the same numbers on the GPU and the interpreter, whose bf16 cast truncates.
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, u.to(tl.float32, bitcast=True))  # a NaN stays a NaN


def _fake_quant_rows_kernel(w_ptr, lo_ptr, hi_ptr, out_ptr, n_seg, row_len, n_groups,
                            BITS: tl.constexpr, KIND: tl.constexpr, GROUP: tl.constexpr,
                            STAT: tl.constexpr, SCALE_BF16: tl.constexpr, SCALE_LO: tl.constexpr,
                            SCALE_HI: tl.constexpr, OUT_BF16_SW: tl.constexpr, WIDE: tl.constexpr,
                            BR: tl.constexpr, BC: tl.constexpr):
    # One tile row per scale segment (a group, or a whole row when GROUP == 0), held in
    # registers from the clip statistic to the store: w is read once and written once.
    # STAT 0: the "max" clip bound reduced here (exact in any order: a max/min);
    # STAT 1: clip bounds (hi; and lo when asymmetric) per segment, computed by `schemes`.
    seg = tl.program_id(0) * BR + tl.arange(0, BR)
    if WIDE:
        seg = seg.to(tl.int64)
    r = seg // n_groups
    if GROUP == 0:
        start = r * row_len
        length = row_len
    else:
        g0 = (seg - r * n_groups) * GROUP
        start = r * row_len + g0
        length = tl.minimum(row_len - g0, GROUP)
    c = tl.arange(0, BC)[None, :]
    live = seg < n_seg
    m = live[:, None] & (c < length[:, None] if GROUP != 0 else c < length)
    i = start[:, None] + c
    w = tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
    top = (1 << BITS) - 1
    qmax = (1 << (BITS - 1)) - 1 if KIND == 0 else 1
    # The float32 operations of `schemes._scale_and_zero` / `_round_scale`, in their order:
    # bound / qmax (or (hi - lo) / top), clamp, round to the stored dtype.
    if KIND == 3:
        if STAT == 0:
            lo = tl.min(tl.where(m, w, float("inf")), axis=1)
            hi = tl.max(tl.where(m, w, float("-inf")), axis=1)
        else:
            lo = tl.load(lo_ptr + seg, mask=live, other=0.0)
            hi = tl.load(hi_ptr + seg, mask=live, other=0.0)
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        raw = tl.div_rn(hi - lo, tl.full(hi.shape, top, tl.float32))
    else:
        if STAT == 0:
            hi = tl.max(tl.abs(w), axis=1)  # masked lanes read 0, never above a |w|
        else:
            hi = tl.load(hi_ptr + seg, mask=live, other=0.0)
        raw = tl.div_rn(hi, tl.full(hi.shape, qmax, tl.float32))
    # torch's clamp keeps a NaN bound (NaN weights) a NaN, and so must this one.
    raw = tl.minimum(tl.maximum(raw, SCALE_LO, propagate_nan=tl.PropagateNan.ALL), SCALE_HI,
                     propagate_nan=tl.PropagateNan.ALL)
    if SCALE_BF16:
        s = _round_scale_bf16(raw)
    else:
        s = raw.to(tl.float16).to(tl.float32)
    if STAT == 0:
        # A NaN weight makes the reference's max/min, hence its scale and the whole group, NaN;
        # a hardware max reduction would skip it instead.
        s = tl.where(tl.max((w != w).to(tl.int32), axis=1) > 0, float("nan"), s)
    s = tl.where(live, s, 1.0)
    if KIND == 3:
        # zero = round_half_even(-lo / scale) clamped to [0, top] (rint by the fp32 adder, as
        # below; any quotient past 2^22 is clamped to top either way).
        zf = (tl.div_rn(-lo, s) + 12582912.0) - 12582912.0
        zf = tl.minimum(tl.maximum(zf, 0.0), top)
    else:
        zf = tl.zeros_like(s)
    val = _fq_value(w, s[:, None], zf[:, None], BITS, KIND)
    _store_out(out_ptr, i, val, m, OUT_BF16_SW)


def _fq_value(w, s, zf, BITS: tl.constexpr, KIND: tl.constexpr):
    # w quantized under scale s (and integer-valued float zero point zf), then dequantized:
    # IEEE division, rint, clamp, integer code, float32(q) * s.
    t = tl.div_rn(w, s)
    # rint by the fp32 adder: for |t| < 2^22, (t + 1.5*2^23) - 1.5*2^23 is t rounded half to
    # even (libdevice `rint` has no interpreter implementation); larger |t| is clamped anyway.
    x = (t + 12582912.0) - 12582912.0
    if KIND == 0:
        qmax = (1 << (BITS - 1)) - 1
        q = (tl.minimum(tl.maximum(x, -qmax), qmax) + qmax).to(tl.int32) - qmax
    elif KIND == 1:
        q = 2 * (t >= 0).to(tl.int32) - 1  # the sign of the unrounded quotient (-0.0 counts as >= 0)
    elif KIND == 2:
        q = (tl.minimum(tl.maximum(x, -1.0), 1.0) + 1.0).to(tl.int32) - 1
    else:
        code = tl.minimum(tl.maximum(x + zf, 0.0), (1 << BITS) - 1).to(tl.int32)
        q = code - zf.to(tl.int32)
    return q.to(tl.float32) * s


_JIT_HELPERS = ("_tile_index", "_scale_index", "_store_out", "_q_of", "_q_from_code", "_chunk_field",
                "_round_scale_bf16", "_fq_value",
                "_chunk_codes", "_chunk_values")
_JIT_KERNELS = ("_dequant_kernel", "_dequant_chunk_kernel", "_fake_quant_kernel", "_fake_quant_rows_kernel")


def _triton() -> bool:
    """Import Triton and compile-wrap the kernels once; False when Triton is not installed.

    Whether the kernels run interpreted is fixed here, by `TRITON_INTERPRET` at first use.
    """
    global triton, tl
    if triton is not None:
        return True
    try:
        import triton as _t
        import triton.language as _tl
    except ImportError:
        return False
    tl = _tl
    g = globals()
    # Helpers first: the kernels find them (already wrapped) through these module globals.
    for name in _JIT_HELPERS + _JIT_KERNELS:
        g[name] = _t.jit(g[name])
    triton = _t
    return True


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_available(device: torch.device | str = "cuda") -> bool:
    """True when tensors on `device` are expanded by the Triton kernels.

    That is a CUDA device with Triton installed, or the CPU under `TRITON_INTERPRET=1` (how the
    tests run the kernels). Everything else takes the reference torch path.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and _triton()
    return dev.type == "cpu" and _interpreting() and _triton()


def _kind(spec: QuantSpec) -> int:
    if spec.kind == "ternary":
        return KIND_TERNARY
    if not spec.symmetric:
        return KIND_ASYM
    return KIND_BINARY if spec.bits == 1 else KIND_SYM


@dataclass(frozen=True)
class _Geometry:
    rows: int
    row_len: int
    n_groups: int
    group: int  # kernel GROUP: 0 when the row has a single scale
    block_r: int
    block_c: int
    wide: bool  # int64 element and bit indices

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.rows // self.block_r), -(-self.row_len // self.block_c))


def _geometry(shape: tuple[int, ...], spec: QuantSpec) -> _Geometry:
    rows, row_len = rows_view_shape(shape)
    ng = n_groups(row_len, spec.group)
    # Tiles span whole short rows (several rows per tile) or BLOCK_C-long slices of long ones,
    # so a tile never needs a per-element division by row_len.
    block_c = min(1 << max(row_len - 1, 0).bit_length(), _TILE)
    return _Geometry(rows, row_len, ng, spec.group if ng > 1 else 0, _TILE // block_c, block_c,
                     rows * row_len * 8 >= 2**31)


def _check_tables(scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec,
                  rows: int, ng: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, contiguous float32 scales and uint8 zero points (a dummy when symmetric)."""
    if tuple(scales.shape) != (rows, ng):
        raise ValueError(f"scales: expected shape {(rows, ng)}, got {tuple(scales.shape)}")
    if scales.dtype != torch.float32 or scales.device != device:
        raise ValueError(f"scales: expected float32 on {device}, got {scales.dtype} on {scales.device}")
    if spec.symmetric:
        if zeros is not None:
            raise ValueError(f"zeros: a symmetric spec ({spec}) has no zero points")
        return scales.contiguous(), scales  # never read: KIND != ASYM
    if zeros is None or tuple(zeros.shape) != (rows, ng) or zeros.device != device:
        raise ValueError(f"zeros: asymmetric {spec} needs zero points of shape {(rows, ng)} on {device}")
    if zeros.dtype != torch.uint8:
        # fake_quant carries zero points as integer-valued float32; they are 0..2^b-1 exactly.
        zeros = zeros.to(torch.uint8)
    return scales.contiguous(), zeros.contiguous()


def _out_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(result, what the kernel writes to, software bf16 rounding?); `out` is used when given."""
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif (tuple(out.shape) != shape or out.dtype != dtype or out.device != device
          or not out.is_contiguous()):
        raise ValueError(f"out: expected a contiguous {dtype} tensor of shape {shape} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    sw = dtype == torch.bfloat16 and _interpreting()
    return out, (out.view(torch.int16) if sw else out), sw


@dataclass(frozen=True)
class _ChunkPlan:
    upr: int  # 8-code chunks per row
    br: int
    uc: int
    grid: tuple[int, int]
    wide: bool


def _chunk_word(field: int, payload: torch.Tensor) -> int:
    """Bytes per load in `_dequant_chunk_kernel`'s 4-byte-output path: the largest power of two
    dividing b, halved when b is itself a power of two (a whole chunk in one word would be
    vectorized across a thread's neighbouring chunks, which the stores then reshuffle), and
    no more than payload's alignment: 1, 2 or 4 (b <= 8)."""
    word = field & -field
    if word == field and word > 1:
        word //= 2
    while payload.data_ptr() % word:
        word //= 2
    return word


def _chunk_plan(rows: int, row_len: int, ng: int, spec: QuantSpec, field: int) -> _ChunkPlan | None:
    """How `_dequant_chunk_kernel` tiles a tensor, or None when it cannot: 5-trit streams
    (5 codes per byte), rows that are not whole 8-code chunks (a chunk would straddle two rows'
    scales) and groups that are not (a chunk would straddle two groups)."""
    if field == 0 or row_len % 8 or (ng > 1 and spec.group % 8):
        return None
    upr = row_len // 8
    uc = min(1 << max(upr - 1, 0).bit_length(), _CHUNKS)
    br = _CHUNKS // uc
    # int32 indices hold every chunk, byte and element index (plus a tile of masked lanes)
    # below 2^31 elements; above that the kernel computes them in int64.
    return _ChunkPlan(upr, br, uc, (-(-rows // br), -(-upr // uc)), rows * row_len + 8 * _CHUNKS >= 2**31)


def dequantize_packed(payload: torch.Tensor, shape: tuple[int, ...], spec: QuantSpec,
                      scales: torch.Tensor, zeros: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32, *, packed: bool = True,
                      validate: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Expand a code stream into a tensor of `shape` and `dtype`, on payload's device.

    payload: uint8, 1-D: `stream_nbytes(prod(shape), spec, packed)` bytes, codes row-major,
      bit-packed in the `bitpack` layout (b-bit LSB-first fields, or 5 trits per byte) or,
      with packed=False, one code per byte.
    scales: float32 (rows, n_groups), values already rounded to the stored scale dtype.
    zeros: uint8 (rows, n_groups) integer zero points for an asymmetric spec, else None.
    validate: run `check_stream` first (skip only for streams already checked on the host):
      a device reduction plus a host sync, so the loader, which checked the bytes on the
      host, passes False.
    out: a contiguous `dtype` tensor of `shape` on payload's device to write into (e.g. a
      model parameter), instead of a new one; returned.
    Bit-identical to `schemes.dequantize(Quantized(spec, shape, codes, scales, zeros), dtype)`.
    """
    if spec.is_float:
        raise ValueError(f"dequantize_packed: {spec} is a float passthrough, it has no codes")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"payload: expected a 1-D uint8 tensor, got {payload.dtype} {tuple(payload.shape)}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype: expected one of {OUT_DTYPES}, got {dtype}")
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if validate:
        check_stream(payload, numel, spec, packed)
    device = payload.device
    rows, row_len = rows_view_shape(shape)
    ng = n_groups(row_len, spec.group)
    scales, zt = _check_tables(scales, zeros, spec, rows, ng, device)
    out, target, sw = _out_buffer(shape, dtype, device, out)
    if numel == 0:
        return out
    if not kernels_available(device):
        codes = _unpack_host(payload, numel, spec) if packed else payload
        q = Quantized(spec, shape, codes.to(device).view(rows, row_len), scales, None if spec.symmetric else zt)
        return out.copy_(dequantize(q, dtype))
    field = 8 if not packed else 0 if spec.kind == "ternary" else spec.bits
    group = spec.group if ng > 1 else 0
    plan = _chunk_plan(rows, row_len, ng, spec, field)
    if plan is not None:
        halves = out.element_size() == 4
        _dequant_chunk_kernel[plan.grid](
            payload, scales, zt, target, rows, plan.upr, max(ng, 1),
            FIELD=field, BITS=spec.bits, KIND=_kind(spec), WORD=_chunk_word(field, payload) if halves else 1,
            GROUP=group, OUT_BF16_SW=sw, HALVES=halves, WIDE=plan.wide, BR=plan.br, UC=plan.uc,
            num_warps=_CHUNK_WARPS)
        return out
    # Everything else (5-trit streams, ragged rows or groups): one code read per element.
    geo = _geometry(shape, spec)
    _dequant_kernel[geo.grid](
        payload, scales, zt, target, rows, row_len, max(ng, 1), payload.numel(),
        FIELD=field, BITS=spec.bits, KIND=_kind(spec), GROUP=geo.group, OUT_BF16_SW=sw,
        WIDE=geo.wide, BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, num_warps=8)
    return out


def _unpack_host(payload: torch.Tensor, numel: int, spec: QuantSpec) -> torch.Tensor:
    buf = payload.cpu().numpy()
    if spec.kind == "ternary":
        return torch.from_numpy(bitpack.unpack_trits(buf, numel))
    return torch.from_numpy(bitpack.unpack(buf, spec.bits, numel))


def group_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales (float32 (rows, n_groups), rounded to the stored dtype) and zero points
    (integer-valued float32, asymmetric only) that `schemes.quantize` picks for `w`.

    `schemes.group_scales` on w's rows view, in torch on w's device: the clip statistic and the
    scale rounding are reductions over groups, cheap next to the fused per-element pass.
    """
    rows, row_len = rows_view_shape(tuple(w.shape))
    gs = schemes.group_scales(w.detach().float().reshape(rows, row_len), spec)
    return gs.scales, gs.zeros


def fake_quant_with_scales(w: torch.Tensor, spec: QuantSpec, scales: torch.Tensor,
                           zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Fused divide / round / clamp / dequantize of `w` under given scale tables (no autograd).

    w: float32, bfloat16 or float16 of any shape, on a device `kernels_available` accepts.
    scales, zeros: as returned by `group_scales` (zeros may also be uint8).
    Returns a tensor of w's shape and dtype: float32(q) * scale rounded to w.dtype.
    """
    if spec.is_float:
        raise ValueError(f"fake_quant_with_scales: {spec} is a float passthrough")
    if w.dtype not in OUT_DTYPES:
        raise ValueError(f"w: expected one of {OUT_DTYPES}, got {w.dtype}")
    if not kernels_available(w.device):
        raise RuntimeError(f"fake_quant_with_scales: no Triton kernels for device {w.device}")
    shape = tuple(int(d) for d in w.shape)
    geo = _geometry(shape, spec)
    scales, zt = _check_tables(scales, zeros, spec, geo.rows, geo.n_groups, w.device)
    if w.numel() == 0:
        return torch.zeros_like(w)
    out, target, sw = _out_buffer(shape, w.dtype, w.device)
    _fake_quant_kernel[geo.grid](
        w.detach().contiguous(), scales, zt, target, geo.rows, geo.row_len, max(geo.n_groups, 1),
        BITS=spec.bits, KIND=_kind(spec), GROUP=geo.group, OUT_BF16_SW=sw, WIDE=geo.wide,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, num_warps=8, enable_fp_fusion=False)
    return out


# Longest scale segment (group, or row when per-row) that `_fake_quant_rows_kernel` keeps in
# registers: 8192 fp32 over 8 warps is 32 values a thread. Longer rows take the two-pass path.
_ROW_MAX = 8192


def _rows_stat(spec: QuantSpec) -> int | None:
    """How `_fake_quant_rows_kernel` gets the clip bound of `spec`: 0 reduced in the kernel,
    1 from `schemes` (torch), None when the kernel does not apply.

    "max" is a max/min, the same in any reduction order, so the kernel computes it (except for
    int1 and ternary, whose "max" rule is the mean |w|: a sum). "sdclip" needs a mean and a
    variance, float32 sums whose rounding depends on torch's reduction order on each device:
    no Triton reduction reproduces that order, so those bounds come from `schemes` itself and
    the kernel does the rest (scale, rounding, quantization). Percentile and mse clips and q8
    scales (a per-tensor reference) take the two-pass path.
    """
    if spec.scale_dtype not in ("fp16", "bf16"):
        return None
    if spec.clip == "sdclip":
        return 1
    if spec.clip == "max" and (not spec.symmetric or (spec.kind == "int" and spec.bits >= 2)):
        return 0
    return None


def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`schemes.fake_quant(w, spec)`, bit for bit, fused on the GPU.

    fp16/bf16 scales with the "max" clip (int2..int8, or asymmetric) and with "sdclip": one
    kernel per tensor reads w, finds each group's scale, quantizes and writes the result
    (sdclip's mean/std come from `schemes` in torch first, see `_rows_stat`). Other specs:
    the scales from `group_scales`, then one fused per-element pass. Falls back to
    `schemes.fake_quant` for passthrough specs, empty tensors, other dtypes and devices
    without kernels. No gradient (use `fake_quant_ste` for QAT).
    """
    if (spec.is_float or w.numel() == 0 or w.dtype not in OUT_DTYPES
            or not kernels_available(w.device)):
        return schemes.fake_quant(w.detach(), spec)
    stat = _rows_stat(spec)
    rows, row_len = rows_view_shape(tuple(w.shape))
    ng = n_groups(row_len, spec.group)
    seg_len = row_len if ng == 1 else spec.group
    if stat is None or seg_len > _ROW_MAX:
        scales, zeros = group_scales(w, spec)
        return fake_quant_with_scales(w, spec, scales, zeros)
    return _fake_quant_rows(w.detach().contiguous(), spec, stat, rows, row_len, ng, seg_len)


def _fake_quant_rows(w: torch.Tensor, spec: QuantSpec, stat: int, rows: int, row_len: int,
                     ng: int, seg_len: int) -> torch.Tensor:
    lo = hi = w  # placeholders, never read when stat == 0
    if stat == 1:
        # `schemes`' own float32 ops on w's rows view, so the bounds are its bounds bit for bit.
        wg, count, g = schemes._grouped(w.float().reshape(rows, row_len), spec)
        lo, hi = (t.contiguous() for t in schemes._clip_bounds(wg, count, g, spec))
    bc = 1 << max(seg_len - 1, 0).bit_length()
    br = max(1, 2048 // bc)
    n_seg = rows * ng
    out, target, sw = _out_buffer(tuple(w.shape), w.dtype, w.device)
    s_lo, s_hi = schemes._SCALE_RANGE[spec.scale_dtype]
    _fake_quant_rows_kernel[(-(-n_seg // br),)](
        w, lo, hi, target, n_seg, row_len, ng,
        BITS=spec.bits, KIND=_kind(spec), GROUP=spec.group if ng > 1 else 0, STAT=stat,
        SCALE_BF16=spec.scale_dtype == "bf16", SCALE_LO=s_lo, SCALE_HI=s_hi, OUT_BF16_SW=sw,
        WIDE=rows * row_len + 2 * bc * br >= 2**31, BR=br, BC=bc,
        num_warps=8 if br * bc >= 4096 else 4, enable_fp_fusion=False)
    return out


def fake_quant_ste(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """QAT fake-quant: forward value exactly `schemes.fake_quant(w, spec)` (w's shape and
    dtype), gradient passed straight through to w unchanged.

    The same construction as `schemes.fake_quant_ste`, `q - (w.detach() - w)`: the subtracted
    term is exactly +0.0, so the forward is q bit for bit (-0.0 included), and its gradient is
    the identity.
    """
    return fake_quant(w.detach(), spec) - (w.detach() - w)
