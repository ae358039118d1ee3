"""Plain-numpy reference bit packing: the executable definition the numba kernels are tested against.

Layout (spec/FORMAT.md "Bit packing"): codes are laid out in order, each occupying `bits`
bits, least-significant bit first within the little-endian bit stream; the last byte is
zero-padded.  Ternary: 5 trits per byte, byte = c0 + 3c1 + 9c2 + 27c3 + 81c4.
"""
from __future__ import annotations

import numpy as np


def packed_len(n: int, bits: int) -> int:
    """Bytes holding n codes of `bits` bits."""
    return (n * bits + 7) // 8


def trits_len(n: int) -> int:
    """Bytes holding n trits (5 per byte)."""
    return (n + 4) // 5


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8[n] codes < 2^bits -> uint8[ceil(n*bits/8)]."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.ravel(), bitorder="little")


def unpack(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint8[ceil(n*bits/8)] -> uint8[n] codes."""
    flat = np.unpackbits(np.asarray(buf, dtype=np.uint8), bitorder="little")[: n * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (flat.reshape(n, bits).astype(np.uint16) @ weights).astype(np.uint8)


def pack_trits(codes: np.ndarray) -> np.ndarray:
    """uint8[n] trits (0..2) -> uint8[ceil(n/5)]."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    padded = np.zeros(trits_len(codes.size) * 5, dtype=np.uint16)
    padded[: codes.size] = codes
    return (padded.reshape(-1, 5) @ np.array([1, 3, 9, 27, 81], dtype=np.uint16)).astype(np.uint8)


def unpack_trits(buf: np.ndarray, n: int) -> np.ndarray:
    """uint8[ceil(n/5)] -> uint8[n] trits."""
    b = np.asarray(buf, dtype=np.uint8).astype(np.uint16)
    digits = (b[:, None] // np.array([1, 3, 9, 27, 81], dtype=np.uint16)) % 3
    return digits.ravel()[:n].astype(np.uint8)
