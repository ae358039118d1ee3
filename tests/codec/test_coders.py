"""Coder registry and stream transforms: roundtrips, best-of choice, bounded, clean failures."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pgolf_codec import CODERS, FormatError
from pgolf_codec.coders import (Coder, CoderContext, StreamDesc, coder_by_name, decode_stream, encode_stream,
                                register)
from pgolf_codec.errors import UnsupportedCoder


def test_reserved_ids_and_names():
    assert {i: CODERS[i].name for i in range(4)} == {0: "raw", 1: "zstd", 2: "lzma", 3: "zlib"}
    assert all(0 <= i <= 15 and c.id == i for i, c in CODERS.items())
    with pytest.raises(ValueError):
        register(CODERS[1])
    with pytest.raises(ValueError, match="unknown coder"):
        coder_by_name("brotli")


@pytest.mark.parametrize("cid", [0, 1, 2, 3])
@settings(max_examples=15)
@given(data=st.binary(max_size=2000))
def test_builtin_coders_roundtrip(cid, data):
    arr = np.frombuffer(data, np.uint8)
    ctx = CoderContext(n=arr.size)
    blob = CODERS[cid].encode(arr, ctx)
    assert np.array_equal(CODERS[cid].decode(blob, ctx), arr)


@pytest.mark.parametrize("cid", [1, 2, 3])
def test_builtin_coders_reject_wrong_length_trailing_and_garbage(cid):
    arr = np.arange(1000, dtype=np.uint32).view(np.uint8)
    ctx = CoderContext(n=arr.size)
    blob = CODERS[cid].encode(arr, ctx)
    for bad_blob, bad_ctx in [(blob, CoderContext(n=arr.size - 1)), (blob, CoderContext(n=arr.size + 1)),
                              (blob + b"\0", ctx), (blob[:-3], ctx), (b"\xff" * 40, ctx), (b"", ctx)]:
        with pytest.raises(FormatError):
            CODERS[cid].decode(bad_blob, bad_ctx)


def test_zstd_bomb_is_refused_before_allocating():
    import zstandard
    bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))
    with pytest.raises(FormatError, match="declares"):
        CODERS[1].decode(bomb, CoderContext(n=100))


@settings(max_examples=40)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, "t"]), n=st.integers(0, 500), seed=st.integers(0, 2**31))
def test_stream_roundtrip_every_transform(bits, n, seed):
    alphabet = 3 if bits == "t" else 1 << bits
    codes = np.random.default_rng(seed).integers(0, alphabet, n).astype(np.uint8)
    desc = StreamDesc(n, alphabet)
    for coder in ["auto", "raw", "zlib"]:
        t, c, blob = encode_stream(codes, desc, coder)
        assert np.array_equal(decode_stream(blob, t, c, desc), codes)


def test_auto_picks_smallest_with_low_id_ties():
    codes = np.zeros(4096, np.uint8)
    desc = StreamDesc(codes.size, 64)
    t, c, blob = encode_stream(codes, desc)
    sizes = {}
    for coder in ("raw", "zstd", "lzma", "zlib"):
        _, cid, b = encode_stream(codes, desc, coder)
        sizes[cid] = len(b)
    assert len(blob) <= min(sizes.values())
    empty = encode_stream(np.zeros(0, np.uint8), StreamDesc(0, 64))
    assert empty == (0, 0, b"")  # everything is 0 bytes: lowest coder id and transform win


def test_shuffle_transform_roundtrip_and_helps_floats():
    x = (np.random.default_rng(0).standard_normal(20000) * 0.02).astype("<f2").view(np.uint8)
    desc = StreamDesc(x.size, 256, 2)
    t, c, blob = encode_stream(x, desc, "zstd")
    assert t == 2  # byte planes compress better for floats
    assert np.array_equal(decode_stream(blob, t, c, desc), x)


def test_decode_stream_rejects_unknown_coder_transform_and_alphabet():
    desc = StreamDesc(10, 4)
    with pytest.raises(UnsupportedCoder):
        decode_stream(b"", 0, 9, desc)
    with pytest.raises(FormatError, match="transform"):
        decode_stream(bytes(10), 2, 0, desc)
    with pytest.raises(FormatError, match="alphabet"):
        decode_stream(bytes([5] * 10), 0, 0, desc)


def test_third_party_coder_plugs_in_and_its_errors_are_wrapped():
    class Flaky(Coder):
        id, name = 15, "test-flaky"

        def encode(self, data, ctx):
            return b"x" + data.tobytes()

        def decode(self, blob, ctx):
            raise RuntimeError("boom")

    register(Flaky())
    try:
        t, c, blob = encode_stream(np.zeros(8, np.uint8), StreamDesc(8), "test-flaky")
        with pytest.raises(FormatError, match="boom"):
            decode_stream(blob, t, c, StreamDesc(8))
    finally:
        del CODERS[15]
