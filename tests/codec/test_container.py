"""Artifact container: exact roundtrips, determinism, size accounting, safe writing, limits."""
from __future__ import annotations

import json
import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pgolf_codec as pc
from pgolf_codec.container import FIXED_BYTES

SCHEMES = ["int1", "int3:asym:group=8", "int4:group=16:scale=q8", "int5", "int6:sdclip=12.5", "int8:scale=bf16",
           "ternary", "fp16", "bf16", "fp32", "int2:asym:scale=q8"]


@st.composite
def tensor_sets(draw):
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="=;"),
                                  min_size=1, max_size=12), min_size=n, max_size=n, unique=True))
    out, rules = {}, []
    for i, name in enumerate(names):
        shape = draw(st.lists(st.integers(0, 19), min_size=1, max_size=3))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        out[name] = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 0.02, 1.0]))
        rules.append((name, draw(st.sampled_from(SCHEMES))))
    return out, rules


def _recipe(rules):
    return pc.Recipe([(n.replace("*", "?").replace("[", "?"), pc.QuantSpec.parse(s)) for n, s in rules]
                     + [("*", pc.QuantSpec.parse("int8"))])


@settings(max_examples=25)
@given(ts=tensor_sets(), coder=st.sampled_from(["auto", "raw", "zstd", "lzma", "zlib"]))
def test_roundtrip_random_tensor_sets(ts, coder):
    tensors, rules = ts
    recipe = _recipe(rules)
    meta = {"model_config": {"d": 3, "x": [1.5, None, True]}, "tokenizer": {"name": "sp1024"}}
    code = {"model.py": "import torch\n# é\n", "b.py": ""}
    data, info = pc.build_artifact(tensors, recipe, metadata=meta, code=code, coder=coder)
    art = pc.read_artifact_bytes(data)
    assert list(art.tensors) == sorted(tensors)
    for name, w in tensors.items():
        expect = pc.fake_quant(w, recipe.spec_for(name))
        assert torch.equal(art.tensors[name], expect), name
        assert art.tensors[name].dtype == torch.float32
    assert art.metadata == meta and art.code == code
    assert art.info.to_dict() == info.to_dict()
    assert info.total_bytes == len(data) == info.model_bytes + info.code_bytes
    assert sum(t["bytes"] for t in info.tensors) + info.header_bytes + info.code_bytes == len(data)
    assert pc.build_artifact(tensors, recipe, metadata=dict(reversed(meta.items())), code=code, coder=coder)[0] == data


def test_encoded_size_is_exact_tensor_payload():
    torch.manual_seed(0)
    w = torch.randn(64, 300) * 0.02
    for s in ("int6:sdclip=12.5", "int4:asym:group=64:scale=q8", "fp16"):
        data, info = pc.build_artifact({"w": w}, s)
        assert info.tensors[0]["bytes"] == pc.encoded_size(w, s) == pc.encoded_size(pc.quantize(w, pc.QuantSpec.parse(s)))
        assert pc.encoded_size(w, s, coder="raw") >= info.tensors[0]["bytes"]


def test_prequantized_tensors_are_stored_verbatim_and_validated():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    q = pc.quantize(w, pc.QuantSpec.parse("int4:group=8"))
    codes = (q.codes.int() + 1).clamp(max=14).to(torch.uint8)  # e.g. GPTQ moved some codes
    q2 = pc.Quantized(q.spec, q.shape, codes, q.scales)
    art = pc.read_artifact_bytes(pc.build_artifact({"w": q2}, "int8")[0])
    assert torch.equal(art.tensors["w"], pc.dequantize(q2))
    bad = pc.Quantized(q.spec, q.shape, q.codes, q.scales + 1e-4)  # not representable in fp16
    with pytest.raises(ValueError, match="representable"):
        pc.build_artifact({"w": bad}, "int8")


def test_write_is_atomic_refuses_overwrite_and_enforces_max_bytes(tmp_path):
    t = {"w": torch.randn(32, 32)}
    p = tmp_path / "a.pgolf"
    info = pc.write_artifact(p, t, "int6")
    assert p.stat().st_size == info.total_bytes
    with pytest.raises(FileExistsError):
        pc.write_artifact(p, t, "int8")
    pc.write_artifact(p, t, "int8", overwrite=True)
    assert pc.read_artifact(p).quantized["w"].spec.bits == 8
    with pytest.raises(pc.ArtifactTooLarge, match="over the limit"):
        pc.write_artifact(tmp_path / "b.pgolf", t, "int8", max_bytes=100)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.pgolf"]  # no temp files left


def test_load_returns_float32_on_device():
    data, _ = pc.build_artifact({"a": torch.randn(3, 5), "b": torch.randn(4)}, "int8:asym:group=2")
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pgolf")
        open(path, "wb").write(data)
        out = pc.load(path, "cpu")
        assert set(out) == {"a", "b"} and all(v.dtype == torch.float32 for v in out.values())


def test_bad_inputs_to_writer():
    with pytest.raises(ValueError, match="float"):
        pc.build_artifact({"i": torch.arange(3)}, "int8")
    with pytest.raises(ValueError, match="metadata"):
        pc.build_artifact({}, "int8", metadata={"x": object()})
    with pytest.raises(ValueError, match="unknown coder"):
        pc.build_artifact({}, "int8", coder="gzip")


def test_fixed_overhead_is_small():
    data, info = pc.build_artifact({}, "int8")
    assert len(data) <= FIXED_BYTES + 64  # empty header: the keys alone
    torch.manual_seed(2)
    many = {f"blocks.{i}.attn.{k}.weight": torch.randn(16, 16) for i in range(9) for k in "qkvo"}
    _, info = pc.build_artifact(many, "int6")
    assert (info.header_bytes - FIXED_BYTES) / len(many) < 30  # bytes of header per tensor


def _reassemble(header: dict, payload: bytes) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<4sBBBBII", b"PGLF", 1, 0, 0, 0, len(raw), len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _split(data: bytes):
    _, _, _, hc, _, hlen, hraw = struct.unpack_from("<4sBBBBII", data)
    stored = data[16:16 + hlen]
    raw = __import__("zstandard").ZstdDecompressor().decompress(stored) if hc == 1 else stored
    return msgpack.unpackb(raw), data[16 + hlen:-4]


def test_newer_minor_with_unknown_fields_is_accepted_major_rejected():
    data, _ = pc.build_artifact({"w": torch.randn(4, 4)}, "int6", metadata={"k": 1})
    header, payload = _split(data)
    header["future_field"] = {"x": 1}
    header["tensors"][0]["future"] = 7
    newer = bytearray(_reassemble(header, payload))
    newer[5] = 3
    newer[-4:] = struct.pack("<I", zlib.crc32(bytes(newer[:-4])))
    art = pc.read_artifact_bytes(bytes(newer))
    assert art.info.format_version == "1.3" and art.metadata == {"k": 1}
    newer[5] = 0  # an older minor (1.0 files from before rANS kind 2) reads as well
    newer[-4:] = struct.pack("<I", zlib.crc32(bytes(newer[:-4])))
    assert pc.read_artifact_bytes(bytes(newer)).info.format_version == "1.0"
    newer[5] = 3
    newer[4] = 2
    newer[-4:] = struct.pack("<I", zlib.crc32(bytes(newer[:-4])))
    with pytest.raises(pc.UnsupportedVersion):
        pc.read_artifact_bytes(bytes(newer))


@pytest.mark.parametrize("mutate,error", [
    (lambda h: h["tensors"][0].update(shape=[1 << 20, 1 << 20]), pc.LimitExceeded),
    (lambda h: h["tensors"][0].update(shape=[1 << 40, 1 << 20]), pc.BadHeader),  # a dim over 2^31
    (lambda h: h["tensors"][0].update(shape=[0, (1 << 62) - 1, (1 << 62) - 1]), pc.BadHeader),  # 0 elements
    (lambda h: h["tensors"][0].update(shape=[0, 1 << 31, 1 << 31, 1 << 31]), pc.LimitExceeded),  # rows of 2^93
    (lambda h: h["tensors"].extend([h["tensors"][0]]), pc.BadHeader),
    (lambda h: h["tensors"][0].update(codes=[0, 11, h["tensors"][0]["codes"][2]]), pc.UnsupportedCoder),
    (lambda h: h["tensors"][0].update(scheme="int9"), pc.BadHeader),
    (lambda h: h["tensors"][0].update(offset=1), pc.BadHeader),
    (lambda h: h["tensors"][0].update(name=""), pc.BadHeader),
    (lambda h: h["tensors"][0].update(shape=[True]), pc.BadHeader),
    (lambda h: h["tensors"][0].update(crc=h["tensors"][0]["crc"] ^ 1), pc.ChecksumMismatch),
    (lambda h: h["tensors"][0].update(zeros=[0, 0, 0]), pc.BadHeader),
    (lambda h: h["code"]["files"].append(["x.py", 1 << 40]), pc.LimitExceeded),
    (lambda h: h.update(metadata=[1]), pc.BadHeader),
    (lambda h: h["tensors"][0]["codes"].__setitem__(2, h["tensors"][0]["codes"][2] + 1), pc.FormatError),
])
def test_hostile_headers_raise_named_errors(mutate, error):
    data, _ = pc.build_artifact({"w": torch.randn(4, 4)}, "int6", code={"m.py": "x"})
    header, payload = _split(data)
    mutate(header)
    with pytest.raises(error):
        pc.read_artifact_bytes(_reassemble(header, payload))


def test_limits_are_enforced_before_decoding():
    data, _ = pc.build_artifact({"a": torch.randn(10, 10), "b": torch.randn(3)}, "int8")
    with pytest.raises(pc.LimitExceeded):
        pc.read_artifact_bytes(data, pc.Limits(max_tensors=1))
    with pytest.raises(pc.LimitExceeded):
        pc.read_artifact_bytes(data, pc.Limits(max_tensor_elements=50))
    with pytest.raises(pc.LimitExceeded):
        pc.read_artifact_bytes(data, pc.Limits(max_file_bytes=50))


def test_inspect_json_fields():
    data, info = pc.build_artifact({"w": torch.randn(8, 8)}, "int6", code={"m.py": "pass\n"})
    d = json.loads(json.dumps(info.to_dict()))
    assert {"total_bytes", "model_bytes", "code_bytes", "format_version", "tensors"} <= set(d)
    t = d["tensors"][0]
    assert {"name", "shape", "numel", "scheme", "bits", "coder", "bytes", "bits_per_param"} <= set(t)
    assert t["bits_per_param"] == 8 * t["bytes"] / 64


ALL_CODE_SCHEMES = [f"int{b}" for b in range(1, 9)] + ["ternary", "int3:asym:group=8:scale=q8"]


@pytest.mark.parametrize("coder", ["raw", "rans"])  # raw: always packed; rans: either transform
def test_unpack_false_returns_validated_code_streams(coder):
    from pgolf_codec.streams import stream_nbytes

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(5, 13, generator=g) for i in range(len(ALL_CODE_SCHEMES))}
    tensors["f"] = torch.randn(7, generator=g)
    recipe = pc.Recipe([(f"t{i}", pc.QuantSpec.parse(s)) for i, s in enumerate(ALL_CODE_SCHEMES)]
                       + [("f", pc.QuantSpec.parse("fp16"))])
    data, _ = pc.build_artifact(tensors, recipe, coder=coder)
    full, lazy = pc.read_artifact_bytes(data), pc.read_artifact_bytes(data, unpack=False)
    transform = {e["name"]: e["codes"][0] for e in _split(data)[0]["tensors"]}
    assert sorted(lazy.streams) == [f"t{i}" for i in range(len(ALL_CODE_SCHEMES))] and list(lazy.quantized) == ["f"]
    for name, cs in lazy.streams.items():
        q = full.quantized[name]
        assert cs.packed == (transform[name] == 1) and (cs.packed or coder == "rans" or q.spec.bits == 8)
        assert cs.payload.dtype == np.uint8 and cs.payload.size == stream_nbytes(q.numel, q.spec, cs.packed)
        assert torch.equal(cs.scales, q.scales) and (cs.zeros is None) == (q.zeros is None)
        assert torch.equal(cs.to_quantized().codes, q.codes)
    assert list(lazy.tensors) == list(full.tensors)
    assert all(torch.equal(lazy.tensors[k], full.tensors[k]) for k in full.tensors)


def test_unpack_false_applies_the_same_checks():
    spec = pc.QuantSpec.parse("int3")
    data, _ = pc.build_artifact({"w": torch.randn(1, 7)}, spec, coder="raw")  # 21 bits: 3 padding bits
    header, payload = _split(data)
    e = header["tensors"][0]
    assert e["codes"][:2] == [1, 0]
    p = bytearray(payload)
    p[e["codes"][2] - 1] |= 0x80  # a padding bit
    e["crc"] = zlib.crc32(bytes(p[:e["codes"][2] + e["scales"][2]]))
    bad = _reassemble(header, bytes(p))
    for unpack in (True, False):
        with pytest.raises(pc.BadPayload, match="padding"):
            pc.read_artifact_bytes(bad, unpack=unpack)


def test_bytes_do_not_depend_on_thread_count(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from pgolf_codec import coders

    g = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(300, 256, generator=g) * 0.02 for i in range(4)}
    tensors["tied"] = torch.cat([tensors["w0"][:150]] * 2)
    datas = []
    for workers in (1, 3):
        monkeypatch.setattr(coders, "_POOL", ThreadPoolExecutor(workers))
        coders.clear_cache()
        datas.append(pc.build_artifact(tensors, "int6:sdclip=12.5")[0])
    assert datas[0] == datas[1]


def test_without_zstandard_header_is_plain_and_zstd_artifacts_name_the_package(monkeypatch):
    import sys

    tensors = {"w": torch.randn(40, 40)}
    meta = {"model_config": {f"key{i}": "value" for i in range(40)}}  # compressible header
    with_zstd, _ = pc.build_artifact(tensors, "int4", metadata=meta, coder="zstd")
    assert with_zstd[6] == 1
    monkeypatch.setitem(sys.modules, "zstandard", None)
    from pgolf_codec import coders
    coders.clear_cache()
    plain, _ = pc.build_artifact(tensors, "int4", metadata=meta)  # auto works, header written plain
    assert plain[6] == 0
    art = pc.read_artifact_bytes(plain)
    assert torch.equal(art.tensors["w"], pc.fake_quant(tensors["w"], pc.QuantSpec.parse("int4")))
    with pytest.raises(pc.UnsupportedCoder, match="zstandard"):
        pc.read_artifact_bytes(with_zstd)


def test_info_names_the_rans_model_on_write_and_read():
    # columns of very different widths: the per-column model is the smallest (coder 4, kind 2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 64, generator=g) * torch.logspace(-2, 0, 64)[None, :]
    data, info = pc.build_artifact({"w": w, "b": torch.randn(8, generator=g)}, "w=int6;*=fp32", coder="auto")
    (wrote,) = [t for t in info.tensors if t["name"] == "w"]
    assert wrote["coder"] == "rans" and wrote["rans_model"] == "column"
    read = {t["name"]: t for t in pc.read_artifact_bytes(data).info.tensors}
    assert read["w"]["rans_model"] == "column" and "rans_model" not in read["b"]


@pytest.mark.parametrize("recipe,value,match", [
    ("int8", 3e38, r"tensor 'w' \(int8\): value 3e\+38 at index \(1, 2\).*fp16 scale 65504"),
    ("int4:asym:group=2", 1e12, r"value 1e\+12 at index \(1, 2\)"),
    ("ternary", 1e30, r"value 1e\+30"),
    ("fp16", 1e5, r"tensor 'w' \(fp16\): value 100000 at index \(1, 2\) overflows fp16"),
    ("bf16", 3.4e38, r"overflows bf16"),
    ("int8", float("nan"), r"NaN or Inf.*nan at index \(1, 2\)"),
    ("fp32", float("-inf"), r"NaN or Inf.*-inf at index \(1, 2\)"),
])
def test_writer_refuses_values_the_scheme_cannot_hold(recipe, value, match):
    w = torch.randn(4, 4) * 0.01
    w[1, 2] = value
    with pytest.raises(ValueError, match=match):
        pc.build_artifact({"w": w}, recipe)


def test_values_in_range_are_stored_and_q8_scales_hold_large_values():
    w = torch.randn(4, 4)
    w[1, 2] = 3e38
    data, _ = pc.build_artifact({"w": w}, "int8:scale=q8")
    assert torch.isclose(pc.read_artifact_bytes(data).tensors["w"][1, 2], torch.tensor(3e38), rtol=0.01)
    w[1, 2] = 65504.0  # the fp16 maximum itself is representable
    data, _ = pc.build_artifact({"w": w}, "fp16")
    assert pc.read_artifact_bytes(data).tensors["w"][1, 2] == 65504.0
    w[1, 2] = 65504.0 * 127  # int8's largest value under fp16 scales
    data, _ = pc.build_artifact({"w": w}, "int8")
    assert pc.read_artifact_bytes(data).tensors["w"][1, 2] == 65504.0 * 127
    with pytest.raises(ValueError, match="beyond the float32 range"):
        pc.build_artifact({"w": torch.tensor([1.0, 1e39], dtype=torch.float64)}, "fp32")
