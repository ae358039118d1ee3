"""A small, strict reader/writer of the safetensors format (no third-party dependency).

Layout: u64 LE header length N, N bytes of UTF-8 JSON
`{name: {"dtype": D, "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the raw little-endian tensor data; offsets are relative to the data start.  The reader
treats the file as untrusted: every entry is validated (known dtype, non-negative shape,
`end - begin == numel * itemsize`, tensors tile the data region exactly, no overlap) and any
violation raises `SafetensorsError` naming the problem.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .atomic import atomic_write
from .errors import FormatError, Limits, SafetensorsError, check_shape

# safetensors dtype -> (torch dtype, little-endian numpy dtype for reading the raw bytes)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "F64": (torch.float64, "<f8"), "F32": (torch.float32, "<f4"), "F16": (torch.float16, "<f2"),
    "BF16": (torch.bfloat16, "<i2"), "I64": (torch.int64, "<i8"), "I32": (torch.int32, "<i4"),
    "I16": (torch.int16, "<i2"), "I8": (torch.int8, "i1"), "U8": (torch.uint8, "u1"), "BOOL": (torch.bool, "u1"),
}
_BY_TORCH = {t: name for name, (t, _) in _DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000


def read_safetensors(path: str | Path, limits: Limits = Limits()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> CPU tensor in its stored dtype, `__metadata__` dict) of a `.safetensors` file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: header length {n} exceeds the file or the {MAX_HEADER_BYTES}-byte limit")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SafetensorsError(f"{path}: header is not UTF-8 JSON: {e}") from None
        data = f.read()
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    spans, out = [], {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{path}: tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list):
            raise SafetensorsError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        try:  # the artifact's shape rule: bounded dims, bounded element count
            check_shape(shape, limits, f"tensor {name!r}")
        except FormatError as err:
            raise SafetensorsError(f"{path}: {err}") from None
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= len(data)):
            raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets {offs!r} outside the data")
        itemsize = np.dtype(_DTYPES[dtype][1]).itemsize
        numel = math.prod(shape)
        if offs[1] - offs[0] != numel * itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r}: {offs[1] - offs[0]} bytes for {numel} x {dtype}")
        spans.append((offs[0], offs[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise SafetensorsError(f"{path}: tensor {name!r} {'overlaps' if begin < pos else 'leaves a gap'} at byte {begin}")
        pos = end
    if pos != len(data):
        raise SafetensorsError(f"{path}: {len(data) - pos} trailing bytes after the last tensor")
    for begin, end, name in spans:
        tdtype, npdtype = _DTYPES[header[name]["dtype"]]
        arr = np.frombuffer(data, dtype=npdtype, count=(end - begin) // np.dtype(npdtype).itemsize, offset=begin)
        t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
        out[name] = t.view(tdtype).reshape(header[name]["shape"]) if tdtype in (torch.bfloat16, torch.bool) \
            else t.reshape(header[name]["shape"])
    return out, meta


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of `tensors` (sorted by name, deterministic)."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, pos = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _BY_TORCH:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors equivalent")
        npdtype = _DTYPES[_BY_TORCH[t.dtype]][1]
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.uint8) if t.dtype == torch.bool
               else t).numpy().astype(npdtype).tobytes()
        header[name] = {"dtype": _BY_TORCH[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the format recommends 8-byte alignment of the data start
    return struct.pack("<Q", len(h)) + h + b"".join(chunks)


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> None:
    """Write atomically (temp file + rename, mode per umask); refuses to replace a file unless `overwrite`."""
    atomic_write(path, safetensors_bytes(tensors, metadata), overwrite=overwrite)
