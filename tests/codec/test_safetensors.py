"""Our safetensors reader/writer: roundtrip and strict validation of untrusted files."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from pgolf_codec import SafetensorsError
from pgolf_codec.safetensors_io import read_safetensors, safetensors_bytes, write_safetensors


def test_roundtrip_all_dtypes(tmp_path):
    t = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
         "i64": torch.arange(6).reshape(2, 3), "b": torch.tensor([True, False]), "e": torch.zeros(0, 4),
         "u8": torch.arange(5, dtype=torch.uint8)}
    p = tmp_path / "x.safetensors"
    write_safetensors(p, t, {"k": "v"})
    out, meta = read_safetensors(p)
    assert meta == {"k": "v"} and set(out) == set(t)
    for k in t:
        assert out[k].dtype == t[k].dtype and torch.equal(out[k], t[k])
    with pytest.raises(FileExistsError):
        write_safetensors(p, t)
    assert safetensors_bytes(t, {"k": "v"}) == p.read_bytes()  # deterministic


def _file(tmp_path, header, data=b"", raw_len=None):
    h = json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(h) if raw_len is None else raw_len) + h + data)
    return p


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "bytes for"),
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "trailing"),
    ({"__metadata__": {"a": 1}}, b"", "metadata"),
    ([1, 2], b"", "object"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"", "exactly"),
])
def test_rejects_invalid(tmp_path, header, data, match):
    with pytest.raises(SafetensorsError, match=match):
        read_safetensors(_file(tmp_path, header, data))


def test_rejects_bad_lengths_and_json(tmp_path):
    with pytest.raises(SafetensorsError, match="header length"):
        read_safetensors(_file(tmp_path, {}, raw_len=1 << 60))
    p = tmp_path / "j.safetensors"
    p.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(SafetensorsError, match="JSON"):
        read_safetensors(p)
    p.write_bytes(b"\1\2")
    with pytest.raises(SafetensorsError):
        read_safetensors(p)
