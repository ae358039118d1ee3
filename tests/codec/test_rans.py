"""rANS coder (coder 4): exact roundtrips, model choice, deterministic tables, corrupt blobs."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from pgolf_codec import rans
from pgolf_codec.errors import FormatError

ALPHABETS = [2 ** b for b in range(1, 9)] + [3]


def _gauss_codes(rng: np.random.Generator, rows: int, row_len: int, alphabet: int,
                 widths: np.ndarray) -> np.ndarray:
    """Codes around the symmetric center with per-row standard deviation ``widths`` (codes)."""
    c2 = rans.default_center2(alphabet)
    q = np.round(rng.standard_normal((rows, row_len)) * widths[:, None] + c2 / 2)
    return np.clip(q, 0, alphabet - 1).astype(np.uint8)


@st.composite
def streams(draw):
    """(codes, alphabet, rows, row_len): uniform, one-symbol, bell-shaped, or mixed-width rows."""
    alphabet = draw(st.sampled_from(ALPHABETS))
    rows = draw(st.integers(1, 12))
    row_len = draw(st.integers(0, 97))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["uniform", "one", "bell", "widths"]))
    if kind == "uniform":
        codes = rng.integers(0, alphabet, (rows, row_len)).astype(np.uint8)
    elif kind == "one":
        codes = np.full((rows, row_len), draw(st.integers(0, alphabet - 1)), np.uint8)
    else:
        spread = 1.0 if kind == "bell" else 64.0
        widths = np.exp(rng.uniform(0, np.log(spread), rows)) * alphabet / 16 + 0.05
        codes = _gauss_codes(rng, rows, row_len, alphabet, widths)
    return codes, alphabet, rows, row_len


@given(streams(), st.sampled_from(["auto", "static", "parametric"]), st.sampled_from([1, 3, 8]))
def test_roundtrip_every_width(case, model, lanes):
    codes, alphabet, rows, row_len = case
    blob = rans.encode(codes, alphabet, rows, row_len, model=model, lanes=lanes)
    out = rans.decode(blob, codes.size, alphabet, rows, row_len)
    assert out.dtype == np.uint8 and out.shape == (codes.size,)
    np.testing.assert_array_equal(out, codes.ravel())


@given(st.binary(max_size=300), st.sampled_from(ALPHABETS))
def test_raw_byte_streams_roundtrip(data, alphabet):
    codes = (np.frombuffer(data, np.uint8).astype(np.int64) % alphabet).astype(np.uint8)
    blob = rans.encode(codes, alphabet)
    np.testing.assert_array_equal(rans.decode(blob, codes.size, alphabet), codes)


def test_empty_and_single_symbol_are_tiny():
    empty = rans.encode(np.zeros(0, np.uint8), 64)
    assert rans.decode(empty, 0, 64).size == 0
    one = rans.encode(np.full(100_000, 7, np.uint8), 16, lanes=8)
    # A certain symbol costs zero bits: header + 8 states, no words at all.
    assert len(one) <= 5 + 3 + 4 * 8
    np.testing.assert_array_equal(rans.decode(one, 100_000, 16), 7)


def test_static_near_entropy_and_beats_zstd():
    zstd = pytest.importorskip("zstandard")
    rng = np.random.default_rng(1)
    codes = _gauss_codes(rng, 512, 512, 64, np.full(512, 5.0))
    blob = rans.encode(codes, 64, model="static")
    h = rans.entropy_bits(codes) / 8
    assert len(blob) <= 1.01 * h                  # tables included
    assert len(blob) < len(zstd.ZstdCompressor(level=22).compress(codes.tobytes()))


def test_parametric_beats_order0_when_row_widths_differ():
    rng = np.random.default_rng(2)
    rows, row_len = 256, 1024
    widths = np.exp(rng.uniform(np.log(1.0), np.log(16.0), rows))
    codes = _gauss_codes(rng, rows, row_len, 256, widths)
    blob = rans.encode(codes, 256, rows, row_len)
    assert blob[0] == rans.PARAMETRIC
    assert len(blob) < rans.entropy_bits(codes) / 8
    np.testing.assert_array_equal(rans.decode(blob, codes.size, 256, rows, row_len), codes.ravel())


def test_auto_picks_the_smaller_model():
    rng = np.random.default_rng(3)
    # Two-peaked codes: far from any symmetric bell, so the static table must win.
    codes = np.where(rng.random((64, 256)) < 0.5, 3, 12).astype(np.uint8)
    auto = rans.encode(codes, 16, 64, 256)
    sizes = {m: len(rans.encode(codes, 16, 64, 256, model=m)) for m in ("static", "parametric")}
    assert len(auto) == min(sizes.values()) and auto[0] == rans.STATIC


def test_parametric_tables_are_valid_and_frozen():
    js = np.arange(0, 256, 17)
    for m in rans._SHAPES:
        f = rans._param_freqs(js, m, 0, 255, 254, 15)
        assert (f.sum(axis=1) == 1 << 15).all() and (f >= 1).all()
        # unimodal around the center code 127
        assert (np.diff(f[:, :128], axis=1) >= 0).all() and (np.diff(f[:, 127:], axis=1) <= 0).all()
    # Conformance vector: the integer tables are part of the format (spec/FORMAT.md, coder 4);
    # any change here changes decoded data and needs a new format version.
    blob = b"".join(rans._param_freqs(np.arange(256), m, 0, 255, 254, 15).astype("<i8").tobytes()
                    for m in rans._SHAPES)
    assert hashlib.sha256(blob).hexdigest()[:16] == FROZEN_TABLES_SHA


FROZEN_TABLES_SHA = "3db85ca6b8fdd209"


def _corruptions(blob: bytes, rng: np.random.Generator):
    yield blob[: len(blob) // 2]
    yield blob[:-1]
    yield blob + b"\x00\x00"
    yield b""
    for _ in range(60):
        b = bytearray(blob)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, len(b)))
            b[i] ^= int(rng.integers(1, 256))
        yield bytes(b)


@pytest.mark.parametrize("model", ["static", "parametric"])
def test_corrupt_blobs_raise_only_format_error(model):
    rng = np.random.default_rng(4)
    rows, row_len, alphabet = 16, 200, 32
    codes = _gauss_codes(rng, rows, row_len, alphabet, np.exp(rng.uniform(0, 2, rows)))
    blob = rans.encode(codes, alphabet, rows, row_len, model=model)
    failures = 0
    for bad in _corruptions(blob, rng):
        try:
            out = rans.decode(bad, codes.size, alphabet, rows, row_len)
        except FormatError:
            failures += 1
            continue
        # An undetected change may only ever yield codes of the right size and range.
        assert out.shape == (codes.size,) and int(out.max()) < alphabet
    assert failures >= 55          # the final-state check catches nearly every corruption


@given(st.binary(max_size=200), st.integers(0, 300), st.sampled_from(ALPHABETS))
def test_arbitrary_bytes_never_crash(blob, n, alphabet):
    try:
        out = rans.decode(blob, n, alphabet, 1, n)
    except FormatError:
        return
    assert out.shape == (n,) and (n == 0 or int(out.max()) < alphabet)


def test_bad_inputs_to_encode():
    with pytest.raises(ValueError, match="alphabet"):
        rans.encode(np.array([5], np.uint8), 4)
    with pytest.raises(ValueError, match="rows"):
        rans.encode(np.zeros(10, np.uint8), 4, 3, 3)


def test_parametric_tables_ignore_flush_to_zero_mode():
    """Tables must not depend on the CPU's denormal mode (torch can switch it on)."""
    torch = pytest.importorskip("torch")
    js = np.arange(256)
    ref = rans._param_freqs(js, 128, 0, 255, 254, 15)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        np.testing.assert_array_equal(rans._param_freqs(js, 128, 0, 255, 254, 15), ref)
    finally:
        torch.set_flush_denormal(False)


def test_registered_as_coder_4_and_chosen_by_auto():
    from pgolf_codec import coders

    assert coders.CODERS[4].name == "rans" and coders.coder_by_name("rans").id == 4
    rng = np.random.default_rng(5)
    rows, row_len = 64, 512
    codes = _gauss_codes(rng, rows, row_len, 64, np.exp(rng.uniform(0, 1.5, rows)) * 3)
    desc = coders.StreamDesc(nbytes=codes.size, alphabet=64, rows=rows, row_len=row_len)
    t, cid, blob = coders.encode_stream(codes, desc)
    assert (t, cid) == (coders.TRANSFORM_BYTES, 4)
    np.testing.assert_array_equal(coders.decode_stream(blob, t, cid, desc), codes.ravel())
    with pytest.raises(FormatError):
        coders.decode_stream(blob[:-3] + b"\x01\x02\x03", t, cid, desc)
    # Named "rans" on the bit-packed transform: no row view, coded as one row, still exact.
    t, cid, blob = coders.encode_stream(codes, desc, coder="rans")
    np.testing.assert_array_equal(coders.decode_stream(blob, t, cid, desc), codes.ravel())
