"""Reader rules stated in spec/FORMAT.md that a reader written from the spec alone had to
guess: scheme strings, name order, code-file names, scale floor, zstd frames, coder 4 on
non-code streams, rANS varints, check order, and the scope of a forced coder."""
from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch

import pgolf_codec as pc
from pgolf_codec import rans
from pgolf_codec.coders import StreamDesc, decode_stream

zstandard = pytest.importorskip("zstandard")
STREAMS = ("codes", "scales", "zeros")


def _split(data: bytes):
    _, _, _, hc, _, hlen, _ = struct.unpack_from("<4sBBBBII", data)
    stored = data[16:16 + hlen]
    raw = zstandard.ZstdDecompressor().decompress(stored) if hc == 1 else stored
    return msgpack.unpackb(raw), data[16 + hlen:-4]


def _join(header: dict, payload: bytes, raw_header: bytes | None = None, hcoding: int = 0, hraw: int = 0) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True) if raw_header is None else raw_header
    body = struct.pack("<4sBBBBII", b"PGLF", 1, 1, hcoding, 0, len(raw), hraw or len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _blobs(header: dict, payload: bytes) -> tuple[list[dict], bytes]:
    """Per tensor {stream: [transform, coder, blob]}, and the coded code section."""
    out = []
    for e in header["tensors"]:
        pos, d = e["offset"], {}
        for k in STREAMS:
            if k in e:
                d[k] = [e[k][0], e[k][1], payload[pos:pos + e[k][2]]]
                pos += e[k][2]
        out.append(d)
    c = header["code"]
    return out, payload[c["offset"]:c["offset"] + c["length"]]


def _rebuild(header: dict, blobs: list[dict], code_blob: bytes) -> bytes:
    """A valid file from a header whose tensor entries (any order) carry these streams."""
    payload, offset = b"", 0
    for e, d in zip(header["tensors"], blobs):
        p = b"".join(b for _, _, b in d.values())
        e.update({k: [t, c, len(b)] for k, (t, c, b) in d.items()}, offset=offset, crc=zlib.crc32(p))
        payload += p
        offset += len(p)
    header["code"].update(offset=offset, length=len(code_blob), crc=zlib.crc32(code_blob))
    return _join(header, payload + code_blob)


def _with_stream(data: bytes, name: str, stream: str, blob: bytes, transform: int = 0, coder: int = 0) -> bytes:
    header, payload = _split(data)
    blobs, code_blob = _blobs(header, payload)
    i = [e["name"] for e in header["tensors"]].index(name)
    blobs[i][stream] = [transform, coder, blob]
    return _rebuild(header, blobs, code_blob)


def _base(code=None, tensors=None, recipe="int6") -> bytes:
    g = torch.Generator().manual_seed(0)
    tensors = tensors or {"a": torch.randn(4, 8, generator=g), "b": torch.randn(3, 5, generator=g)}
    return pc.build_artifact(tensors, recipe, code=code if code is not None else {"m.py": "x = 1\n"})[0]


# ----------------------------------------------------------------------------- scheme strings

@pytest.mark.parametrize("scheme", [
    "int6 ", " int6", "int6: asym", "int6:mse=0", "int6:max:max", "int6:max:mse", "int6:group=8:group=8",
    "int6:group=+8", "int6:group=8_0", "int6:group=0x8", "int6:percentile=0", "int6:percentile=100.5",
    "int6:sdclip=0", "int6:sdclip=inf", "int6:sdclip=nan", "int6:sdclip=.5", "int6:mse=1", "int6:mse=257",
    "int6:mse=4.0", "int6:max=1", "int6:asym=1", "int6:scale=fp32", "ternary:asym", "INT6", "int6:",
    "int6:group=16777217",
])
def test_bad_scheme_strings_are_bad_headers(scheme):
    header, payload = _split(_base())
    header["tensors"][0]["scheme"] = scheme
    with pytest.raises(pc.BadHeader):
        pc.read_artifact_bytes(_join(header, payload))


@pytest.mark.parametrize("written", ["int6:sym", "int6:max", "int6:group=0", "int6:scale=fp16",
                                     "int6:scale=fp16:group=0:max:sym"])
def test_written_out_defaults_and_any_order_are_accepted(written):
    data = _base()
    header, payload = _split(data)
    header["tensors"][0]["scheme"] = written
    art = pc.read_artifact_bytes(_join(header, payload))
    assert torch.equal(art.tensors["a"], pc.read_artifact_bytes(data).tensors["a"])
    assert str(pc.QuantSpec.parse("int4:scale=q8:group=8:asym:pct=99")) == "int4:asym:percentile=99:group=8:scale=q8"


@pytest.mark.parametrize("scheme", ["fp16:group=0", "fp32:max", "bf16:scale=fp16", "fp16:sym"])
def test_float_kinds_take_no_options(scheme):
    with pytest.raises(ValueError):
        pc.QuantSpec.parse(scheme)


def test_int1_asym_roundtrips():
    w = torch.tensor([[0.5, 1.0, 2.0, 0.25], [-1.0, -0.5, -2.0, 3.0]])
    data, _ = pc.build_artifact({"w": w}, "int1:asym")
    q = pc.read_artifact_bytes(data).quantized["w"]
    assert q.zeros is not None and int(q.codes.max()) <= 1 and int(q.zeros.max()) <= 1
    assert torch.equal(pc.read_artifact_bytes(data).tensors["w"], pc.fake_quant(w, pc.QuantSpec.parse("int1:asym")))


# ----------------------------------------------------------------------------- order and names

def test_unsorted_tensors_are_rejected():
    header, payload = _split(_base())
    blobs, code_blob = _blobs(header, payload)
    header["tensors"].reverse()
    blobs.reverse()
    with pytest.raises(pc.BadHeader, match="sorted"):
        pc.read_artifact_bytes(_rebuild(header, blobs, code_blob))
    blobs.reverse()
    header["tensors"].reverse()
    pc.read_artifact_bytes(_rebuild(header, blobs, code_blob))  # the helper itself is sound


def test_tensor_order_is_by_utf8_bytes():
    # "é" (U+00E9) sorts after "z" by UTF-8 bytes and by code point; Python's sort agrees
    data = _base(tensors={"z": torch.randn(2, 2), "é": torch.randn(2, 2), "Z": torch.randn(2, 2)})
    assert [e["name"] for e in _split(data)[0]["tensors"]] == ["Z", "z", "é"]
    pc.read_artifact_bytes(data)


def test_unsorted_code_files_are_rejected():
    data = _base(code={"a.py": "x", "b.py": "y"})
    header, payload = _split(data)
    header["code"]["files"].reverse()
    with pytest.raises(pc.BadHeader, match="sorted"):
        pc.read_artifact_bytes(_join(header, payload))


BAD_CODE_NAMES = ["", "../m.py", "a/../../m.py", "/etc/passwd", "a//b.py", "a/", "./m.py", "..", "a\\b.py",
                  "C:m.py", "m\x00.py", "m\n.py", "m\x7f.py", "x" * 1025]


@pytest.mark.parametrize("name", BAD_CODE_NAMES)
def test_bad_code_file_names_are_rejected_by_reader_and_writer(name):
    header, payload = _split(_base(code={"m.py": "x"}))
    header["code"]["files"][0][0] = name
    with pytest.raises(pc.BadHeader):
        pc.read_artifact_bytes(_join(header, payload))
    with pytest.raises(ValueError):
        pc.build_artifact({"w": torch.randn(2, 2)}, "int6", code={name: "x"})


def test_nested_code_file_names_are_fine():
    art = pc.read_artifact_bytes(_base(code={"pkg/model.py": "a", "pkg/sub/ü.py": "b", "x" * 1024: "c"}))
    assert sorted(art.code) == ["pkg/model.py", "pkg/sub/ü.py", "x" * 1024]


# ----------------------------------------------------------------------------- scales

def _q_tensor(scheme: str):
    g = torch.Generator().manual_seed(1)
    data = pc.build_artifact({"w": torch.randn(2, 8, generator=g)}, scheme, code={})[0]
    return data


@pytest.mark.parametrize("scheme,scales,ok", [
    ("int4:scale=bf16", struct.pack("<HH", 0x0080, 0x3F80), True),       # 2^-126: the least normal
    ("int4:scale=bf16", struct.pack("<HH", 0x0040, 0x3F80), False),      # subnormal
    ("int4:scale=bf16", struct.pack("<HH", 0x0000, 0x3F80), False),      # zero
    ("int4", struct.pack("<HH", 0x0001, 0x3C00), True),                   # fp16 subnormal = float32 normal
    ("int4:scale=q8", struct.pack("<f", 2.0 ** -110) + bytes([0, 255]), True),    # 2^-126 < 2^-125.9
    ("int4:scale=q8", struct.pack("<f", 2.0 ** -120) + bytes([0, 255]), False),   # ref·T[255] underflows
    ("int4:scale=q8", struct.pack("<f", -1.0) + bytes([0, 0]), False),
    ("int4:scale=q8", struct.pack("<f", float("inf")) + bytes([0, 0]), False),
    ("int4:scale=q8", struct.pack("<f", 0.5) + bytes([3, 3]), True),     # no group needs e = 0
])
def test_scale_floor_and_q8_ref(scheme, scales, ok):
    bad = _with_stream(_q_tensor(scheme), "w", "scales", scales)
    if ok:
        pc.read_artifact_bytes(bad)
        pc.read_artifact_bytes(bad, unpack=False)
    else:
        for unpack in (True, False):
            with pytest.raises(pc.BadPayload, match="scales"):
                pc.read_artifact_bytes(bad, unpack=unpack)


def test_q8_all_zero_and_empty_tensors():
    data = pc.build_artifact({"z": torch.zeros(2, 4), "e": torch.zeros(3, 0)}, "int4:scale=q8", code={})[0]
    q = pc.read_artifact_bytes(data).quantized
    assert float(q["z"].scale_ref) == 2.0 ** -100 and q["e"].scales.numel() == 0
    assert float(q["e"].scale_ref) == 0.0


# ----------------------------------------------------------------------------- zstd frames

DATA = bytes(range(256)) * 8


@pytest.mark.parametrize("blob_of,ok", [
    (lambda: zstandard.ZstdCompressor(write_content_size=True).compress(DATA), True),
    (lambda: zstandard.ZstdCompressor(write_checksum=True).compress(DATA), True),
    (lambda: zstandard.ZstdCompressor(write_content_size=False).compress(DATA), False),
    (lambda: zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(b"\x00" * 64 + DATA[:512]),
                                      write_dict_id=True).compress(DATA), False),
    (lambda: zstandard.ZstdCompressor().compress(DATA[:8]) + zstandard.ZstdCompressor().compress(DATA[8:]), False),
    (lambda: b"\x50\x2a\x4d\x18\x00\x00\x00\x00" + zstandard.ZstdCompressor().compress(DATA), False),  # skippable
])
def test_zstd_stream_frame_rules(blob_of, ok):
    blob = blob_of()
    if ok:
        assert decode_stream(blob, 0, 1, StreamDesc(len(DATA))).tobytes() == DATA
    else:
        with pytest.raises(pc.BadPayload):
            decode_stream(blob, 0, 1, StreamDesc(len(DATA)))


def test_zstd_checksum_is_verified():
    b = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(DATA))
    b[-1] ^= 1
    with pytest.raises(pc.BadPayload):
        decode_stream(bytes(b), 0, 1, StreamDesc(len(DATA)))


def test_zstd_header_without_content_size_is_a_bad_header():
    header, payload = _split(_base())
    raw = msgpack.packb(header, use_bin_type=True)
    for comp, err in ((zstandard.ZstdCompressor(write_content_size=False), pc.BadHeader),
                      (zstandard.ZstdCompressor(write_checksum=True), None)):
        data = _join(header, payload, comp.compress(raw), hcoding=1, hraw=len(raw))
        if err is None:
            pc.read_artifact_bytes(data)
        else:
            with pytest.raises(err):
                pc.read_artifact_bytes(data)


# ----------------------------------------------------------------------------- coder 4 on any stream

# Golden bytes: the code section "abcab" as a static rANS blob (kind 0, P = 8, K = 1,
# lo = 'a', hi = 'c', freq 102/103/51 as varints, one state, no words): alphabet 256, one row.
GOLDEN_CODE_RANS = bytes.fromhex("00080161636766335c58c300")


def test_rans_code_section_golden():
    assert rans.decode(GOLDEN_CODE_RANS, 5, 256).tobytes() == b"abcab"
    data = _base(code={"m.py": "abcab"})
    header, payload = _split(data)
    blobs, _ = _blobs(header, payload)
    header["code"]["coder"] = 4
    assert pc.read_artifact_bytes(_rebuild(header, blobs, GOLDEN_CODE_RANS)).code == {"m.py": "abcab"}


def test_rans_row_view_of_float_codes_and_one_row_for_scales():
    # fp16 (2, 3): 12 code bytes, row view (2, 6); two rows of different spread
    data = pc.build_artifact({"w": torch.zeros(2, 3)}, "fp16", code={})[0]
    raw = np.array([127, 127, 128, 127, 126, 127, 100, 160, 90, 200, 127, 30], np.uint8)
    blob = rans.encode(raw, 256, 2, 6, model="parametric", lanes=1)
    with pytest.raises(pc.BadPayload):  # the same blob under the one-row view fails
        rans.decode(blob, 12, 256, 1, 12)
    art = pc.read_artifact_bytes(_with_stream(data, "w", "codes", blob, 0, 4))
    assert art.quantized["w"].codes.view(torch.int16).numpy().astype("<i2").tobytes() == raw.tobytes()
    # scales (fp16, 2 bytes per group): always one row of n, alphabet 256
    data = _q_tensor("int4:group=4")
    sraw = np.frombuffer(_blobs(*_split(pc.build_artifact(
        {"w": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}, "int4:group=4", code={},
        coder="raw")[0]))[0][0]["scales"][2], np.uint8)
    sblob = rans.encode(sraw, 256, 1, sraw.size, model="parametric", lanes=2)
    a = pc.read_artifact_bytes(_with_stream(data, "w", "scales", sblob, 0, 4))
    assert torch.equal(a.tensors["w"], pc.read_artifact_bytes(data).tensors["w"])


def test_rans_alphabet_is_levels_for_codes_and_256_when_packed():
    data = _q_tensor("ternary")
    codes = pc.read_artifact_bytes(data).quantized["w"].codes.numpy().ravel()
    assert int(codes.max()) <= 2
    wide = rans.encode(codes, 256, 2, 8, model="static")
    patched = bytearray(wide)
    patched[4] = 3  # hi = 3 >= alphabet 3 of a ternary codes stream (transform 0)
    with pytest.raises(pc.BadPayload, match="alphabet"):
        pc.read_artifact_bytes(_with_stream(data, "w", "codes", bytes(patched), 0, 4))
    pc.read_artifact_bytes(_with_stream(data, "w", "codes", rans.encode(codes, 3, 2, 8), 0, 4))


def test_rans_varint_maxima():
    head = bytes([1, 8, 1, 0, 0]) + (0).to_bytes(2, "little") + bytes([1])  # kind 1, alphabet 1
    with pytest.raises(pc.BadPayload, match="varint too long"):
        rans.decode(head + b"\x80" * 5 + b"\x00", 1, 1)
    static = bytes([0, 8, 1, 0, 1])
    with pytest.raises(pc.BadPayload, match="varint too long"):  # freq: at most 3 bytes
        rans.decode(static + b"\x80\x80\x80\x01" + b"\x00" + (1 << 16).to_bytes(4, "little"), 1, 2)
    # a non-minimal varint (80 00 = 0, 80 82 00 = 256) is accepted
    blob = static + b"\x80\x00" + b"\x80\x82\x00" + (1 << 16).to_bytes(4, "little")
    assert rans.decode(blob, 0, 2).size == 0


# ----------------------------------------------------------------------------- check order

def test_check_order_first_rule_wins():
    data = _base()
    header, payload = _split(data)
    # bad transform and unknown coder on one stream: the transform is checked first
    header["tensors"][0]["codes"][:2] = [7, 11]
    with pytest.raises(pc.BadPayload, match="transform"):
        pc.read_artifact_bytes(_join(header, payload))
    # a bad code-file name and a wrong code-section CRC: the name (BadHeader) comes first
    header, payload = _split(data)
    header["code"]["files"][0][0] = "../m.py"
    header["code"]["crc"] ^= 1
    with pytest.raises(pc.BadHeader):
        pc.read_artifact_bytes(_join(header, payload))
    # an element-limit excess and a bad offset: the limit comes first
    header, payload = _split(data)
    header["tensors"][1]["offset"] += 1
    with pytest.raises(pc.LimitExceeded):
        pc.read_artifact_bytes(_join(header, payload), pc.Limits(max_total_elements=40))
    # a file CRC mismatch hides every header defect
    bad = bytearray(_join(header, payload))
    bad[-1] ^= 1
    with pytest.raises(pc.ChecksumMismatch):
        pc.read_artifact_bytes(bytes(bad))


# ----------------------------------------------------------------------------- forced coder

def test_forced_coder_applies_to_int_codes_only():
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(64, 64, generator=g), "n": torch.randn(7, generator=g)}
    code = {"m.py": "def f(x):\n    return x + 1\n" * 40}
    recipe = "n=fp32;*=int4:group=16"
    auto, _ = pc.build_artifact(tensors, recipe, code=code)
    forced, _ = pc.build_artifact(tensors, recipe, code=code, coder="rans")
    ha, hf = _split(auto)[0], _split(forced)[0]
    ea, ef = ({e["name"]: e for e in h["tensors"]} for h in (ha, hf))
    assert ef["w"]["codes"][1] == 4
    assert ef["n"]["codes"] == ea["n"]["codes"] and ef["n"]["codes"][1] != 4  # 28 fp32 bytes: not rANS
    assert ef["w"]["scales"] == ea["w"]["scales"]
    assert hf["code"]["coder"] == ha["code"]["coder"] and hf["code"]["length"] == ha["code"]["length"]
    raw = pc.build_artifact(tensors, recipe, code=code, coder="raw")[0]
    assert {e["name"]: e["codes"][1] for e in _split(raw)[0]["tensors"]}["w"] == 0
