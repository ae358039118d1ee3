"""Coder 4: interleaved rANS for quantized weight codes, near the order-0 entropy.

A coded blob carries its own model; the caller supplies only what the container already
knows (``n`` symbols, the ``alphabet``, and the ``rows x row_len`` view of the tensor).
Five models, the encoder keeps whichever blob is smaller:

* **static** (kind 0): one frequency table for the whole tensor, stored as varints over
  the used code range ``[lo, hi]``.
* **parametric** (kind 1): every row has its own discretized distribution
  ``p(c) ∝ (1 + d²/(m·a²))^(-m)`` with ``d = c - center`` (a Student-t-like family:
  ``m = 1`` is Cauchy-like, large ``m`` tends to a Gaussian); ``m`` is one byte per tensor
  and the width ``a² = 2^((j - 64)/8)`` is one byte ``j`` per row, itself rANS-coded with
  a static model. No table is stored, so rows of different width each get their own
  distribution for ~2-5 bits of side information per row.
* **column** (kind 2, format 1.1): the same family, but per COLUMN (position within a row):
  column ``c`` has its own width byte ``j_c`` and a center offset ``δ_c`` in half codes
  (centered on ``(center2 + δ_c)/2``), both rANS-coded like the row widths; at most
  ``MAX_COLUMN_TABLES`` distinct (j, δ) pairs. With per-row scales the rows are already
  equalized, while columns (input features) still differ in spread and, for embeddings, in
  mean. Symbols are coded column by column, the columns grouped by table, so the row kernels
  run unchanged (one run of ``rows`` symbols per column), the decoder loads each table once,
  and one gather + transpose restores row-major order.
* **rowref** (kind 3, format 1.2): kind 1's per-row widths, but each symbol's center is
  predicted from the code above it: ``center = z + ((ρ8_r·(above - z) + 4) >> 3)`` with one
  byte ``ρ8_r`` in 0..8 per row (ρ = ρ8/8; row 0: no reference, ρ8 = 0), ``>>`` a floor shift.
  The coded symbol is the residual ``code - center + (hi - lo)`` in ``0..2(hi - lo)``, so one
  table per width serves every center (the parametric family over the residual range, centered
  on its middle); a decoded code outside ``[lo, hi]`` is a corrupt blob. For embeddings, whose
  rows (rarely seen tokens) repeat the row before.
* **rowperm** (kind 4, format 1.3): kind 3 over the rows in a stored order. The blob carries a
  permutation of the rows (its Lehmer code: digit ``d_k`` in ``bitlen(rows - 1 - k)`` bits, for
  4096 rows 5,633 bytes against ``log2(4096!)`` = 5,407); row ``k`` of the coding order is the ``d_k``-th smallest row index not yet
  taken, and "the code above" is the previous row in that order. The encoder orders the rows in
  a greedy nearest-neighbour chain (L1), so similar rows (an embedding's rare tokens) sit together.

Determinism of the parametric tables (encoder and decoder may be different machines): they
are built with IEEE-754 float64 ``+ - * /`` only, in a fixed order (powers by a fixed
square-and-multiply chain, sums by a sequential ``np.add.accumulate``, ``2^(k/8)`` from
literal constants and ``ldexp``), then floored to integers and completed by a stable sort.
Basic float64 operations are correctly rounded on every IEEE machine, and no libm
transcendental (``exp``, ``pow``, ``log``) is involved, so every machine gets the same
integers.

Blob layout (little-endian; normative text in ``spec/FORMAT.md``, "Coder 4: rANS")::

    u8 kind (0 static, 1 parametric, 2 column, 3 rowref, 4 rowperm) | u8 P (probability bits, 8..16)
    | u8 K (lanes, 1..32) | u8 lo | u8 hi                  -- used code range
    static:     varint freq[hi - lo + 1]                   -- sums to 2^P
    parametric: u16 center2 (2 x center) | u8 m | varint len | static blob of row widths j
    column:     u16 center2 | u8 m | varint len | static blob of column widths j
                | varint len | static blob of zig-zag column center offsets (half codes)
    rowref:     u8 z (center code) | u8 m | varint len | static blob of row widths j
                | varint len | static blob of row predictions ρ8 (0..8; row 0: 0)
    rowperm:    u8 z | u8 m | Lehmer digits of the row order, bit-packed (no length: it follows
                from rows) | the two rowref side blobs, rows in coding order
    | u32 state[K] | u16 word[...]                         -- to the end of the blob

Symbol ``i`` in coding order (row-major; kind 2: column by column; kind 4: rows in the stored
order) belongs to lane
``i mod K``. States live in ``[2^16, 2^32)``; the encoder runs backwards emitting 16-bit
words, the decoder reads them forwards, and a valid stream ends with every state back at
``2^16`` and every word consumed (checked: a corrupt blob fails).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pgolf_codec.errors import BadPayload
from pgolf_codec.jit import njit

__all__ = ["RansCoder", "encode", "decode", "entropy_bits", "STATIC", "PARAMETRIC", "COLUMN", "ROWREF",
           "ROWPERM"]

STATIC = 0
PARAMETRIC = 1
COLUMN = 2
ROWREF = 3
ROWPERM = 4
MODEL_NAMES = {STATIC: "static", PARAMETRIC: "row", COLUMN: "column",
               ROWREF: "rowref", ROWPERM: "rowperm"}   # kind byte -> name (inspect)
MODELS = ("auto", "static", "parametric", "column", "rowref", "rowperm")
_RHO_STEPS = 8        # kind 3: ρ = ρ8/8, ρ8 in 0..8, one byte per row
# "auto" fits the rowref model only when a Gaussian estimate of what the prediction from the row
# above saves, per row (L/2·log2 of its mean squares without and with it), sums to this many bits
# per row: the ρ byte costs ~1-3 bits and the wider residual tables ~0.01 bit per symbol. Measured
# on a trained h200 artifact: tok_emb 47 bits/row, every block matrix < 2.5 (forced, rowref codes
# those ~0.1 % larger than kind 1).
_ROWREF_MIN_GAIN = 8.0
# "auto" fits the rowperm model (kind 4) only where it fits kind 3 and for at most this many rows:
# the nearest-neighbour chain costs O(rows² · row_len) (4096 x 512 int8: ~1 s on one core). It is
# kept when the Gaussian estimate on the chained rows, less the permutation's bits, beats the
# estimate in the stored order, and then only where its blob is smaller. Measured on a trained h200
# artifact: tok_emb 1,897,646 → ~1.875 MB with the 5,633-byte order; no block matrix pays.
_ROWPERM_MAX_ROWS = 8192
MAX_COLUMN_TABLES = 256   # distinct (width, offset) pairs in a kind-2 blob: bounds decoder memory
_L = 1 << 16          # lower bound of a state; 16-bit renormalization keeps states < 2^32
_PROB_BITS = 15       # frequency tables sum to 2^15: tails down to 3e-5 are still representable
_LANES = 8            # interleaved states: independent dependency chains for the CPU
_MIN_PROB_BITS, _MAX_PROB_BITS = 8, 16
_MAX_LANES = 32
_WIDTH_OFFSET = 64    # a² = 2^((j - 64)/8): j = 0..255 spans a from 2^-4 to ~2^12 codes
_SHAPES = (1, 2, 3, 4, 6, 10, 24, 128)   # candidate m, heavy-tailed to near-Gaussian
_OFFSET_SEARCH = 1    # kind 2 tries centers within ±1 half code of the rounded column mean
# Kind 2 switches tables every column: 2^14-slot tables halve the decoder's working set
# (decode ~1.3x faster on 1024x512 int8) for ~0.01 % more bytes than 2^15.
_COLUMN_PROB_BITS = 14
# "auto" drops the column model when its coarse fit already codes 2 % more bits than the best
# blob so far: the fine search gains well under that (~0.5 %), and side bytes only add.
_COLUMN_GIVE_UP = 1.02
# "auto" fits columns only while their histogram (row_len x used codes, float64) stays small:
# 2^22 entries = 32 MiB. Weight matrices are far below it (4096x512 int8: 131K entries).
_COLUMN_MAX_HIST = 1 << 22
# ... and only with enough rows for per-column statistics to pay for their side bytes: short
# columns (fp32 bytes of a control vector: 2-4 rows) would cost ~1 s of fitting for nothing.
_COLUMN_MIN_ROWS = 32
# ... and only when a Gaussian estimate of what per-column centers and widths save exceeds this
# many bits per column. Measured on trained weights: >= 8 bits/column wherever the column model
# wins, <= 1.5 where it loses (c_q/c_k/c_v/fc, i.i.d. Gaussian). It spares those tensors the fit.
_COLUMN_MIN_GAIN = 3.0
# 2^(k/8) for k = 0..7 as float64 literals (decimal → double parsing is correctly rounded).
_ROOT8 = (1.0, 1.0905077326652577, 1.189207115002721, 1.2968395546510096,
          1.4142135623730951, 1.5422108254079407, 1.681792830507429, 1.8340080864093424)


# ----------------------------------------------------------------------------- kernels

@njit(nogil=True)
def _encode_kernel(sym, row_model, row_len, freq, cum, prob_bits, lanes, out):  # pragma: no cover
    """Encode ``sym`` (uint8, already offset by ``lo``) backwards into the tail of ``out``.

    Returns ``(states, first_word)``; ``first_word = -1`` means a symbol had zero frequency.
    """
    states = np.full(lanes, _L, dtype=np.int64)
    pos = out.size
    rows = row_model.size
    shift = 32 - prob_bits
    for r in range(rows - 1, -1, -1):
        j = row_model[r]
        base = r * row_len
        for c in range(row_len - 1, -1, -1):
            i = base + c
            lane = i % lanes
            s = sym[i]
            f = freq[j, s]
            if f == 0:
                return states, -1
            x = states[lane]
            if x >= (f << shift):
                pos -= 1
                out[pos] = x & 0xFFFF
                x >>= 16
            states[lane] = ((x // f) << prob_bits) + (x % f) + cum[j, s]
    return states, pos


@njit(nogil=True)
def _decode_kernel(words, n_words, states0, row_model, row_len, sym_tab, freq, cum,
                   prob_bits, out):  # pragma: no cover
    """Decode ``out.size`` symbols; returns 0 on success, else a negative error code.

    ``words`` has one zero sentinel after the ``n_words`` real words, so the branch-free
    renormalization may read it; every index is clamped, and over-reading is reported at
    the end (-1). -2: the final states are not the initial ones, -3: words left unread.
    """
    lanes = states0.size
    x = states0.copy()
    mask = (1 << prob_bits) - 1
    pos = 0
    lane = 0
    i = 0
    for r in range(row_model.size):
        j = row_model[r]
        for _ in range(row_len):
            v = x[lane]
            slot = v & mask
            s = sym_tab[j, slot]
            v = freq[j, s] * (v >> prob_bits) + slot - cum[j, s]
            # Branch-free renormalization: one step always suffices (v >= 1 after decoding).
            w = np.int64(words[min(pos, n_words)])
            need = v < _L
            v = ((v << 16) | w) if need else v
            pos += need
            x[lane] = v
            out[i] = s
            i += 1
            lane += 1
            if lane == lanes:
                lane = 0
    if pos > n_words:
        return -1
    for k in range(lanes):
        if x[k] != _L:
            return -2
    if pos != n_words:
        return -3
    return 0


@njit(nogil=True)
def _decode_rowref_kernel(words, n_words, states0, row_model, rho, row_len, sym_tab, freq, cum,
                          prob_bits, z, lo, hi, out):  # pragma: no cover
    """Kind 3: decode ``out.size`` codes row-major; the symbol is the residual against the center
    ``z + ((rho[r]·(above - z) + 4) >> 3)`` (``above``: the decoded code one row up; row 0: z),
    offset by ``A - 1``. Errors as :func:`_decode_kernel`, and -4: a code outside [lo, hi]
    (the code is clamped so decoding stays in bounds, and the error is reported at the end).
    """
    lanes = states0.size
    x = states0.copy()
    mask = (1 << prob_bits) - 1
    off = z - (hi - lo)              # code = s + center - (A - 1)
    pos = 0
    lane = 0
    i = 0
    bad = False
    for r in range(row_model.size):
        j = row_model[r]
        k = np.int64(rho[r])
        for col in range(row_len):
            a = np.int64(out[i - row_len]) if r > 0 else np.int64(z)
            v = x[lane]
            slot = v & mask
            s = sym_tab[j, slot]
            v = freq[j, s] * (v >> prob_bits) + slot - cum[j, s]
            w = np.int64(words[min(pos, n_words)])
            need = v < _L
            v = ((v << 16) | w) if need else v
            pos += need
            x[lane] = v
            code = np.int64(s) + off + ((k * (a - z) + 4) >> 3)
            bad |= (code < lo) | (code > hi)
            out[i] = min(max(code, lo), hi)
            i += 1
            lane += 1
            if lane == lanes:
                lane = 0
    if pos > n_words:
        return -1
    if bad:
        return -4
    for k in range(lanes):
        if x[k] != _L:
            return -2
    if pos != n_words:
        return -3
    return 0


@njit(nogil=True)
def _unpermute_columns(runs, order, out):  # pragma: no cover
    """``out[r, order[k]] = runs[k, r]``: kind-2 column runs (coding order) → row-major codes.

    Blocks of 64 rows keep the written rows in cache (numpy's uint8 transpose is ~4x slower).
    """
    rows, row_len = out.shape
    for r0 in range(0, rows, 64):
        r1 = min(r0 + 64, rows)
        for k in range(row_len):
            c = order[k]
            for r in range(r0, r1):
                out[r, c] = runs[k, r]


@njit(nogil=True)
def _chain_order(x):  # pragma: no cover
    """Kind 4's row order (encoder): a greedy nearest-neighbour chain from row 0, each next row
    the unused one at the smallest L1 distance from the current one (ties → the smaller index).
    ``x``: int16 ``(rows, L)``. Integer arithmetic only, so the order is the same everywhere.
    """
    rows, cols = x.shape
    used = np.zeros(rows, np.bool_)
    order = np.empty(rows, np.int64)
    if rows == 0:
        return order
    cur = 0
    used[0] = True
    order[0] = 0
    for k in range(1, rows):
        best, best_d = -1, np.int64(1) << 62
        for r in range(rows):
            if used[r]:
                continue
            d = np.int64(0)
            for c in range(cols):
                d += abs(np.int64(x[cur, c]) - np.int64(x[r, c]))
            if d < best_d:
                best_d, best = d, r
        order[k] = best
        used[best] = True
        cur = best
    return order


@njit(nogil=True)
def _bitlen(v):  # pragma: no cover
    n = 0
    while v > 0:
        n += 1
        v >>= 1
    return n


@njit(nogil=True)
def _lehmer_pack(order, out):  # pragma: no cover
    """Kind 4's row order → its bit-packed Lehmer digits in ``out`` (zeroed uint8): digit ``d_k``
    (the number of rows not yet taken below ``order[k]``) in ``bitlen(rows - 1 - k)`` bits, least
    significant bit first. A Fenwick tree over the untaken rows: O(rows · log rows)."""
    rows = order.size
    tree = np.zeros(rows + 1, np.int64)
    for i in range(1, rows + 1):
        tree[i] = i & (-i)                     # every row untaken: the tree of all ones
    bit = 0
    for k in range(rows):
        v = order[k]
        d = np.int64(0)
        i = v
        while i > 0:
            d += tree[i]
            i -= i & (-i)
        i = v + 1
        while i <= rows:
            tree[i] -= 1
            i += i & (-i)
        for b in range(_bitlen(rows - 1 - k)):
            if (d >> b) & 1:
                out[bit >> 3] |= np.uint8(1 << (bit & 7))
            bit += 1


@njit(nogil=True)
def _lehmer_unpack(data, rows, order):  # pragma: no cover
    """Inverse of :func:`_lehmer_pack` into ``order`` (int64[rows]): 0, or -1 for a digit above
    ``rows - 1 - k`` (no such row left), -2 for a non-zero padding bit."""
    tree = np.zeros(rows + 1, np.int64)
    for i in range(1, rows + 1):
        tree[i] = i & (-i)
    top = 1
    while top * 2 <= rows:
        top *= 2
    bit = 0
    for k in range(rows):
        d = np.int64(0)
        for b in range(_bitlen(rows - 1 - k)):
            d |= np.int64((data[bit >> 3] >> (bit & 7)) & 1) << b
            bit += 1
        if d > rows - 1 - k:
            return -1
        # the (d+1)-th untaken row: descend the tree
        pos, rem, step = 0, d + 1, top
        while step > 0:
            nxt = pos + step
            if nxt <= rows and tree[nxt] < rem:
                pos = nxt
                rem -= tree[nxt]
            step >>= 1
        order[k] = pos                          # 1-based pos + 1, 0-based pos
        i = pos + 1
        while i <= rows:
            tree[i] -= 1
            i += i & (-i)
    while bit < data.size * 8:
        if (data[bit >> 3] >> (bit & 7)) & 1:
            return -2
        bit += 1
    return 0


# ----------------------------------------------------------------------------- helpers

def _perm_bits(rows: int) -> int:
    """Bits of kind 4's packed row order: ``Σ_{k < rows} bitlen(rows - 1 - k) = Σ_{v < rows} bitlen(v)``."""
    total, b = 0, 1
    while (1 << (b - 1)) < rows:          # v in [2^(b-1), min(2^b, rows)) have b bits
        total += b * (min(1 << b, rows) - (1 << (b - 1)))
        b += 1
    return total


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


class _Reader:
    """Bounds-checked cursor over a blob; every failure is a BadPayload (a FormatError) naming the field."""

    def __init__(self, blob: bytes, pos: int = 0) -> None:
        self.blob = blob
        self.pos = pos

    def take(self, k: int, what: str) -> bytes:
        if self.pos + k > len(self.blob):
            raise BadPayload(f"rANS blob truncated reading {what}")
        b = self.blob[self.pos:self.pos + k]
        self.pos += k
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str, max_bytes: int = 5) -> int:
        v = 0
        for k in range(max_bytes):
            b = self.u8(what)
            v |= (b & 0x7F) << (7 * k)
            if b < 0x80:
                return v
        raise BadPayload(f"rANS varint too long in {what}")


def _normalize_counts(counts: np.ndarray, prob_bits: int) -> np.ndarray:
    """Integer frequencies summing to 2^prob_bits, >= 1 wherever ``counts > 0``.

    Starts from proportional rounding and then moves single units where they cost the
    fewest coded bits (greedy on ``count · log2`` differences), so the coded size is close
    to optimal for these counts. Encoder-side only: the result is stored in the blob.
    """
    M = 1 << prob_bits
    live = np.flatnonzero(counts)
    c = counts[live].astype(np.float64)
    f = np.maximum(1, np.round(c * (M / c.sum()))).astype(np.int64)
    diff = M - int(f.sum())
    while diff > 0:    # add a unit where it saves most: c·log2((f+1)/f)
        k = int(np.argmax(c * np.log2((f + 1) / f)))
        f[k] += 1
        diff -= 1
    while diff < 0:    # remove a unit where it costs least, never below 1
        loss = np.where(f > 1, c * np.log2(f / np.maximum(f - 1, 1)), np.inf)
        k = int(np.argmin(loss))
        f[k] -= 1
        diff += 1
    out = np.zeros(counts.size, dtype=np.int64)
    out[live] = f
    return out


def _width_sq(j: np.ndarray) -> np.ndarray:
    """a² = 2^((j - 64)/8) exactly as the format defines it (literal roots and ldexp)."""
    k = j.astype(np.int64) - _WIDTH_OFFSET
    return np.ldexp(np.asarray(_ROOT8, dtype=np.float64)[k % 8], k // 8)


def _param_shares(js: np.ndarray, m: int, lo: int, hi: int, center2: int | np.ndarray,
                  prob_bits: int) -> np.ndarray:
    """Table construction up to step 4: ``v = p·(2^P - A)/sum(p)``, float64 ``[len(js), A]``.

    ``center2`` (twice the center code) is one int for all tables or one per table (kind 2).
    Each row depends only on its own (j, center2), not on the others in the batch.
    """
    js = np.asarray(js)
    A = hi - lo + 1
    M = 1 << prob_bits
    c2 = np.broadcast_to(np.asarray(center2, dtype=np.float64), js.shape)
    d = (np.arange(lo, hi + 1, dtype=np.float64)[None, :] * 2.0 - c2[:, None]) * 0.5  # exact
    t = (d * d) / (float(m) * _width_sq(js))[:, None]
    base = 1.0 + t
    # p = (base_min / base)^m: the code nearest the center gets exactly 1.0, so the total is
    # >= 1 and nothing overflows. The power is a fixed square-and-multiply chain over the
    # bits of m. Every intermediate is <= 1 and only shrinks, so a value that ever became
    # subnormal ends below 2^-1000; zeroing those makes the result independent of
    # flush-to-zero CPU modes.
    r = base.min(axis=1, keepdims=True) / base
    p = np.ones_like(r)
    with np.errstate(under="ignore"):
        for bit in bin(m)[2:]:
            p = p * p
            if bit == "1":
                p = p * r
    p[p < 2.0 ** -1000] = 0.0
    total = np.add.accumulate(p, axis=1)[:, -1:]          # sequential: order is fixed
    return (p * float(M - A)) / total


def _param_freqs(js: np.ndarray, m: int, lo: int, hi: int, center2: int | np.ndarray,
                 prob_bits: int) -> np.ndarray:
    """Deterministic integer tables ``int64[len(js), hi - lo + 1]`` summing to 2^prob_bits.

    Only IEEE float64 + - * / in a fixed order (see the module docstring), so encoder and
    decoder machines agree to the last integer. Every symbol in [lo, hi] gets >= 1.
    """
    A = hi - lo + 1
    M = 1 << prob_bits
    v = _param_shares(js, m, lo, hi, center2, prob_bits)
    fl = np.floor(v)
    f = fl.astype(np.int64) + 1
    # Largest-remainder completion; a stable sort breaks ties by symbol index.
    left = M - f.sum(axis=1)
    order = np.argsort(-(v - fl), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(A)[None, :].repeat(len(v), 0), axis=1)
    f += ranks < left[:, None]
    return f


def _tables(freq: np.ndarray, prob_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative starts ``int64[J, A]`` and the slot → symbol table ``uint8[J, 2^P]`` (uint16 if A > 256)."""
    cum = np.zeros_like(freq)
    np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
    A = freq.shape[1]
    dtype = np.uint8 if A <= 256 else np.uint16      # kind 3's residual tables: up to 511 symbols
    sym = np.repeat(np.tile(np.arange(A, dtype=dtype), freq.shape[0]), freq.ravel())
    return cum, sym.reshape(freq.shape[0], 1 << prob_bits)


def entropy_bits(data: np.ndarray) -> float:
    """Empirical order-0 entropy of ``data`` in total bits (the static-model limit)."""
    data = np.asarray(data).ravel()
    if data.size == 0:
        return 0.0
    c = np.bincount(data).astype(np.float64)
    c = c[c > 0]
    return float(-(c * np.log2(c / data.size)).sum())


# ----------------------------------------------------------------------------- encoding

def _pack(head: bytes, states: np.ndarray, words: np.ndarray) -> bytes:
    return head + states.astype("<u4").tobytes() + words.astype("<u2").tobytes()


def _run_encoder(sym: np.ndarray, row_model: np.ndarray, row_len: int, freq: np.ndarray,
                 prob_bits: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    cum, _ = _tables(freq, prob_bits)
    out = np.empty(sym.size + 1, dtype=np.uint16)   # at most one word per symbol
    states, pos = _encode_kernel(sym, row_model.astype(np.int32), row_len, freq, cum,
                                 prob_bits, lanes, out)
    if pos < 0:
        raise ValueError("rANS model gives a coded symbol zero frequency")
    return states, out[pos:]


def _encode_static(sym: np.ndarray, alphabet: int, prob_bits: int, lanes: int) -> bytes:
    """Static-model blob. ``prob_bits`` is an upper bound: a coarser table (fewer varint
    bytes) is used where its exactly computed total size is smaller, as for small tensors."""
    if sym.size == 0:
        lo = hi = 0
        freq = np.array([1 << prob_bits], dtype=np.int64)
        table = _varint(int(freq[0]))
    else:
        lo, hi = int(sym.min()), int(sym.max())
        counts = np.bincount(sym - lo, minlength=hi - lo + 1)
        live = counts > 0
        best = None
        for p in range(max(_MIN_PROB_BITS, int(live.sum() - 1).bit_length()), prob_bits + 1):
            f = _normalize_counts(counts, p)
            t = b"".join(_varint(int(v)) for v in f)
            bits = float((counts[live] * (p - np.log2(f[live]))).sum()) + 8 * len(t)
            if best is None or bits < best[0]:
                best = (bits, p, f, t)
        _, prob_bits, freq, table = best
    head = bytes([STATIC, prob_bits, lanes, lo, hi]) + table
    states, words = _run_encoder((sym - lo).astype(np.uint8), np.zeros(1, np.int32), sym.size,
                                 freq[None, :], prob_bits, lanes)
    return _pack(head, states, words)


def _fit_parametric(sym: np.ndarray, rows: int, row_len: int, lo: int, hi: int,
                    center2: int, prob_bits: int) -> tuple[int, np.ndarray, np.ndarray, float]:
    """Pick the shape ``m`` and each row's width byte minimizing the exact coded bits.

    Returns ``(m, j_per_row, freq_per_used_j, bits)``; costs use the very integer tables the
    decoder rebuilds, so the choice is the optimum within the family and grid.
    """
    A = hi - lo + 1
    hist = np.bincount((np.arange(rows).repeat(row_len) * A + (sym - lo)),
                       minlength=rows * A).reshape(rows, A).astype(np.float64)
    # Search only widths near the rows' spread: second moments of d bound the useful a².
    d = (np.arange(lo, hi + 1) - center2 / 2.0)
    msd = (hist @ (d * d)) / max(row_len, 1)
    lo_j = max(0, int(np.floor(8 * np.log2(max(msd.min(), 1e-3) / 64))) + _WIDTH_OFFSET)
    hi_j = min(255, int(np.ceil(8 * np.log2(max(msd.max(), 1e-3) * 4))) + _WIDTH_OFFSET)
    js = np.arange(lo_j, max(hi_j, lo_j) + 1)
    best = None
    for m in _SHAPES:
        freq = _param_freqs(js, m, lo, hi, center2, prob_bits)
        cost = hist @ (prob_bits - np.log2(freq)).T           # bits, (rows, len(js))
        pick = np.argmin(cost, axis=1)
        bits = float(cost[np.arange(rows), pick].sum())
        if best is None or bits < best[3]:
            best = (m, js[pick], freq, bits)
    m, jrow, freq_all, bits = best
    return m, jrow.astype(np.uint8), freq_all, bits


def _encode_parametric(sym: np.ndarray, alphabet: int, rows: int, row_len: int,
                       prob_bits: int, lanes: int, center2: int) -> bytes:
    lo, hi = int(sym.min()), int(sym.max())
    m, jrow, _, _ = _fit_parametric(sym, rows, row_len, lo, hi, center2, prob_bits)
    used, row_model = np.unique(jrow, return_inverse=True)
    freq = _param_freqs(used, m, lo, hi, center2, prob_bits)
    side = _encode_static(jrow, 256, prob_bits, lanes=1)
    head = (bytes([PARAMETRIC, prob_bits, lanes, lo, hi]) + int(center2).to_bytes(2, "little")
            + bytes([m]) + _varint(len(side)) + side)
    states, words = _run_encoder((sym - lo).astype(np.uint8), row_model, row_len, freq,
                                 prob_bits, lanes)
    return _pack(head, states, words)


def _zigzag(delta2: np.ndarray) -> np.ndarray:
    """Zig-zag: offsets -128..127 (half codes) → bytes 0..255 (0, -1, 1, -2, … → 0, 1, 2, 3, …)."""
    delta2 = delta2.astype(np.int64)
    return np.where(delta2 >= 0, 2 * delta2, -2 * delta2 - 1).astype(np.uint8)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_zigzag`: int64 offsets in half codes."""
    z = z.astype(np.int64)
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def _side_bits(x: np.ndarray) -> float:
    """Estimated size in bits of the static blob of bytes ``x``: entropy plus its table."""
    return entropy_bits(x) + 8.0 * (int(x.max()) - int(x.min()) + 1 + np.unique(x).size)


def _fit_columns(cols: np.ndarray, alphabet: int, lo: int, hi: int, center2: int,
                 prob_bits: int, beat_bits: float = np.inf
                 ) -> tuple[int, np.ndarray, np.ndarray] | None:
    """Pick ``m``, each column's width byte and center offset minimizing the coded bits.

    ``cols``: uint8 ``(row_len, rows)``, one column of the tensor per row. Returns
    ``(m, j uint8[row_len], delta2 int64[row_len])`` using at most ``MAX_COLUMN_TABLES``
    distinct (j, delta2) pairs; ``delta2`` is the center offset in half codes, searched within
    ±``_OFFSET_SEARCH`` of the rounded ``2·mean - center2``, and widths on one grid spanning
    every column's spread. Costs come from the very integer tables the decoder rebuilds.
    Table builds dominate the time, so ``m`` is chosen with the centers at the rounded means,
    on every fourth width, with the tables before their integer completion (``v + 1/2``,
    within one unit of the final ones); only the chosen ``m`` is searched exactly on the full
    grid, between the coarse optima ± 3 (the cost of one column is unimodal in its width).
    Returns None, skipping that search, if the coarse fit codes over ``_COLUMN_GIVE_UP`` times
    ``beat_bits``.
    """
    C, R = cols.shape
    A = hi - lo + 1
    idx = (cols.astype(np.intp) - lo) + (np.arange(C, dtype=np.intp) * A)[:, None]
    hist = np.bincount(idx.ravel(), minlength=C * A).reshape(C, A).astype(np.float64)
    d = np.arange(lo, hi + 1) - center2 / 2.0
    mean = hist @ d / R
    var = np.maximum(hist @ (d * d) / R - mean * mean, 1e-3)
    # Offsets keep every column center inside the alphabet and the zig-zag byte in range.
    d_lo = max(-128, -center2)
    d_hi = min(127, 2 * (alphabet - 1) - center2)
    S = _OFFSET_SEARCH
    cand = np.clip(np.rint(2 * mean).astype(np.int64)[:, None] + np.arange(-S, S + 1), d_lo, d_hi)
    # Widths: as for rows, from var/64 (heavy tails, small m) up to 4x the variance.
    lo_j = max(0, int(np.floor(8 * np.log2(var.min() / 64))) + _WIDTH_OFFSET)
    hi_j = min(255, int(np.ceil(8 * np.log2(var.max() * 4))) + _WIDTH_OFFSET)
    js = np.arange(lo_j, max(hi_j, lo_j) + 1)

    def costs(m: int, js: np.ndarray, offs: np.ndarray, exact: bool = True) -> np.ndarray:
        """Bits ``(C, k, len(js))``: column c centered at offset ``offs[c, k]``, width ``js[w]``."""
        deltas, which = np.unique(offs, return_inverse=True)
        which = which.reshape(offs.shape)
        cost = np.empty(offs.shape + (js.size,))
        # Offsets per table build: ~2^15 table entries keep the temporaries in cache (4x
        # faster than one big build) and bound memory.
        group = max(1, (1 << 15) // (js.size * A))
        for g in range(0, deltas.size, group):
            dg = deltas[g:g + group]
            args = (np.tile(js, dg.size), m, lo, hi, center2 + dg.repeat(js.size), prob_bits)
            freq = _param_freqs(*args) if exact else _param_shares(*args) + 0.5
            bits_tab = (prob_bits - np.log2(freq)).reshape(dg.size, js.size, A)
            for k in range(dg.size):                     # only the columns that try this offset
                c_i, k_i = np.nonzero(which == g + k)
                cost[c_i, k_i] = hist[c_i] @ bits_tab[k].T
        return cost

    # m and the width window: centers at the rounded means, every fourth width.
    coarse = js[::4]
    totals = []
    for m in _SHAPES:
        cost = costs(m, coarse, cand[:, S:S + 1], exact=False)[:, 0]
        pick = coarse[np.argmin(cost, axis=1)]
        totals.append((float(cost.min(axis=1).sum()), m, int(pick.min()), int(pick.max())))
    coarse_bits, m, j_min, j_max = min(totals)
    if coarse_bits > _COLUMN_GIVE_UP * beat_bits:
        return None
    js = np.arange(max(lo_j, j_min - 3), min(js[-1], j_max + 3) + 1)
    cost = costs(m, js, cand)
    # Width grids of step 1, 2, ...: the first few that fit the decoder's cap compete on data
    # bits plus the estimated side bytes (a coarser grid codes the widths in fewer bits).
    # A grid of one width leaves at most 256 offsets, so one always fits.
    best, tried = None, 0
    for step in range(1, js.size + 1):
        sub = cost[:, :, ::step].reshape(C, -1)
        pick = np.argmin(sub, axis=1)
        k_pick, j_pick = np.divmod(pick, sub.shape[1] // (2 * S + 1))
        delta2 = cand[np.arange(C), k_pick]
        jcol = js[::step][j_pick].astype(np.uint8)
        if np.unique(jcol.astype(np.int64) * 256 + delta2).size > MAX_COLUMN_TABLES:
            continue
        bits = (float(sub[np.arange(C), pick].sum()) + _side_bits(jcol)
                + _side_bits(_zigzag(delta2)))
        if best is None or bits < best[0]:
            best = (bits, jcol, delta2)
        tried += 1
        if tried == 4:
            break
    return m, best[1], best[2]


def _column_gain_bits(sym: np.ndarray, rows: int, row_len: int) -> float:
    """Gaussian estimate of the bits per-column centers and widths save over one distribution.

    ``sum_c rows/2 · log2(var_all / var_c)``, each variance plus the 1/12 of unit rounding so a
    constant column does not count as infinitely cheap. O(n); the screen before the column fit.
    """
    x = sym.reshape(rows, row_len).astype(np.float32)
    var_c = x.var(axis=0, dtype=np.float64) + 1.0 / 12
    var_all = x.var(dtype=np.float64) + 1.0 / 12
    return 0.5 * rows * float(np.log2(var_all / var_c).sum())


def _column_model(jcol: np.ndarray, zcol: np.ndarray, m: int, lo: int, hi: int, center2: int,
                  prob_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kind-2 model from the per-column bytes (``row_len`` each).

    Returns ``(freq int64[T, A], table int32[row_len], order int64[row_len])``. Tables are
    numbered by the sorted key ``j · 256 + z`` (z: zig-zag offset byte), so the numbering
    depends only on which pairs occur, never on the column order. ``order`` is the coding
    order of the columns: by table, ties by column index, so a decoder loads each table once.
    More than ``MAX_COLUMN_TABLES`` pairs is a bad blob (the encoder never writes one).
    """
    keys, table = np.unique(jcol.astype(np.int64) * 256 + zcol, return_inverse=True)
    if keys.size > MAX_COLUMN_TABLES:
        raise BadPayload(f"rANS: {keys.size} column tables, more than {MAX_COLUMN_TABLES}")
    freq = _param_freqs(keys // 256, m, lo, hi, center2 + _unzigzag(keys % 256), prob_bits)
    return freq, table.astype(np.int32), np.argsort(table, kind="stable")


def _encode_column(sym: np.ndarray, alphabet: int, rows: int, row_len: int, prob_bits: int,
                   lanes: int, center2: int, beat: int | None = None) -> bytes | None:
    """Kind-2 blob, or None when it would clearly be larger than ``beat`` bytes."""
    prob_bits = min(prob_bits, _COLUMN_PROB_BITS)     # an upper bound, as for static
    lo, hi = int(sym.min()), int(sym.max())
    cols = np.ascontiguousarray(sym.reshape(rows, row_len).T)     # (row_len, rows)
    fit = _fit_columns(cols, alphabet, lo, hi, center2, prob_bits,
                       np.inf if beat is None else 8.0 * beat)
    if fit is None:
        return None
    m, jcol, delta2 = fit
    zcol = _zigzag(delta2)
    freq, table, order = _column_model(jcol, zcol, m, lo, hi, center2, prob_bits)
    widths = _encode_static(jcol, 256, prob_bits, lanes=1)
    offsets = _encode_static(zcol, 256, prob_bits, lanes=1)
    head = (bytes([COLUMN, prob_bits, lanes, lo, hi]) + int(center2).to_bytes(2, "little")
            + bytes([m]) + _varint(len(widths)) + widths + _varint(len(offsets)) + offsets)
    # Each column is one run of ``rows`` symbols for the row kernels, runs in ``order``.
    states, words = _run_encoder((cols[order] - lo).astype(np.uint8).ravel(), table[order],
                                 rows, freq, prob_bits, lanes)
    return _pack(head, states, words)


def _rowref_predict(x: np.ndarray, z: int) -> tuple[np.ndarray, float]:
    """Kind 3's ρ8 per row (row 0: 0) by least squares on ``x - z`` against the rounded prediction
    from the row above, and the Gaussian estimate of the bits it saves,
    ``Σ_i L/2 · log2((msd_i(ρ=0) + 1/12) / (msd_i(ρ) + 1/12))``. ``x``: int64 ``(rows, L)``."""
    rows, row_len = x.shape
    rho = np.zeros(rows, np.uint8)
    if rows < 2 or row_len == 0:
        return rho, 0.0
    d = x - z
    prev, cur = d[:-1], d[1:]
    msd = np.stack([(((cur - ((k * prev + 4) >> 3)) ** 2).mean(axis=1))
                    for k in range(_RHO_STEPS + 1)])                  # (9, rows - 1)
    pick = np.argmin(msd, axis=0)             # ties → the smaller ρ
    rho[1:] = pick
    best = msd[pick, np.arange(rows - 1)]
    gain = 0.5 * row_len * float(np.log2((msd[0] + 1.0 / 12) / (best + 1.0 / 12)).sum())
    return rho, gain


def _rowref_residuals(x: np.ndarray, z: int, rho: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Kind 3's coded symbols ``code - center + (hi - lo)``, int64 ``(rows, L)`` in ``0..2(hi-lo)``."""
    above = np.empty_like(x)
    above[0] = z
    above[1:] = x[:-1]
    center = z + ((rho.astype(np.int64)[:, None] * (above - z) + 4) >> 3)
    return x - center + (hi - lo)


def _rowref_freqs(js: np.ndarray, m: int, lo: int, hi: int, prob_bits: int) -> np.ndarray:
    """Kind 3's residual tables: the parametric tables over ``0..2(hi-lo)`` centered on ``hi - lo``."""
    D = int(hi) - int(lo)
    return _param_freqs(js, int(m), 0, 2 * D, 2 * D, prob_bits)


def _encode_rowref(sym: np.ndarray, alphabet: int, rows: int, row_len: int, prob_bits: int,
                   lanes: int, center2: int, rho: np.ndarray | None = None,
                   order: np.ndarray | None = None) -> bytes | None:
    """Kind-3 blob (per-row widths, centers predicted from the row above), None if ``2^P`` is
    too small for the residual tables (``2(hi - lo) + 1`` symbols). With ``order`` (a permutation
    of the rows: coding row k is stored row ``order[k]``) the kind-4 blob of that order; ``rho``
    then belongs to the rows in that order."""
    lo, hi = int(sym.min()), int(sym.max())
    A2 = 2 * (hi - lo) + 1
    if A2 > 1 << prob_bits:
        return None
    z = min(max(center2 // 2, lo), hi)
    x = sym.reshape(rows, row_len).astype(np.int64)
    perm = b""
    if order is not None:
        x = x[order]
        packed = np.zeros((_perm_bits(rows) + 7) // 8, np.uint8)
        _lehmer_pack(np.ascontiguousarray(order, dtype=np.int64), packed)
        perm = packed.tobytes()
    if rho is None:
        rho, _ = _rowref_predict(x, z)
    u = _rowref_residuals(x, z, rho, lo, hi)
    hist = np.bincount((np.arange(rows).repeat(row_len) * A2 + u.ravel()),
                       minlength=rows * A2).reshape(rows, A2).astype(np.float64)
    # Widths near the residuals' spread, as in _fit_parametric.
    d = np.arange(A2, dtype=np.float64) - (hi - lo)
    msd = (hist @ (d * d)) / max(row_len, 1)
    lo_j = max(0, int(np.floor(8 * np.log2(max(msd.min(), 1e-3) / 64))) + _WIDTH_OFFSET)
    hi_j = min(255, int(np.ceil(8 * np.log2(max(msd.max(), 1e-3) * 4))) + _WIDTH_OFFSET)
    js = np.arange(lo_j, max(hi_j, lo_j) + 1)
    best = None
    for m in _SHAPES:
        cost = hist @ (prob_bits - np.log2(_rowref_freqs(js, m, lo, hi, prob_bits))).T
        pick = np.argmin(cost, axis=1)
        bits = float(cost[np.arange(rows), pick].sum())
        if best is None or bits < best[0]:
            best = (bits, m, js[pick].astype(np.uint8))
    _, m, jrow = best
    used, row_model = np.unique(jrow, return_inverse=True)
    freq = _rowref_freqs(used, m, lo, hi, prob_bits)
    widths = _encode_static(jrow, 256, prob_bits, lanes=1)
    rhos = _encode_static(rho.astype(np.uint8), 256, prob_bits, lanes=1)
    head = (bytes([ROWREF if order is None else ROWPERM, prob_bits, lanes, lo, hi, z, m]) + perm
            + _varint(len(widths)) + widths + _varint(len(rhos)) + rhos)
    cum, _ = _tables(freq, prob_bits)
    out = np.empty(sym.size + 1, dtype=np.uint16)
    states, pos = _encode_kernel(u.ravel().astype(np.uint16), row_model.astype(np.int32), row_len,
                                 freq, cum, prob_bits, lanes, out)
    if pos < 0:
        raise ValueError("rANS model gives a coded symbol zero frequency")
    return _pack(head, states, out[pos:])


def default_center2(alphabet: int) -> int:
    """Twice the symmetric code center: 2^(b-1)-1 for int b >= 2, 1 for ternary, 0.5 for b = 1."""
    if alphabet == 3:
        return 2
    if alphabet == 2:
        return 1
    return alphabet - 2      # 2·(2^(b-1) - 1) = 2^b - 2


def encode(data: np.ndarray, alphabet: int, rows: int = 1, row_len: int | None = None, *,
           model: str = "auto", lanes: int = _LANES, prob_bits: int = _PROB_BITS,
           center2: int | None = None) -> bytes:
    """rANS-code ``data`` (codes ``0..alphabet-1``, ``rows * row_len`` of them, row-major).

    ``model``: ``"static"``, ``"parametric"``, ``"column"``, ``"rowref"``, ``"rowperm"`` (rows >= 2)
    or ``"auto"`` (encode all five, column only when ``rows >= 32``, ``row_len > 1``,
    :func:`_column_gain_bits` promises at least ``_COLUMN_MIN_GAIN`` bits per column and its coarse
    fit is not clearly worse, rowref only when :func:`_rowref_predict` promises at least
    ``_ROWREF_MIN_GAIN`` bits per row, rowperm only then, for at most ``_ROWPERM_MAX_ROWS`` rows,
    and when that estimate on the chained rows less the order's bits is larger; keep the smallest
    blob, ties to the lowest kind). ``center2``
    is twice the code the parametric models are centered on (default: the symmetric code
    center of ``alphabet``). ``prob_bits`` bounds the table precision (static may use less,
    column uses at most 14). Returns the self-describing blob. The column fit holds a
    ``row_len x (hi - lo + 1)`` float64 histogram; "auto" skips it above ``_COLUMN_MAX_HIST``.
    """
    sym = np.ascontiguousarray(np.asarray(data).ravel())
    if sym.dtype != np.uint8:
        if sym.size and (sym.min() < 0 or sym.max() > 255):
            raise ValueError("rANS codes must be in 0..255")
        sym = sym.astype(np.uint8)
    if not 1 <= alphabet <= 256:
        raise ValueError(f"alphabet must be 1..256, got {alphabet}")
    if sym.size and int(sym.max()) >= alphabet:
        raise ValueError(f"code {int(sym.max())} out of alphabet {alphabet}")
    row_len = sym.size if row_len is None else row_len
    if rows * row_len != sym.size:
        raise ValueError(f"rows*row_len = {rows}*{row_len} != {sym.size} symbols")
    if not 1 <= lanes <= _MAX_LANES or not _MIN_PROB_BITS <= prob_bits <= _MAX_PROB_BITS:
        raise ValueError("lanes must be 1..32 and prob_bits 8..16")
    if model not in MODELS:
        raise ValueError(f"unknown rANS model {model!r}")
    c2 = default_center2(alphabet) if center2 is None else int(center2)
    if not 0 <= c2 <= 2 * (alphabet - 1):
        raise ValueError(f"center2 {c2} outside the alphabet")
    blobs = []
    if model in ("auto", "static") or sym.size == 0:
        blobs.append(_encode_static(sym, alphabet, prob_bits, lanes))
    if model in ("auto", "parametric") and sym.size:
        blobs.append(_encode_parametric(sym, alphabet, rows, row_len, prob_bits, lanes, c2))
    if sym.size and model == "column":
        blobs.append(_encode_column(sym, alphabet, rows, row_len, prob_bits, lanes, c2))
    elif (sym.size and model == "auto" and rows >= _COLUMN_MIN_ROWS and row_len > 1
          and row_len * (int(sym.max()) - int(sym.min()) + 1) <= _COLUMN_MAX_HIST
          and _column_gain_bits(sym, rows, row_len) >= _COLUMN_MIN_GAIN * row_len):
        col = _encode_column(sym, alphabet, rows, row_len, prob_bits, lanes, c2,
                             beat=min(len(b) for b in blobs))
        blobs += [col] if col is not None else []
    if sym.size and model in ("rowref", "rowperm"):
        order = None
        if model == "rowperm":
            if rows < 2:
                raise ValueError("rowperm needs at least 2 rows")
            order = _chain_order(sym.reshape(rows, row_len).astype(np.int16))
        ref = _encode_rowref(sym, alphabet, rows, row_len, prob_bits, lanes, c2, order=order)
        if ref is None:
            raise ValueError(f"{model} needs 2^prob_bits >= 2·(max - min code) + 1")
        blobs.append(ref)
    elif sym.size and model == "auto" and rows >= 2:
        lo, hi = int(sym.min()), int(sym.max())
        z = min(max(c2 // 2, lo), hi)
        x = sym.reshape(rows, row_len).astype(np.int64)
        rho, gain = _rowref_predict(x, z)
        if gain >= _ROWREF_MIN_GAIN * rows:
            ref = _encode_rowref(sym, alphabet, rows, row_len, prob_bits, lanes, c2, rho)
            blobs += [ref] if ref is not None else []
            if ref is not None and rows <= _ROWPERM_MAX_ROWS:
                order = _chain_order(x.astype(np.int16))
                rho_p, gain_p = _rowref_predict(x[order], z)
                if gain_p - _perm_bits(rows) > gain:
                    blobs.append(_encode_rowref(sym, alphabet, rows, row_len, prob_bits, lanes, c2,
                                                rho_p, order))
    return min(blobs, key=len)


# ----------------------------------------------------------------------------- decoding

def _read_static_freq(r: _Reader, lo: int, hi: int, prob_bits: int) -> np.ndarray:
    freq = np.array([r.varint("frequency table", 3) for _ in range(hi - lo + 1)], np.int64)
    if int(freq.sum()) != 1 << prob_bits:
        raise BadPayload("rANS frequency table does not sum to 2^P")
    return freq


def _read_side(blob: bytes, r: _Reader, count: int, what: str) -> np.ndarray:
    """A length-prefixed nested static blob of ``count`` bytes (alphabet 256)."""
    side_len = r.varint(f"{what} length")
    end = r.pos + side_len
    if end > len(blob):
        raise BadPayload(f"rANS blob truncated in {what}")
    sub = _Reader(blob[:end], r.pos)
    out = _decode_at(blob[:end], sub, count, 256, 1, count, nested=True)
    if sub.pos != end:
        raise BadPayload(f"rANS: {what} block has trailing bytes")
    r.pos = end
    return out


def _decode_at(blob: bytes, r: _Reader, n: int, alphabet: int, rows: int,
               row_len: int, *, nested: bool = False) -> np.ndarray:
    kind, prob_bits, lanes, lo, hi = r.take(5, "header")
    if kind not in MODEL_NAMES or (nested and kind != STATIC):
        raise BadPayload(f"rANS: unknown model kind {kind}")
    if not _MIN_PROB_BITS <= prob_bits <= _MAX_PROB_BITS:
        raise BadPayload(f"rANS: probability bits {prob_bits} outside 8..16")
    if not 1 <= lanes <= _MAX_LANES:
        raise BadPayload(f"rANS: {lanes} lanes outside 1..32")
    if lo > hi or hi >= alphabet:
        raise BadPayload(f"rANS: code range [{lo}, {hi}] outside alphabet {alphabet}")
    # The kernel decodes runs of ``row_len_k`` symbols, run i with table ``row_model[i]``.
    perm = None
    if kind == STATIC:
        freq = _read_static_freq(r, lo, hi, prob_bits)[None, :]
        row_model = np.zeros(1, np.int32)
        row_len_k = n
    elif kind in (ROWREF, ROWPERM):
        z = r.u8("center")
        m = r.u8("shape")
        if not lo <= z <= hi or m == 0:
            raise BadPayload("rANS: bad rowref center or shape")
        if 2 * (hi - lo) + 1 > 1 << prob_bits:
            raise BadPayload("rANS: rowref residual tables do not fit 2^P")
        perm = None
        if kind == ROWPERM:
            if rows < 2 or row_len < 1:
                raise BadPayload("rANS: a rowperm stream needs at least 2 rows of at least 1 code")
            # rows <= n here, so nothing below is larger than the declared stream
            packed = np.frombuffer(r.take((_perm_bits(rows) + 7) // 8, "row order"), np.uint8)
            perm = np.empty(rows, np.int64)
            err = _lehmer_unpack(packed, rows, perm)
            if err:
                raise BadPayload("rANS: a row-order digit names no row left" if err == -1
                                 else "rANS: non-zero padding bits after the row order")
        used, row_model = np.unique(_read_side(blob, r, rows, "row widths"), return_inverse=True)
        rho = _read_side(blob, r, rows, "row predictions")
        if rows and (int(rho.max()) > _RHO_STEPS or rho[0] != 0):
            raise BadPayload("rANS: a row prediction is above 8 (or row 0 has one)")
        freq = _rowref_freqs(used, m, lo, hi, prob_bits)
        row_len_k = row_len
    else:
        center2 = int.from_bytes(r.take(2, "center"), "little")
        m = r.u8("shape")
        if center2 > 2 * (alphabet - 1) or m == 0:
            raise BadPayload("rANS: bad parametric center or shape")
        if kind == PARAMETRIC:
            used, row_model = np.unique(_read_side(blob, r, rows, "row widths"),
                                        return_inverse=True)
            freq = _param_freqs(used, m, lo, hi, center2, prob_bits)
            row_len_k = row_len
        else:
            jcol = _read_side(blob, r, row_len, "column widths")
            zcol = _read_side(blob, r, row_len, "column offsets")
            c2 = center2 + _unzigzag(zcol)
            if row_len and (c2.min() < 0 or c2.max() > 2 * (alphabet - 1)):
                raise BadPayload("rANS: a column center lies outside the alphabet")
            freq, table, order = _column_model(jcol, zcol, m, lo, hi, center2, prob_bits)
            row_model = table[order]          # one run of ``rows`` symbols per column
            row_len_k = rows
    state_bytes = r.take(4 * lanes, "states")
    states = np.frombuffer(state_bytes, "<u4").astype(np.int64)
    if (states < _L).any():
        raise BadPayload("rANS: initial state below 2^16")
    rest = len(blob) - r.pos      # the words run to the end (of the nested block, if nested)
    if rest % 2:
        raise BadPayload("rANS: word stream has an odd number of bytes")
    words = np.zeros(rest // 2 + 1, dtype=np.uint16)
    words[:-1] = np.frombuffer(blob, "<u2", count=rest // 2, offset=r.pos)
    r.pos += rest
    cum, sym_tab = _tables(freq, prob_bits)
    out = np.empty(n, dtype=np.uint8)
    if kind in (ROWREF, ROWPERM):
        err = _decode_rowref_kernel(words, rest // 2, states, row_model.astype(np.int32), rho,
                                    row_len_k, sym_tab, freq, cum, prob_bits, z, lo, hi, out)
    else:
        err = _decode_kernel(words, rest // 2, states, row_model.astype(np.int32), row_len_k,
                             sym_tab, freq, cum, prob_bits, out)
    if err:
        raise BadPayload({-1: "rANS: word stream truncated",
                           -2: "rANS: final states do not match (corrupt stream)",
                           -3: "rANS: trailing words after the stream",
                           -4: "rANS: a rowref/rowperm code lies outside [lo, hi]"}[err])
    if lo and kind not in (ROWREF, ROWPERM):
        out += np.uint8(lo)
    if perm is not None:                  # coding row k is stored row perm[k]
        coded, out = out.reshape(rows, row_len), np.empty((rows, row_len), np.uint8)
        out[perm] = coded
        out = out.ravel()
    if kind == COLUMN:                    # column runs in coding order → row-major
        runs, out = out.reshape(row_len, rows), np.empty((rows, row_len), np.uint8)
        _unpermute_columns(runs, order, out)
        out = out.ravel()
    return out


def decode(blob: bytes, n: int, alphabet: int, rows: int = 1,
           row_len: int | None = None) -> np.ndarray:
    """Inverse of :func:`encode`: ``uint8[n]`` codes. Any bad blob raises ``BadPayload`` (a ``FormatError``)."""
    row_len = n if row_len is None else row_len
    if rows * row_len != n or n < 0:
        raise ValueError(f"rows*row_len = {rows}*{row_len} != {n} symbols")
    blob = bytes(blob)
    return _decode_at(blob, _Reader(blob), n, alphabet, rows, row_len)


# ----------------------------------------------------------------------------- registry

def _row_view(ctx: Any) -> tuple[int, int]:
    """The tensor's (rows, row_len) when it describes this stream, else one row of n."""
    if ctx.rows * ctx.row_len == ctx.n and ctx.rows > 0:
        return ctx.rows, ctx.row_len
    return 1, ctx.n


class RansCoder:
    """Registry entry for coder id 4 (``pgolf_codec.coders``): duck-types its ``Coder``.

    It does not import ``coders`` (which registers it), so either module may load first.
    Uses ``ctx.n``, ``ctx.alphabet`` and the row view ``ctx.rows x ctx.row_len``; row widths
    are measured from the codes, so ``ctx.scales`` is not needed (with per-row scales the
    code widths do not follow the scales anyway).
    """

    id = 4
    name = "rans"

    def supports(self, ctx: Any) -> bool:
        """Only one-code-per-byte streams with a row view (bit-packed or float bytes: no gain)."""
        return ctx.rows * ctx.row_len == ctx.n and ctx.alphabet <= 256

    def encode(self, data: np.ndarray, ctx: Any) -> bytes:
        return encode(data, ctx.alphabet, *_row_view(ctx))

    def decode(self, blob: bytes, ctx: Any) -> np.ndarray:
        return decode(blob, ctx.n, ctx.alphabet, *_row_view(ctx))
