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


# ----------------------------------------------------------------------------- "auto" pruning, cache

from pgolf_codec import coders as coders_mod  # noqa: E402
from pgolf_codec.coders import EXACT_MAX_BYTES, clear_cache, has_structure  # noqa: E402


def _gaussian_codes(rows: int, cols: int, step: float, levels: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, cols)) / step + (levels // 2 - 1)
    return np.clip(np.rint(x), 0, levels - 1).astype(np.uint8)


def test_structure_probe_sees_repeats_and_context_not_iid_codes():
    iid = _gaussian_codes(256, 512, 0.25, 64)
    assert not has_structure(iid)
    tied = iid.copy()
    tied[200:] = tied[:56]  # ~20% repeated rows
    assert has_structure(tied)
    walk = np.cumsum(np.random.default_rng(1).integers(-1, 2, 1 << 17)) % 64  # order-1 context
    assert has_structure(walk.astype(np.uint8))


@pytest.mark.parametrize("levels,structured", [(64, False), (256, False), (3, False), (64, True)])
def test_pruned_auto_equals_exhaustive_choice(levels, structured):
    clear_cache()
    codes = _gaussian_codes(256, 512, 0.25 if levels > 3 else 2.0, levels)
    if structured:
        codes[128:] = codes[:128]
    assert codes.size >= EXACT_MAX_BYTES
    desc = StreamDesc(codes.size, levels, 1, 256, 512)
    fast = encode_stream(codes, desc)
    exact = encode_stream(codes, desc, exhaustive=True)
    assert fast == exact
    # repeats: a general compressor wins; otherwise rANS (or raw bit-packing)
    assert getattr(CODERS[fast[1]], "general", False) == structured


def test_auto_skips_general_coders_only_on_large_structureless_streams(monkeypatch):
    calls: list[int] = []
    for cid in (1, 2, 3):
        orig = CODERS[cid].encode
        monkeypatch.setattr(CODERS[cid], "encode", lambda d, c, orig=orig, cid=cid: calls.append(cid) or orig(d, c))
    clear_cache()
    big = _gaussian_codes(256, 512, 0.25, 64).ravel()
    encode_stream(big, StreamDesc(big.size, 64, 1, 256, 512))
    assert calls == []
    small = big[: EXACT_MAX_BYTES - 1]
    encode_stream(small, StreamDesc(small.size, 64))
    assert sorted(set(calls)) == [1, 2, 3]  # exact best-of below the threshold


def test_encodings_are_cached_by_content(monkeypatch):
    n_calls = []
    orig = CODERS[3].encode
    monkeypatch.setattr(CODERS[3], "encode", lambda d, c: n_calls.append(1) or orig(d, c))
    clear_cache()
    data = np.arange(5000, dtype=np.uint8)
    first = encode_stream(data, StreamDesc(data.size), "zlib")
    assert encode_stream(data.copy(), StreamDesc(data.size), "zlib") == first and len(n_calls) == 1
    encode_stream(data[::-1], StreamDesc(data.size), "zlib")  # other bytes: coded again
    assert len(n_calls) == 2
    clear_cache()
    assert encode_stream(data, StreamDesc(data.size), "zlib") == first and len(n_calls) == 3


def test_without_zstandard_auto_skips_zstd_and_decoding_names_the_package(monkeypatch):
    import sys
    data = np.tile(np.arange(64, dtype=np.uint8), 100)
    t, c, blob = encode_stream(data, StreamDesc(data.size), "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    assert coders_mod.zstd_module() is None
    for exhaustive in (False, True):
        t2, c2, blob2 = encode_stream(data, StreamDesc(data.size), exhaustive=exhaustive)
        assert c2 != 1 and np.array_equal(decode_stream(blob2, t2, c2, StreamDesc(data.size)), data)
    assert not has_structure(_gaussian_codes(256, 512, 0.25, 64))  # the probe falls back to zlib
    with pytest.raises(UnsupportedCoder, match="zstandard"):
        decode_stream(blob, t, c, StreamDesc(data.size))
    with pytest.raises(UnsupportedCoder, match="zstandard"):
        encode_stream(data, StreamDesc(data.size), "zstd")
