"""Bit packing of codes (numba): widths 1..8 and base-3 ternary, any length.

Layout is defined in spec/FORMAT.md "Bit packing" and by the numpy reference in
`pgolf_codec._reference`.  `unpack`/`unpack_trits` read untrusted bytes: they raise
`BadPayload` on a wrong length, non-zero padding bits, or a byte that is not 5 trits, so
every code sequence has exactly one packed form.
"""
from __future__ import annotations

import numpy as np

from ._reference import packed_len, trits_len
from .errors import BadPayload
from .jit import njit

__all__ = ["pack", "unpack", "pack_trits", "unpack_trits", "packed_len", "trits_len"]


@njit(nogil=True)
def _pack(codes, bits, out):
    acc = np.uint64(0)
    nacc = 0
    j = 0
    for i in range(codes.size):
        acc |= np.uint64(codes[i]) << np.uint64(nacc)
        nacc += bits
        if nacc >= 8:  # bits <= 8, so one flush suffices
            out[j] = np.uint8(acc & np.uint64(0xFF))
            acc >>= np.uint64(8)
            nacc -= 8
            j += 1
    if nacc > 0:
        out[j] = np.uint8(acc & np.uint64(0xFF))


@njit(nogil=True)
def _unpack(buf, bits, n, out):
    """Fill out[:n]; return the leftover (padding) bits, which must be zero."""
    mask = np.uint64((1 << bits) - 1)
    acc = np.uint64(0)
    nacc = 0
    j = 0
    for i in range(n):
        if nacc < bits:
            acc |= np.uint64(buf[j]) << np.uint64(nacc)
            j += 1
            nacc += 8
        out[i] = np.uint8(acc & mask)
        acc >>= np.uint64(bits)
        nacc -= bits
    while j < buf.size:  # a trailing byte holding only padding
        acc |= np.uint64(buf[j]) << np.uint64(nacc)
        j += 1
        nacc += 8
    return acc


@njit(nogil=True)
def _pack_trits(codes, out):
    n = codes.size
    for j in range(out.size):
        v = 0
        p = 1
        for k in range(5):
            i = 5 * j + k
            if i < n:
                v += codes[i] * p
            p *= 3
        out[j] = v


@njit(nogil=True)
def _unpack_trits(buf, n, out):
    """Fill out[:n]; return False on a byte >= 243 or a non-zero padding trit."""
    for j in range(buf.size):
        v = np.int64(buf[j])
        if v >= 243:
            return False
        for k in range(5):
            i = 5 * j + k
            d = v % 3
            v //= 3
            if i < n:
                out[i] = d
            elif d != 0:
                return False
    return True


def _as_codes(codes: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(codes, dtype=np.uint8).ravel()
    return a


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8[n] codes, each < 2^bits (1 <= bits <= 8) -> uint8[ceil(n*bits/8)], LSB first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack: bits must be 1..8, got {bits}")
    a = _as_codes(codes)
    if bits == 8:
        return a.copy()
    if a.size and int(a.max()) >> bits:
        raise ValueError(f"pack: code {int(a.max())} does not fit in {bits} bits")
    out = np.zeros(packed_len(a.size, bits), dtype=np.uint8)
    _pack(a, bits, out)
    return out


def unpack(buf: np.ndarray | bytes, bits: int, n: int) -> np.ndarray:
    """uint8[ceil(n*bits/8)] -> uint8[n]; BadPayload on wrong length or non-zero padding."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack: bits must be 1..8, got {bits}")
    b = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else _as_codes(buf)
    if b.size != packed_len(n, bits):
        raise BadPayload(f"packed stream has {b.size} bytes, {n} codes of {bits} bits need {packed_len(n, bits)}")
    if bits == 8:
        return b.copy()
    out = np.empty(n, dtype=np.uint8)
    if _unpack(b, bits, n, out) != 0:
        raise BadPayload("packed stream has non-zero padding bits")
    return out


def pack_trits(codes: np.ndarray) -> np.ndarray:
    """uint8[n] trits (0..2) -> uint8[ceil(n/5)], byte = c0 + 3c1 + 9c2 + 27c3 + 81c4."""
    a = _as_codes(codes)
    if a.size and int(a.max()) > 2:
        raise ValueError(f"pack_trits: code {int(a.max())} is not a trit")
    out = np.zeros(trits_len(a.size), dtype=np.uint8)
    _pack_trits(a, out)
    return out


def unpack_trits(buf: np.ndarray | bytes, n: int) -> np.ndarray:
    """uint8[ceil(n/5)] -> uint8[n] trits; BadPayload on wrong length, byte >= 243, or padding."""
    b = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else _as_codes(buf)
    if b.size != trits_len(n):
        raise BadPayload(f"trit stream has {b.size} bytes, {n} trits need {trits_len(n)}")
    out = np.empty(n, dtype=np.uint8)
    if not _unpack_trits(b, n, out):
        raise BadPayload("trit stream has a byte >= 243 or a non-zero padding trit")
    return out
