"""Checks shared by the rANS model-kind tests: the roundtrip of a forced kind; and hostile input,
where every prefix, appended bytes and random byte flips of a valid blob must decode to in-range
codes or fail with BadPayload, never crash, and arbitrary bytes after a kind's header likewise."""
from __future__ import annotations

import numpy as np

from pgolf_codec import rans
from pgolf_codec.errors import BadPayload, FormatError

ALPHABETS = [2 ** b for b in range(1, 9)] + [3]


def assert_roundtrip(codes: np.ndarray, alphabet: int, model: str, lanes: int, kind: int) -> None:
    """``codes`` [rows, row_len] encoded with ``model`` decode to themselves (uint8); a forced
    ``model`` (not "auto") writes a blob of ``kind``."""
    rows, row_len = codes.shape
    blob = rans.encode(codes, alphabet, rows, row_len, model=model, lanes=lanes)
    if model != "auto":
        assert blob[0] == kind
    out = rans.decode(blob, codes.size, alphabet, rows, row_len)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, codes.ravel())


def fails_cleanly(bad: bytes, codes: np.ndarray, alphabet: int) -> bool:
    """True when ``bad`` is refused with BadPayload; False when it decodes (then to in-range codes)."""
    rows, row_len = codes.shape
    try:
        out = rans.decode(bad, codes.size, alphabet, rows, row_len)
    except FormatError as e:
        assert isinstance(e, BadPayload)
        return True
    assert out.shape == (codes.size,) and int(out.max()) < alphabet
    return False


def corruption_failures(blob: bytes, codes: np.ndarray, alphabet: int, trials: int, seed: int = 4) -> int:
    """Asserts every strict prefix and the blob plus two bytes fail; returns how many of ``trials``
    blobs with 1-3 flipped bytes fail (the rest decode to in-range codes)."""
    assert all(fails_cleanly(blob[:k], codes, alphabet) for k in range(len(blob)))  # no prefix is a stream
    assert fails_cleanly(blob + b"\x00\x00", codes, alphabet)
    rng = np.random.default_rng(seed)
    failures = 0
    for _ in range(trials):
        b = bytearray(blob)
        for _ in range(rng.integers(1, 4)):
            b[int(rng.integers(0, len(b)))] ^= int(rng.integers(1, 256))
        failures += fails_cleanly(bytes(b), codes, alphabet)
    return failures


def mutated_prefix_fails_cleanly(blob: bytes, codes: np.ndarray, alphabet: int, seed: int) -> None:
    """1-5 bytes of ``blob`` overwritten at random, then cut to a random length of at least half:
    refused with BadPayload or decoded to in-range codes (the hypothesis fuzz of each kind)."""
    rng = np.random.default_rng(seed)
    b = bytearray(blob)
    for _ in range(rng.integers(1, 6)):
        b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    fails_cleanly(bytes(b[:int(rng.integers(len(b) // 2, len(b) + 1))]), codes, alphabet)


def arbitrary_tail_is_safe(kind: int, tail: bytes, n: int, alphabet: int) -> None:
    """A kind's header (P = 15, K = 2, the whole alphabet as the range) then arbitrary bytes."""
    blob = bytes([kind, 15, 2, 0, alphabet - 1]) + tail
    rows = 1 + n % 5 if n % (1 + n % 5) == 0 else 1
    try:
        out = rans.decode(blob, n, alphabet, rows, n // rows)
    except FormatError:
        return
    assert out.shape == (n,) and (n == 0 or int(out.max()) < alphabet)
