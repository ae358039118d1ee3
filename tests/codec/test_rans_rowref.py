"""rANS model kind 3 (rowref: centers predicted from the row above): roundtrips, the spec's
conformance vector checked by a separate decoder written from spec/FORMAT.md, model choice,
hostile blobs, and a whole artifact."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pgolf_codec as pc
from pgolf_codec import rans
from pgolf_codec.container import FORMAT_VERSION
from pgolf_codec.errors import BadPayload

from .rans_hostile import (ALPHABETS, arbitrary_tail_is_safe, assert_roundtrip, corruption_failures,
                           mutated_prefix_fails_cleanly)



def _chained_codes(rng: np.random.Generator, rows: int, row_len: int, alphabet: int,
                   rho: float, noise: float) -> np.ndarray:
    """Rows that follow the row above: ``x_r = z + rho·(x_(r-1) - z) + N(0, noise)``, clipped."""
    z = rans.default_center2(alphabet) / 2
    x = np.empty((rows, row_len))
    x[0] = z + rng.standard_normal(row_len) * alphabet / 6
    for r in range(1, rows):
        x[r] = z + rho * (x[r - 1] - z) + rng.standard_normal(row_len) * noise
    return np.clip(np.round(x), 0, alphabet - 1).astype(np.uint8)


@st.composite
def tensors(draw):
    """(codes (rows, row_len), alphabet): uncorrelated and row-correlated, rows and row_len down to 1."""
    alphabet = draw(st.sampled_from(ALPHABETS))
    rows = draw(st.integers(1, 12))
    row_len = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["uniform", "one", "copies", "chained", "extremes"]))
    if kind == "uniform":                      # all symbols equally likely, rows unrelated
        return rng.integers(0, alphabet, (rows, row_len)).astype(np.uint8), alphabet
    if kind == "one":                          # one symbol everywhere
        return np.full((rows, row_len), draw(st.integers(0, alphabet - 1)), np.uint8), alphabet
    if kind == "copies":                       # every row the row above (up to a few changes)
        codes = np.repeat(rng.integers(0, alphabet, (1, row_len)), rows, 0).astype(np.uint8)
        codes.ravel()[rng.integers(0, codes.size, codes.size // 8)] = rng.integers(0, alphabet)
        return codes, alphabet
    if kind == "extremes":                     # only 0 and alphabet - 1: the widest residuals
        return (rng.integers(0, 2, (rows, row_len)) * (alphabet - 1)).astype(np.uint8), alphabet
    rho = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    return _chained_codes(rng, rows, row_len, alphabet, rho, alphabet / 40 + 0.3), alphabet


@given(tensors(), st.sampled_from(["rowref", "auto"]), st.sampled_from([1, 3, 8]))
def test_rowref_roundtrip(case, model, lanes):
    codes, alphabet = case
    assert_roundtrip(codes, alphabet, model, lanes, rans.ROWREF)


def test_empty_tensor_falls_back_to_static():
    blob = rans.encode(np.zeros((0, 5), np.uint8), 16, 0, 5, model="rowref")
    assert blob[0] == rans.STATIC and rans.decode(blob, 0, 16, 0, 5).size == 0


def test_rowref_needs_room_for_the_residuals():
    codes = np.array([[0, 255], [255, 0]], np.uint8)     # D = 255: 511 residuals > 2^8
    with pytest.raises(ValueError, match="rowref"):
        rans.encode(codes, 256, 2, 2, model="rowref", prob_bits=8)
    assert rans.encode(codes, 256, 2, 2, prob_bits=8)[0] != rans.ROWREF   # auto skips it


# ----------------------------------------------------------------------------- the spec's vector

SPEC_CODES = np.array([[8, 5, 7, 8, 5, 7],
                       [9, 6, 9, 9, 7, 9],
                       [10, 5, 11, 11, 8, 10]], np.uint8)
SPEC_BLOB = bytes.fromhex("030f02050b07800c0008014e5056555504071b001000080100065600000055005504071b00"
                          "fe536400290d53007adf1a30")


class _SpecReader:
    """A decoder written from spec/FORMAT.md "Coder 4: rANS" alone (pure Python floats and ints)."""

    ROOTS = (1.0, 1.0905077326652577, 1.189207115002721, 1.2968395546510096,
             1.4142135623730951, 1.5422108254079407, 1.681792830507429, 1.8340080864093424)

    def __init__(self, blob: bytes):
        self.b, self.pos = blob, 0

    def u8(self) -> int:
        self.pos += 1
        return self.b[self.pos - 1]

    def varint(self) -> int:
        v, k = 0, 0
        while True:
            byte = self.u8()
            v |= (byte & 0x7F) << (7 * k)
            k += 1
            if byte < 0x80:
                return v

    @classmethod
    def table(cls, j: int, m: int, lo: int, hi: int, center2: int, P: int) -> list[int]:
        """Steps 1-5 of "Parametric tables", in binary64."""
        k = j - 64
        a2 = math.ldexp(cls.ROOTS[k % 8], k // 8)
        b = []
        for c in range(lo, hi + 1):
            d = (2 * c - center2) * 0.5
            b.append(1.0 + (d * d) / (m * a2))
        bmin = min(b)
        p = []
        for bc in b:
            r, x = bmin / bc, 1.0
            for bit in bin(m)[2:]:
                x = x * x
                if bit == "1":
                    x = x * r
            p.append(0.0 if x < 2.0 ** -1000 else x)
        S = 0.0
        for x in p:
            S = S + x
        M, A = 1 << P, hi - lo + 1
        v = [(x * (M - A)) / S for x in p]
        f = [math.floor(x) + 1 for x in v]
        left = M - sum(f)
        for c in sorted(range(A), key=lambda c: (-(v[c] - math.floor(v[c])), c))[:left]:
            f[c] += 1
        return f

    @staticmethod
    def run(tables: list[list[int]], table_of, P: int, K: int, states: list[int],
            words: list[int], n: int, emit) -> None:
        """The decoding loop; ``table_of(i)`` is position i's table, ``emit(i, s)`` takes its symbol."""
        M, pos, x = 1 << P, 0, list(states)
        for i in range(n):
            f = tables[table_of(i)]
            slot = x[i % K] % M
            s, cum = 0, 0
            while cum + f[s] <= slot:
                cum += f[s]
                s += 1
            v = f[s] * (x[i % K] // M) + slot - cum
            if v < 1 << 16:
                v = v * 65536 + words[pos]
                pos += 1
            x[i % K] = v
            emit(i, s)
        assert pos == len(words) and all(v == 1 << 16 for v in x)

    def static(self, end: int, n: int) -> list[int]:
        """A nested kind-0 blob ending at ``end``."""
        kind, P, K, lo, hi = (self.u8() for _ in range(5))
        assert kind == 0
        freq = [self.varint() for _ in range(hi - lo + 1)]
        assert sum(freq) == 1 << P
        states = list(struct.unpack_from(f"<{K}I", self.b, self.pos))
        self.pos += 4 * K
        words = list(struct.unpack_from(f"<{(end - self.pos) // 2}H", self.b, self.pos))
        self.pos = end
        out = [0] * n
        self.run([freq], lambda i: 0, P, K, states, words, n, lambda i, s: out.__setitem__(i, s + lo))
        return out

    def rowref(self, rows: int, row_len: int) -> list[list[int]]:
        kind, P, K, lo, hi, z, m = (self.u8() for _ in range(7))
        assert kind == 3 and lo <= z <= hi and m >= 1
        n_w = self.varint()
        widths = self.static(self.pos + n_w, rows)
        n_r = self.varint()
        rho = self.static(self.pos + n_r, rows)
        assert rho[0] == 0 and max(rho) <= 8
        D = hi - lo
        tables = {j: self.table(j, m, 0, 2 * D, 2 * D, P) for j in set(widths)}
        states = list(struct.unpack_from(f"<{K}I", self.b, self.pos))
        self.pos += 4 * K
        words = list(struct.unpack_from(f"<{(len(self.b) - self.pos) // 2}H", self.b, self.pos))
        out = [[0] * row_len for _ in range(rows)]

        def emit(i: int, u: int) -> None:
            r, c = divmod(i, row_len)
            a = out[r - 1][c] if r else z
            center = z + ((rho[r] * (a - z) + 4) >> 3)      # Python >> floors, as the spec's
            x = u + center - D
            assert lo <= x <= hi
            out[r][c] = x

        self.run([tables[j] for j in widths], lambda i: i // row_len, P, K, states, words,
                 rows * row_len, emit)
        return out


def test_conformance_vector_of_the_spec():
    rows, row_len = SPEC_CODES.shape
    assert rans.encode(SPEC_CODES, 16, rows, row_len, model="rowref", lanes=2) == SPEC_BLOB
    np.testing.assert_array_equal(rans.decode(SPEC_BLOB, SPEC_CODES.size, 16, rows, row_len),
                                  SPEC_CODES.ravel())
    assert _SpecReader(SPEC_BLOB).rowref(rows, row_len) == SPEC_CODES.tolist()
    # the vector exercises the floor rule on negative products and both lanes
    rho, _ = rans._rowref_predict(SPEC_CODES.astype(np.int64), 7)
    assert rho.tolist() == [0, 4, 6] and (SPEC_CODES[:-1].astype(int) - 7 < 0).any()
    spec = (pc.__file__.rsplit("/", 2)[0] + "/spec/FORMAT.md")
    assert SPEC_BLOB.hex() in open(spec, encoding="utf-8").read().replace("\n", "")


@settings(max_examples=40, deadline=None)
@given(tensors(), st.sampled_from([1, 2, 5]))
def test_spec_reader_agrees_with_the_codec(case, lanes):
    codes, alphabet = case
    rows, row_len = codes.shape
    blob = rans.encode(codes, alphabet, rows, row_len, model="rowref", lanes=lanes)
    assert _SpecReader(blob).rowref(rows, row_len) == codes.tolist()


def test_rounding_rule_in_numpy_and_numba_matches_python():
    # center = z + ((ρ8·(a - z) + 4) >> 3) for every ρ8, a, z of int8: the encoder (numpy) and
    # the decoder kernel (numba) floor exactly like Python's >>.
    a = np.arange(256, dtype=np.int64)
    for z in (0, 1, 127, 200, 255):
        for k in range(9):
            want = [z + ((k * (int(v) - z) + 4) >> 3) for v in a]
            above = np.vstack([np.full(256, z), a])
            got = rans._rowref_residuals(np.vstack([a, np.full(256, z)]), z,
                                         np.array([0, k], np.uint8), 0, 255)[1]
            # x - center + D with x = z: center = z + D - u
            assert (z + 255 - got).tolist() == want, (z, k)
            assert (np.minimum(above[1], z) <= want).all() and (want <= np.maximum(above[1], z)).all()


# ----------------------------------------------------------------------------- model choice

def test_auto_picks_rowref_on_row_correlated_codes_only():
    rng = np.random.default_rng(0)
    rows, row_len, alphabet = 512, 128, 256
    chained = _chained_codes(rng, rows, row_len, alphabet, 1.0, 3.0)
    sizes = {m: len(rans.encode(chained, alphabet, rows, row_len, model=m))
             for m in ("static", "parametric", "column", "rowref")}
    assert sizes["rowref"] < 0.8 * min(sizes["static"], sizes["parametric"], sizes["column"])
    auto = rans.encode(chained, alphabet, rows, row_len)
    assert auto[0] == rans.ROWREF and len(auto) == sizes["rowref"]
    np.testing.assert_array_equal(rans.decode(auto, chained.size, alphabet, rows, row_len),
                                  chained.ravel())
    # i.i.d. rows: the screen's estimate is estimator noise, far below the threshold
    iid = _chained_codes(rng, rows, row_len, alphabet, 0.0, 20.0)
    _, gain = rans._rowref_predict(iid.astype(np.int64), 127)
    assert gain < rans._ROWREF_MIN_GAIN * rows / 4
    assert rans.encode(iid, alphabet, rows, row_len)[0] != rans.ROWREF
    # weakly correlated rows that the screen lets through still only win where smaller
    weak = _chained_codes(rng, rows, row_len, 64, 0.3, 4.0)
    blob = rans.encode(weak, 64, rows, row_len)
    others = min(len(rans.encode(weak, 64, rows, row_len, model=m)) for m in ("static", "parametric"))
    assert len(blob) <= others and (blob[0] != rans.ROWREF or
                                    len(blob) < others)


# ----------------------------------------------------------------------------- hostile blobs

def _rowref_blob(seed: int = 3, rows: int = 24, row_len: int = 40, alphabet: int = 32):
    codes = _chained_codes(np.random.default_rng(seed), rows, row_len, alphabet, 0.8, 1.5)
    return codes, rans.encode(codes, alphabet, rows, row_len, model="rowref", lanes=4), alphabet


def test_every_truncation_and_byte_flip_fails_cleanly():
    codes, blob, alphabet = _rowref_blob()
    assert blob[0] == rans.ROWREF
    assert corruption_failures(blob, codes, alphabet, trials=200) >= 185


def _handmade(widths, rho, alphabet: int, z: int, lo: int = 0, hi: int | None = None,
              m: int = 4, P: int = 15) -> bytes:
    """A kind-3 blob with the given row bytes and a zero-length word stream (1 state)."""
    hi = alphabet - 1 if hi is None else hi
    w = rans._encode_static(np.asarray(widths, np.uint8), 256, 15, 1)
    r = rans._encode_static(np.asarray(rho, np.uint8), 256, 15, 1)
    return (bytes([rans.ROWREF, P, 1, lo, hi, z, m]) + rans._varint(len(w)) + w
            + rans._varint(len(r)) + r + (1 << 16).to_bytes(4, "little"))


@pytest.mark.parametrize("kw,match", [
    (dict(widths=[64, 64], rho=[0, 9], z=7), "prediction"),          # ρ8 > 8
    (dict(widths=[64, 64], rho=[1, 0], z=7), "prediction"),          # row 0 has a reference
    (dict(widths=[64, 64], rho=[0, 0], z=12, lo=2, hi=10), "center"),  # z outside [lo, hi]
    (dict(widths=[64, 64], rho=[0, 0], z=7, m=0), "shape"),
    (dict(widths=[64, 64], rho=[0, 0], z=7, P=8, alphabet=256), "fit"),  # 511 residuals > 2^8
    (dict(widths=[64], rho=[0], z=7), "truncated|trailing|rANS"),    # one width for two rows
])
def test_hostile_rowref_fields_are_rejected(kw, match):
    kw = {"alphabet": 16, **kw}
    blob = _handmade(**kw)
    with pytest.raises(BadPayload, match=match):
        rans.decode(blob, 2 * 3, kw["alphabet"], 2, 3)


@given(st.binary(max_size=160), st.integers(0, 60), st.sampled_from(ALPHABETS))
def test_arbitrary_kind3_bytes_never_crash(tail, n, alphabet):
    arbitrary_tail_is_safe(rans.ROWREF, tail, n, alphabet)


@given(st.integers(0, 2 ** 32 - 1))
@settings(max_examples=60)
def test_mutated_kind3_blobs_never_crash(seed):
    codes, blob, alphabet = _rowref_blob(seed % 7, rows=6, row_len=9, alphabet=256)
    mutated_prefix_fails_cleanly(blob, codes, alphabet, seed)


def test_a_reader_without_kind_3_rejects_it_as_unknown(monkeypatch):
    # a 1.1 reader knows kinds 0-2 only: the same "unknown model kind" rejection
    _, blob, alphabet = _rowref_blob()
    monkeypatch.setattr(rans, "MODEL_NAMES", {k: v for k, v in rans.MODEL_NAMES.items()
                                              if k != rans.ROWREF})
    with pytest.raises(BadPayload, match="unknown model kind 3"):
        rans.decode(blob, 24 * 40, alphabet, 24, 40)


# ----------------------------------------------------------------------------- whole artifact

def test_artifact_with_a_rowref_tensor_roundtrips():
    # an embedding-like matrix whose rows repeat the row before (up to small changes)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    steps = torch.randn(300, 64, generator=g) * 0.03
    w = base + torch.cumsum(steps, 0) * 0.2
    tensors = {"emb": w, "b": torch.randn(8, generator=g)}
    data, info = pc.build_artifact(tensors, "emb=int8;*=fp32", coder="auto")
    assert data[5] == 3 and FORMAT_VERSION == "1.3"
    (wrote,) = [t for t in info.tensors if t["name"] == "emb"]
    assert wrote["coder"] == "rans" and wrote["rans_model"] == "rowref"
    art = pc.read_artifact_bytes(data)
    read = {t["name"]: t for t in art.info.tensors}
    assert read["emb"]["rans_model"] == "rowref" and art.info.format_version == "1.3"
    assert torch.equal(art.tensors["emb"], pc.fake_quant(w, pc.QuantSpec.parse("int8")))
