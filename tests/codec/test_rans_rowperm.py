"""rANS model kind 4 (rowperm: kind 3 over the rows in a stored order): the Lehmer-coded order,
roundtrips, the spec's conformance vector checked by a separate decoder written from
spec/FORMAT.md, model choice, hostile blobs (fuzzed), a 1.2 reader, and whole artifacts
(1.3 written, 1.2 still read)."""
from __future__ import annotations

import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pgolf_codec as pc
from pgolf_codec import rans
from pgolf_codec.container import FORMAT_VERSION
from pgolf_codec.errors import BadPayload

from tests.codec.rans_hostile import (ALPHABETS, arbitrary_tail_is_safe, assert_roundtrip, corruption_failures,
                                      mutated_prefix_fails_cleanly)
from tests.codec.test_rans_rowref import _chained_codes, _SpecReader, tensors


# ----------------------------------------------------------------------------- the row order

def _lehmer_reference(order: list[int]) -> list[int]:
    """d_k = how many rows not yet taken lie below order[k] (plain Python)."""
    left = list(range(len(order)))
    digits = []
    for v in order:
        digits.append(left.index(v))
        left.remove(v)
    return digits


def _pack_reference(digits: list[int], rows: int) -> bytes:
    bits = []
    for k, d in enumerate(digits):
        bits += [(d >> b) & 1 for b in range((rows - 1 - k).bit_length())]
    bits += [0] * (-len(bits) % 8)
    return bytes(sum(bits[i + b] << b for b in range(8)) for i in range(0, len(bits), 8))


@given(st.integers(1, 300).flatmap(lambda n: st.permutations(list(range(n)))))
def test_lehmer_pack_matches_the_plain_definition_and_inverts(order):
    rows = len(order)
    want = _pack_reference(_lehmer_reference(order), rows)
    assert len(want) == (rans._perm_bits(rows) + 7) // 8
    packed = np.zeros(len(want), np.uint8)
    rans._lehmer_pack(np.array(order, np.int64), packed)
    assert packed.tobytes() == want
    back = np.empty(rows, np.int64)
    assert rans._lehmer_unpack(packed, rows, back) == 0 and back.tolist() == list(order)


def test_perm_bits_is_the_sum_of_digit_widths():
    for rows in list(range(1, 70)) + [1000, 4096, 4097, 65536]:
        assert rans._perm_bits(rows) == sum(v.bit_length() for v in range(rows))
    # 4096 rows: 5,633 bytes, 0.44 bit a row over log2(4096!) (5,407 bytes)
    assert (rans._perm_bits(4096) + 7) // 8 == 5633
    assert 0 < rans._perm_bits(4096) - math.lgamma(4097) / math.log(2) < 0.45 * 4096


def test_chain_order_is_the_greedy_l1_chain():
    x = np.array([[8, 5, 7, 8], [3, 12, 4, 10], [9, 6, 7, 8], [3, 11, 5, 10], [8, 6, 8, 9]], np.int16)
    assert rans._chain_order(x).tolist() == [0, 2, 4, 3, 1]
    ties = np.zeros((4, 3), np.int16)                       # all distances 0: smaller index first
    assert rans._chain_order(ties).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- roundtrips

@given(tensors(), st.sampled_from(["rowperm", "auto"]), st.sampled_from([1, 3, 8]),
       st.integers(0, 2 ** 32 - 1))
def test_rowperm_roundtrip(case, model, lanes, seed):
    codes, alphabet = case
    # shuffled rows: the order the encoder has to find
    codes = codes[np.random.default_rng(seed).permutation(codes.shape[0])]
    rows, row_len = codes.shape
    if model == "rowperm" and rows < 2:
        with pytest.raises(ValueError, match="2 rows"):
            rans.encode(codes, alphabet, rows, row_len, model=model, lanes=lanes)
        return
    assert_roundtrip(codes, alphabet, model, lanes, rans.ROWPERM)


# ----------------------------------------------------------------------------- the spec's vector

SPEC_CODES = np.array([[8, 8, 8, 7, 9, 6],
                       [8, 7, 11, 9, 7, 7],
                       [6, 9, 10, 7, 8, 7],
                       [8, 9, 9, 9, 7, 6]], np.uint8)
SPEC_BLOB = bytes.fromhex("040f02060b0780080e0008014a4d4080010040400e400010000801000640000040004040001e00"
                          "01c1df2706186cf60bb28cba4b")


class _SpecReader4(_SpecReader):
    """Kind 4 from spec/FORMAT.md alone: the Lehmer-coded order, then kind 3 in that order."""

    def rowperm(self, rows: int, row_len: int) -> list[list[int]]:
        kind, P, K, lo, hi, z, m = (self.u8() for _ in range(7))
        assert kind == 4 and lo <= z <= hi and m >= 1 and rows >= 2 and row_len >= 1
        nbits = sum(v.bit_length() for v in range(rows))
        data = self.b[self.pos:self.pos + (nbits + 7) // 8]
        self.pos += (nbits + 7) // 8
        bit, left, order = 0, list(range(rows)), []
        for k in range(rows):
            d = 0
            for b in range((rows - 1 - k).bit_length()):
                d |= ((data[bit // 8] >> (bit % 8)) & 1) << b
                bit += 1
            order.append(left.pop(d))           # the d-th smallest row not yet taken
        assert all(not (data[i // 8] >> (i % 8)) & 1 for i in range(bit, 8 * len(data)))
        # the rest is a kind-3 blob body over the rows in coding order
        self.b = bytes([3, P, K, lo, hi, z, m]) + self.b[self.pos:]
        self.pos = 0
        coded = self.rowref(rows, row_len)
        out = [None] * rows
        for k, r in enumerate(order):
            out[r] = coded[k]
        return out


def test_conformance_vector_of_the_spec():
    rows, row_len = SPEC_CODES.shape
    assert rans.encode(SPEC_CODES, 16, rows, row_len, model="rowperm", lanes=2) == SPEC_BLOB
    np.testing.assert_array_equal(rans.decode(SPEC_BLOB, SPEC_CODES.size, 16, rows, row_len),
                                  SPEC_CODES.ravel())
    assert _SpecReader4(SPEC_BLOB).rowperm(rows, row_len) == SPEC_CODES.tolist()
    # a non-trivial order (digits 0, 2, 0, 0: byte 0x08) and predictions in coding order
    order = rans._chain_order(SPEC_CODES.astype(np.int16))
    assert order.tolist() == [0, 3, 1, 2] and SPEC_BLOB[7] == 0x08
    rho, _ = rans._rowref_predict(SPEC_CODES[order].astype(np.int64), 7)
    assert rho.tolist() == [0, 5, 6, 3]
    spec = (pc.__file__.rsplit("/", 2)[0] + "/spec/FORMAT.md")
    assert SPEC_BLOB.hex() in open(spec, encoding="utf-8").read().replace("\n", "")


@settings(max_examples=40, deadline=None)
@given(tensors(), st.sampled_from([1, 2, 5]), st.integers(0, 2 ** 32 - 1))
def test_spec_reader_agrees_with_the_codec(case, lanes, seed):
    codes, alphabet = case
    codes = codes[np.random.default_rng(seed).permutation(codes.shape[0])]
    rows, row_len = codes.shape
    if rows < 2:
        return
    blob = rans.encode(codes, alphabet, rows, row_len, model="rowperm", lanes=lanes)
    assert _SpecReader4(blob).rowperm(rows, row_len) == codes.tolist()


# ----------------------------------------------------------------------------- model choice

def _half_shuffled(rng: np.random.Generator, rows: int = 512, row_len: int = 128) -> np.ndarray:
    """A chain of rows whose second half is shuffled: kind 3's screen passes on the first half,
    and only a stored order recovers the second."""
    codes = _chained_codes(rng, rows, row_len, 256, 1.0, 3.0)
    codes[rows // 2:] = codes[rows // 2:][rng.permutation(rows - rows // 2)]
    return codes


def test_auto_picks_rowperm_only_where_smaller():
    rng = np.random.default_rng(0)
    codes = _half_shuffled(rng)
    rows, row_len = codes.shape
    sizes = {m: len(rans.encode(codes, 256, rows, row_len, model=m))
             for m in ("static", "parametric", "rowref", "rowperm")}
    assert sizes["rowperm"] < 0.9 * sizes["rowref"]
    auto = rans.encode(codes, 256, rows, row_len)
    assert auto[0] == rans.ROWPERM and len(auto) == sizes["rowperm"]
    np.testing.assert_array_equal(rans.decode(auto, codes.size, 256, rows, row_len), codes.ravel())
    # rows already in chain order: kind 3 needs no stored order, and auto keeps kind 3
    chained = _chained_codes(rng, rows, row_len, 256, 1.0, 3.0)
    assert rans.encode(chained, 256, rows, row_len)[0] == rans.ROWREF
    # i.i.d. rows: kind 3's screen fails, so kind 4 is not even fitted
    iid = _chained_codes(rng, rows, row_len, 256, 0.0, 20.0)
    assert rans.encode(iid, 256, rows, row_len)[0] not in (rans.ROWREF, rans.ROWPERM)


def test_auto_skips_rowperm_above_its_row_cap(monkeypatch):
    codes = _half_shuffled(np.random.default_rng(1), rows=64, row_len=64)
    assert rans.encode(codes, 256, 64, 64)[0] == rans.ROWPERM
    monkeypatch.setattr(rans, "_ROWPERM_MAX_ROWS", 63)
    assert rans.encode(codes, 256, 64, 64)[0] != rans.ROWPERM


# ----------------------------------------------------------------------------- hostile blobs

def _rowperm_blob(seed: int = 3, rows: int = 24, row_len: int = 40, alphabet: int = 32):
    rng = np.random.default_rng(seed)
    codes = _chained_codes(rng, rows, row_len, alphabet, 0.8, 1.5)[rng.permutation(rows)]
    return codes, rans.encode(codes, alphabet, rows, row_len, model="rowperm", lanes=4), alphabet


def test_every_truncation_and_byte_flip_fails_cleanly():
    codes, blob, alphabet = _rowperm_blob()
    assert blob[0] == rans.ROWPERM
    # a flipped order digit can still name a valid (other) order: the stream then decodes to
    # other rows only if its states happen to come out right, which they nearly never do
    assert corruption_failures(blob, codes, alphabet, trials=200) >= 185


def _handmade(perm: bytes, rows: int, alphabet: int = 16, z: int = 7) -> bytes:
    """A kind-4 blob with the given order bytes, flat rows and a zero-length word stream."""
    w = rans._encode_static(np.full(rows, 64, np.uint8), 256, 15, 1)
    r = rans._encode_static(np.zeros(rows, np.uint8), 256, 15, 1)
    return (bytes([rans.ROWPERM, 15, 1, 0, alphabet - 1, z, 4]) + perm + rans._varint(len(w)) + w
            + rans._varint(len(r)) + r + (1 << 16).to_bytes(4, "little"))


def test_hostile_row_orders_are_rejected():
    # 3 rows: digit widths 2, 1, 0 → 3 bits; d_0 ≤ 2, d_1 ≤ 1
    for perm, match in [(bytes([0b011]), "names no row"),          # d_0 = 3: only 3 rows
                        (bytes([0b1000]), "padding")]:             # a bit past the 3 order bits
        with pytest.raises(BadPayload, match=match):
            rans.decode(_handmade(perm, 3), 3 * 2, 16, 3, 2)
    with pytest.raises(BadPayload, match="truncated reading row order"):
        rans.decode(_handmade(b"", 3)[:7], 3 * 2, 16, 3, 2)
    with pytest.raises(BadPayload, match="word stream"):      # a valid order: fails only later
        rans.decode(_handmade(bytes([0b010]), 3), 3 * 2, 16, 3, 2)
    with pytest.raises(BadPayload, match="at least 2 rows"):
        rans.decode(_handmade(b"", 1), 5, 16, 1, 5)
    with pytest.raises(BadPayload, match="at least 2 rows"):     # rows declared, no codes
        rans.decode(_handmade(b"\x00", 3), 0, 16, 3, 0)


def test_a_huge_declared_order_fails_before_allocating():
    # 2^26 rows would need ~208 MB of order bits: a 9-byte blob is rejected at once
    t = time.perf_counter()
    with pytest.raises(BadPayload, match="truncated"):
        rans.decode(bytes([rans.ROWPERM, 15, 1, 0, 15, 7, 4, 0, 0]), 1 << 27, 16, 1 << 26, 2)
    assert time.perf_counter() - t < 1.0


@given(st.binary(max_size=160), st.integers(0, 60), st.sampled_from(ALPHABETS))
def test_arbitrary_kind4_bytes_never_crash(tail, n, alphabet):
    arbitrary_tail_is_safe(rans.ROWPERM, tail, n, alphabet)


@given(st.integers(0, 2 ** 32 - 1))
@settings(max_examples=100)
def test_mutated_kind4_blobs_never_crash(seed):
    codes, blob, alphabet = _rowperm_blob(seed % 7, rows=6, row_len=9, alphabet=256)
    mutated_prefix_fails_cleanly(blob, codes, alphabet, seed)


def test_a_reader_without_kind_4_rejects_it_as_unknown(monkeypatch):
    # a 1.2 reader knows kinds 0-3 only: the same "unknown model kind" rejection
    codes, blob, alphabet = _rowperm_blob()
    monkeypatch.setattr(rans, "MODEL_NAMES", {k: v for k, v in rans.MODEL_NAMES.items()
                                              if k != rans.ROWPERM})
    with pytest.raises(BadPayload, match="unknown model kind 4"):
        rans.decode(blob, codes.size, alphabet, *codes.shape)


# ----------------------------------------------------------------------------- whole artifacts

def _embedding(rows: int = 300, dim: int = 64) -> torch.Tensor:
    """Rows that follow a random walk, stored in a shuffled order except the first 100."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, dim, generator=g) + torch.cumsum(torch.randn(rows, dim, generator=g) * 0.03, 0) * 0.2
    perm = torch.cat([torch.arange(100), 100 + torch.randperm(rows - 100, generator=g)])
    return w[perm]


def test_artifact_with_a_rowperm_tensor_roundtrips():
    w = _embedding()
    tensors = {"emb": w, "b": torch.randn(8)}
    data, info = pc.build_artifact(tensors, "emb=int8;*=fp32", coder="auto")
    assert data[5] == 3 and FORMAT_VERSION == "1.3"
    (wrote,) = [t for t in info.tensors if t["name"] == "emb"]
    assert wrote["coder"] == "rans" and wrote["rans_model"] == "rowperm"
    art = pc.read_artifact_bytes(data)
    assert {t["name"]: t for t in art.info.tensors}["emb"]["rans_model"] == "rowperm"
    assert art.info.format_version == "1.3"
    assert torch.equal(art.tensors["emb"], pc.fake_quant(w, pc.QuantSpec.parse("int8")))


def _with_minor(data: bytes, minor: int) -> bytes:
    body = bytearray(data[:-4])
    body[5] = minor
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_files_of_older_minors_still_read():
    # a writer of 1.0-1.2 wrote the same bytes except the minor (kinds 0-3 are unchanged)
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(64, 32, generator=g), "emb": _embedding()[:100]}
    data, _ = pc.build_artifact(tensors, "a=int6;emb=int8", coder="auto")
    assert {t.get("rans_model") for t in pc.read_artifact_bytes(data).info.tensors} <= {
        None, "static", "row", "column", "rowref"}
    want = pc.read_artifact_bytes(data).tensors
    for minor in (0, 1, 2):
        old = pc.read_artifact_bytes(_with_minor(data, minor))
        assert old.info.format_version == f"1.{minor}"
        assert all(torch.equal(old.tensors[k], want[k]) for k in want)


def test_fuzzed_artifacts_with_a_rowperm_tensor_only_raise_format_error():
    from tests.codec.test_fuzz import _check as check_artifact, _mutate_payload, _split

    data, _ = pc.build_artifact({"emb": _embedding(), "b": torch.ones(3)}, "emb=int8;*=fp16", coder="rans")
    assert {t["name"]: t for t in pc.read_artifact_bytes(data).info.tensors}["emb"]["rans_model"] == "rowperm"
    assert check_artifact(data) == "ok"
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(400):      # stream edits with the tensor and file CRCs repaired: they reach the coder
        header, payload = _split(data)
        outcomes.add(check_artifact(_mutate_payload(rng, header, payload)))
    assert "BadPayload" in outcomes and outcomes <= {"ok", "BadPayload"}
