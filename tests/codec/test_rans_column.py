"""rANS model kind 2 (per-column width and center): roundtrips, model choice, frozen tables, hostile blobs."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from pgolf_codec import rans
from pgolf_codec.errors import BadPayload

from .rans_hostile import ALPHABETS, arbitrary_tail_is_safe, assert_roundtrip, corruption_failures



def _column_codes(rng: np.random.Generator, rows: int, row_len: int, alphabet: int,
                  widths: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Gaussian codes, column ``c`` with std ``widths[c]`` around ``centers[c]`` (codes)."""
    q = np.round(rng.standard_normal((rows, row_len)) * widths + centers)
    return np.clip(q, 0, alphabet - 1).astype(np.uint8)


@st.composite
def tensors(draw):
    """(codes (rows, row_len), alphabet): every kind of column, rows and row_len down to 1."""
    alphabet = draw(st.sampled_from(ALPHABETS))
    rows = draw(st.integers(1, 12))
    row_len = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["uniform", "one", "constant_columns", "columns"]))
    if kind == "uniform":                      # all symbols equally likely
        return rng.integers(0, alphabet, (rows, row_len)).astype(np.uint8), alphabet
    if kind == "one":                          # one symbol everywhere
        return np.full((rows, row_len), draw(st.integers(0, alphabet - 1)), np.uint8), alphabet
    centers = rng.uniform(0, alphabet - 1, row_len)
    if kind == "constant_columns":             # every column constant, columns differ
        return np.repeat(np.round(centers)[None, :], rows, 0).astype(np.uint8), alphabet
    widths = np.exp(rng.uniform(-2, np.log(alphabet / 4 + 1), row_len))
    return _column_codes(rng, rows, row_len, alphabet, widths, centers), alphabet


@given(tensors(), st.sampled_from(["column", "auto"]), st.sampled_from([1, 3, 8]))
def test_column_roundtrip(case, model, lanes):
    codes, alphabet = case
    assert_roundtrip(codes, alphabet, model, lanes, rans.COLUMN)


def test_empty_tensor_falls_back_to_static():
    blob = rans.encode(np.zeros((0, 5), np.uint8), 16, 0, 5, model="column")
    assert blob[0] == rans.STATIC and rans.decode(blob, 0, 16, 0, 5).size == 0


def test_column_model_wins_on_column_structure():
    rng = np.random.default_rng(0)
    rows, row_len, alphabet = 256, 512, 64
    widths = np.exp(rng.uniform(np.log(0.7), np.log(8.0), row_len))
    centers = 31 + rng.normal(0, 3, row_len)
    codes = _column_codes(rng, rows, row_len, alphabet, widths, centers)
    sizes = {m: len(rans.encode(codes, alphabet, rows, row_len, model=m))
             for m in ("static", "parametric", "column")}
    assert sizes["column"] < 0.85 * min(sizes["static"], sizes["parametric"])
    assert sizes["column"] < rans.entropy_bits(codes) / 8       # side information included
    auto = rans.encode(codes, alphabet, rows, row_len)
    assert auto[0] == rans.COLUMN and len(auto) == sizes["column"]
    np.testing.assert_array_equal(rans.decode(auto, codes.size, alphabet, rows, row_len), codes.ravel())
    # The same tensor transposed has the structure along rows: a row model takes it (kind 3,
    # whose prediction from the row above also moves the centers of off-center rows, codes it
    # ~1 % smaller than kind 1; kind 4, which first chains rows of similar centers together,
    # ~6 % smaller), and "auto" gives up on the column model after its coarse fit.
    t = np.ascontiguousarray(codes.T)
    assert rans.encode(t, alphabet, row_len, rows)[0] in (rans.PARAMETRIC, rans.ROWREF, rans.ROWPERM)
    row_blob = rans.encode(t, alphabet, row_len, rows, model="parametric")
    assert rans._encode_column(t.ravel(), alphabet, row_len, rows, 15, 8, 62, beat=len(row_blob)) is None


def test_encoder_respects_the_table_cap(monkeypatch):
    # 400 columns with scattered widths and centers want more than 256 (width, offset) pairs.
    rng = np.random.default_rng(1)
    rows, row_len = 16, 400
    widths = np.exp(rng.uniform(np.log(1.0), np.log(30.0), row_len))
    codes = _column_codes(rng, rows, row_len, 256, widths, 127 + rng.uniform(-10, 10, row_len))
    cols = np.ascontiguousarray(codes.T)

    def tables() -> int:
        m, j, delta2 = rans._fit_columns(cols, 256, int(codes.min()), int(codes.max()), 254, 14)
        return np.unique(j.astype(np.int64) * 256 + delta2).size

    assert tables() <= rans.MAX_COLUMN_TABLES
    monkeypatch.setattr(rans, "MAX_COLUMN_TABLES", 10 ** 6)
    assert tables() > 256                       # so the cap did bind above
    monkeypatch.undo()
    blob = rans.encode(codes, 256, rows, row_len, model="column")
    np.testing.assert_array_equal(rans.decode(blob, codes.size, 256, rows, row_len), codes.ravel())


def test_tables_are_deterministic_and_independent_of_column_order():
    js = np.arange(256)
    centers = (3 * js) % 511
    for m in (1, 10, 128):
        batch = rans._param_freqs(js, m, 0, 255, centers, 15)
        single = np.stack([rans._param_freqs(js[i:i + 1], m, 0, 255, int(centers[i]), 15)[0]
                           for i in range(0, 256, 15)])
        np.testing.assert_array_equal(batch[::15], single)   # a table ignores its batch
        assert (batch.sum(axis=1) == 1 << 15).all() and (batch >= 1).all()
    # Conformance vector (spec/FORMAT.md, coder 4): one center per table, as kind 2 uses them.
    blob = b"".join(rans._param_freqs(js, m, 0, 255, centers, 15).astype("<i8").tobytes()
                    for m in rans._SHAPES)
    assert hashlib.sha256(blob).hexdigest()[:16] == "76034cd63ffddc85"
    # Permuting the columns permutes the column → table map and nothing else.
    rng = np.random.default_rng(2)
    jcol = rng.integers(40, 90, 300).astype(np.uint8)
    zcol = rng.integers(0, 9, 300).astype(np.uint8)
    freq, table, order = rans._column_model(jcol, zcol, 6, 3, 60, 62, 15)
    perm = rng.permutation(300)
    freq_p, table_p, order_p = rans._column_model(jcol[perm], zcol[perm], 6, 3, 60, 62, 15)
    np.testing.assert_array_equal(freq, freq_p)
    np.testing.assert_array_equal(table[perm], table_p)
    assert (np.diff(table_p[order_p]) >= 0).all()            # coded grouped by table


def _column_blob(seed: int = 3, rows: int = 24, row_len: int = 40, alphabet: int = 32):
    rng = np.random.default_rng(seed)
    widths = np.exp(rng.uniform(0, 2, row_len))
    codes = _column_codes(rng, rows, row_len, alphabet, widths, 15 + rng.normal(0, 3, row_len))
    blob = rans.encode(codes, alphabet, rows, row_len, model="column", lanes=4)
    return codes, blob, alphabet


def test_every_truncation_and_byte_flip_fails_cleanly():
    codes, blob, alphabet = _column_blob()
    assert corruption_failures(blob, codes, alphabet, trials=150) >= 140


def _handmade(jcol, zcol, alphabet: int, center2: int, rows: int, m: int = 4) -> bytes:
    """A kind-2 blob with the given column bytes and a zero-length word stream (8 states)."""
    w = rans._encode_static(np.asarray(jcol, np.uint8), 256, 15, 1)
    o = rans._encode_static(np.asarray(zcol, np.uint8), 256, 15, 1)
    return (bytes([rans.COLUMN, 15, 1, 0, alphabet - 1]) + center2.to_bytes(2, "little") + bytes([m])
            + rans._varint(len(w)) + w + rans._varint(len(o)) + o + (1 << 16).to_bytes(4, "little"))


@pytest.mark.parametrize("jcol,zcol,center2,match", [
    (np.arange(300) % 256, np.arange(300) // 256, 14, "column tables"),    # 300 distinct pairs
    ([64, 64], [0, 40], 14, "outside the alphabet"),                       # 14 + 20 > 30
    ([64, 64], [0, 29], 14, "outside the alphabet"),                       # 14 - 15 < 0
])
def test_hostile_column_fields_are_rejected(jcol, zcol, center2, match):
    blob = _handmade(jcol, zcol, 16, center2, rows=1)
    with pytest.raises(BadPayload, match=match):
        rans.decode(blob, len(jcol), 16, 1, len(jcol))


def test_side_blobs_must_be_exact():
    codes, blob, alphabet = _column_blob()
    rows, row_len = codes.shape
    # The widths and offsets count row_len symbols: another view of the same n must fail.
    with pytest.raises(BadPayload):
        rans.decode(blob, codes.size, alphabet, row_len, rows)
    w = rans._encode_static(np.full(row_len, 64, np.uint8), 256, 15, 1)
    head = bytes([rans.COLUMN, 15, 1, 0, alphabet - 1]) + (30).to_bytes(2, "little") + b"\x04"
    with pytest.raises(BadPayload, match="trailing"):                     # junk inside the block
        rans.decode(head + rans._varint(len(w) + 2) + w + b"\x00\x00", codes.size, alphabet,
                    rows, row_len)
    with pytest.raises(BadPayload, match="truncated"):
        rans.decode(head + rans._varint(1000) + w, codes.size, alphabet, rows, row_len)


@given(st.binary(max_size=120), st.integers(0, 60), st.sampled_from(ALPHABETS))
def test_arbitrary_kind2_bytes_never_crash(tail, n, alphabet):
    arbitrary_tail_is_safe(rans.COLUMN, tail, n, alphabet)


def test_auto_screens_out_columns_without_structure():
    # The Gaussian gain estimate separates column structure (tens of bits per column) from
    # none (about one bit: estimator noise), so "auto" skips the fit where it cannot win.
    rng = np.random.default_rng(3)
    rows, row_len = 256, 64
    iid = _column_codes(rng, rows, row_len, 64, np.full(row_len, 4.0), np.full(row_len, 31.0))
    shaped = _column_codes(rng, rows, row_len, 64, np.exp(rng.uniform(-1, 2.5, row_len)),
                           rng.uniform(20, 42, row_len))
    assert rans._column_gain_bits(iid, rows, row_len) < rans._COLUMN_MIN_GAIN * row_len
    assert rans._column_gain_bits(shaped, rows, row_len) > 10 * rans._COLUMN_MIN_GAIN * row_len
    assert rans.encode(shaped, 64, rows, row_len)[0] == rans.COLUMN
    # too few rows for per-column statistics: auto never tries the column model
    short = np.ascontiguousarray(shaped[:rans._COLUMN_MIN_ROWS - 1])
    assert rans.encode(short, 64, len(short), row_len)[0] != rans.COLUMN
