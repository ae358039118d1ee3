"""The artifact container, format v1 (normative description: spec/FORMAT.md).

    0   4  magic b"PGLF"
    4   1  major (1)            5  1  minor (3)
    6   1  header coding: 0 msgpack, 1 zstd(msgpack)      7  1  flags (0)
    8   4  header stored length H (u32 LE)               12  4  header decoded length (u32 LE)
   16   H  header
 16+H   P  payload: tensor streams in header order, then the code section
  end   4  CRC-32 of every preceding byte (u32 LE)

Readers validate every declared size against `Limits` before allocating, and raise a
`FormatError` subclass naming the problem on any bad input.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgpack
import numpy as np
import torch

from .atomic import atomic_write
from .coders import (CODERS, TRANSFORM_PACKED, StreamDesc, coder_by_name, decode_coded, decode_stream, encode_stream,
                     require_zstd, thread_pool, zstd_module)
from .errors import (ArtifactTooLarge, BadHeader, BadMagic, BadPayload, ChecksumMismatch, FormatError,
                     LimitExceeded, Limits, Truncated, UnsupportedVersion, check_shape)
from . import bitpack, gpu
from .rans import MODEL_NAMES as RANS_MODEL_NAMES, RansCoder
from .schemes import (Q8_TABLE, Quantized, QuantSpec, Recipe, check_representable, dequantize, n_groups, quantize,
                      rows_view_shape)
from .streams import check_stream

MAGIC = b"PGLF"
MAJOR, MINOR = 1, 3
FORMAT_VERSION = f"{MAJOR}.{MINOR}"
BUDGET_BYTES = 16_000_000
_PREFIX = struct.Struct("<4sBBBBII")
FIXED_BYTES = _PREFIX.size + 4  # prefix + trailing CRC
_SOURCE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                  torch.float64: "float64"}
_FLOAT_WIDTH = {"fp16": 2, "bf16": 2, "fp32": 4}
_MIN_SCALE = 2.0 ** -126  # smallest valid decoded scale: the least positive normal float32


# ----------------------------------------------------------------------------- tensor streams

def _stream_descs(spec: QuantSpec, shape: tuple[int, ...], scales: np.ndarray | None = None) -> dict[str, StreamDesc]:
    """The streams a tensor of this spec and shape stores, in payload order."""
    rows, row_len = rows_view_shape(shape)
    n = rows * row_len
    if spec.is_float:
        w = _FLOAT_WIDTH[spec.kind]
        return {"codes": StreamDesc(n * w, 256, w, rows, row_len * w)}
    ng = n_groups(row_len, spec.group)
    d = {"codes": StreamDesc(n, spec.levels, 1, rows, row_len, scales)}
    if spec.scale_dtype == "q8":
        d["scales"] = StreamDesc(4 + rows * ng)  # float32 reference, then one code per group
    else:
        d["scales"] = StreamDesc(rows * ng * 2, 256, 2)
    if not spec.symmetric:
        d["zeros"] = StreamDesc(rows * ng, 1 << spec.bits)
    return d


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _stream_bytes(q: Quantized) -> dict[str, np.ndarray]:
    """The decoded bytes of every stream of q (little-endian)."""
    spec = q.spec
    if spec.is_float:
        c = q.codes
        raw = _np(c.view(torch.int16)).astype("<i2") if spec.kind == "bf16" else _np(c).astype(
            "<f2" if spec.kind == "fp16" else "<f4")
        return {"codes": raw.view(np.uint8).ravel()}
    out = {"codes": _np(q.codes).ravel()}
    if spec.scale_dtype == "q8":
        ref = np.array([float(q.scale_ref)], dtype="<f4").view(np.uint8)
        out["scales"] = np.concatenate([ref, _np(q.scale_codes).ravel()])
    elif spec.scale_dtype == "bf16":
        out["scales"] = _np(q.scales.to(torch.bfloat16).view(torch.int16)).astype("<i2").view(np.uint8).ravel()
    else:
        out["scales"] = _np(q.scales).astype("<f2").view(np.uint8).ravel()
    if not spec.symmetric:
        out["zeros"] = _np(q.zeros).ravel()
    return out


def _check_quantized(q: Quantized, name: str) -> None:
    """Refuse to write a Quantized whose decode would not reproduce it exactly."""
    spec = q.spec
    rows, row_len = rows_view_shape(q.shape)
    if tuple(q.codes.shape) != (rows, row_len):
        raise ValueError(f"{name}: codes shape {tuple(q.codes.shape)} != {(rows, row_len)}")
    if spec.is_float:
        return
    ng = n_groups(row_len, spec.group)
    if q.codes.dtype != torch.uint8 or (q.codes.numel() and int(q.codes.max()) >= spec.levels):
        raise ValueError(f"{name}: codes must be uint8 below {spec.levels}")
    if tuple(q.scales.shape) != (rows, ng) or q.scales.dtype != torch.float32:
        raise ValueError(f"{name}: scales must be float32 of shape {(rows, ng)}")
    if (q.zeros is None) != spec.symmetric:
        raise ValueError(f"{name}: zero points {'missing' if q.zeros is None else 'given'} for {spec}")
    if q.zeros is not None and (q.zeros.dtype != torch.uint8 or tuple(q.zeros.shape) != (rows, ng)
                                or (q.zeros.numel() and int(q.zeros.max()) >= 1 << spec.bits)):
        raise ValueError(f"{name}: zero points must be uint8 < 2^bits of shape {(rows, ng)}")
    s = q.scales.detach().cpu()
    if spec.scale_dtype == "q8":
        if q.scale_codes is None or q.scale_ref is None:
            raise ValueError(f"{name}: q8 scales need scale_codes and scale_ref")
        expect = q.scale_ref.detach().cpu().float() * Q8_TABLE[q.scale_codes.detach().cpu().long()]
    else:
        expect = s.to(torch.float16 if spec.scale_dtype == "fp16" else torch.bfloat16).float()
    if not torch.equal(expect, s):
        raise ValueError(f"{name}: scales are not exactly representable as {spec.scale_dtype}")


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor's coded streams: name -> (transform, coder id, blob), in payload order."""

    streams: dict[str, tuple[int, int, bytes]]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, _, b in self.streams.values())


def encode_tensor(q: Quantized, coder: str | int = "auto", name: str = "tensor", *,
                  parallel: bool = True) -> EncodedTensor:
    """Code every stream of a Quantized (exactly what the container stores for it).

    `parallel`: code a large stream's candidates in the codec's thread pool (False when
    the caller already runs in that pool).
    """
    _check_quantized(q, name)
    scales = _np(q.scales).astype(np.float32) if not q.spec.is_float else None
    descs = _stream_descs(q.spec, q.shape, scales)
    data = _stream_bytes(q)
    # A named coder is forced on the quantized (int/ternary) codes only, the stream coders are
    # compared on; float bytes, scales and zero points stay "auto" (spec/FORMAT.md "Coders").
    return EncodedTensor({k: encode_stream(data[k], d, _stream_coder(coder, q.spec, k), parallel=parallel)
                          for k, d in descs.items()})


def _stream_coder(coder: str | int, spec: QuantSpec, stream: str) -> str | int:
    """The coder a stream is written with: a forced coder applies to int/ternary codes only."""
    return coder if stream == "codes" and not spec.is_float else "auto"


def encoded_size(x: torch.Tensor | Quantized, spec: QuantSpec | str | None = None,
                 coder: str | int = "auto", *, parallel: bool = True) -> int:
    """Exact payload bytes the container spends on one tensor (codes + scales + zero points).

    `x` is a float tensor (quantized under `spec`) or a `Quantized` (spec ignored).  The
    header entry (name, shape, scheme, lengths, CRC; ~20–60 bytes before header
    compression) is not included.  `parallel`: as in `encode_tensor` (False when called
    from a task of the codec's thread pool).
    """
    if not isinstance(x, Quantized):
        if spec is None:
            raise ValueError("encoded_size: a spec is needed to quantize a tensor")
        x = quantize(x, QuantSpec.parse(spec) if isinstance(spec, str) else spec)
    return encode_tensor(x, coder, parallel=parallel).nbytes


# ----------------------------------------------------------------------------- info

@dataclass
class ArtifactInfo:
    """Sizes of an artifact, as `pgolf inspect --json` prints them (bytes, bits)."""

    total_bytes: int
    model_bytes: int  # everything but the code section: header, fixed bytes, tensor payloads
    code_bytes: int  # the compressed code section
    header_bytes: int  # the fixed 20 bytes + the stored header
    format_version: str
    tensors: list[dict] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(t["numel"] for t in self.tensors)

    @property
    def headroom_bytes(self) -> int:
        return BUDGET_BYTES - self.total_bytes

    def to_dict(self) -> dict:
        params = self.params
        return {"total_bytes": self.total_bytes, "model_bytes": self.model_bytes, "code_bytes": self.code_bytes,
                "header_bytes": self.header_bytes, "format_version": self.format_version,
                "budget_bytes": BUDGET_BYTES, "headroom_bytes": self.headroom_bytes, "params": params,
                "bits_per_param": 8 * self.total_bytes / params if params else 0.0,
                "tensors": self.tensors}


def _tensor_info(entry: dict, spec: QuantSpec, coders: dict[str, int], sizes: dict[str, int],
                 codes_head: bytes = b"") -> dict:
    """Per-tensor facts for `inspect`; ``codes_head``: the first byte of the codes blob, which
    names the rANS model (reported as ``rans_model``) when the codes are rANS-coded."""
    numel = math.prod(entry["shape"])
    nbytes = sum(sizes.values())
    info = {"name": entry["name"], "shape": list(entry["shape"]), "numel": numel, "scheme": str(spec),
            "bits": spec.bits, "coder": CODERS[coders["codes"]].name, "bytes": nbytes,
            "bits_per_param": 8 * nbytes / numel if numel else 0.0,
            "stream_bytes": dict(sizes), "dtype": entry["dtype"]}
    if coders["codes"] == RansCoder.id and codes_head:
        info["rans_model"] = RANS_MODEL_NAMES.get(codes_head[0], "unknown")  # a coder-4 blob's first byte
    return info


# ----------------------------------------------------------------------------- writing

def _canonical(obj: Any, where: str = "metadata") -> Any:
    """Metadata as msgpack-able plain data with sorted keys (determinism); ValueError otherwise."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, int) and not isinstance(obj, bool) and not -(1 << 63) <= obj < 1 << 64:
            raise ValueError(f"{where}: integer {obj} does not fit in 64 bits")
        return obj
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError(f"{where}: keys must be strings")
        return {k: _canonical(obj[k], f"{where}.{k}") for k in sorted(obj)}
    raise ValueError(f"{where}: {type(obj).__name__} cannot be stored (use str, int, float, bool, None, list, dict)")


def build_artifact(tensors: Mapping[str, torch.Tensor | Quantized], recipe: Recipe | str | QuantSpec,
                   *, metadata: Mapping[str, Any] | None = None, code: Mapping[str, str] | None = None,
                   coder: str | int = "auto", limits: Limits = Limits()) -> tuple[bytes, ArtifactInfo]:
    """The artifact bytes (deterministic: same inputs, same bytes) and their `ArtifactInfo`.

    tensors: name -> float tensor (quantized by the first matching `recipe` rule) or an
    already `Quantized` tensor (e.g. from GPTQ; the recipe is not consulted).  Tensors are
    stored sorted by name; `code` files (name -> source text) likewise.  ValueError for
    anything a reader with `limits` would refuse (names, shapes, element counts) and for
    values the scheme cannot hold (non-finite, or beyond its float or scale range).
    `coder`: "auto" (per stream, the smallest), or a coder name or id forced on the codes of
    int/ternary tensors; every other stream (float bytes, scales, zero points, code) stays "auto".
    """
    recipe = Recipe.coerce(recipe)
    if coder != "auto":
        coder_by_name(coder)
    names = sorted(tensors)
    if len(names) > limits.max_tensors:
        raise ValueError(f"{len(names)} tensors, readers accept at most {limits.max_tensors}")
    total = 0
    for name in names:
        if not isinstance(name, str) or not name or len(name.encode()) > limits.max_name_bytes:
            raise ValueError(f"tensor name {name!r} must be a non-empty string of at most {limits.max_name_bytes} bytes")
        x = tensors[name]
        if not isinstance(x, Quantized) and not (isinstance(x, torch.Tensor) and x.dtype in _SOURCE_DTYPES):
            raise ValueError(f"tensor {name!r}: expected a float tensor, got {getattr(x, 'dtype', type(x))}")
        try:  # the reader's own rule, so that nothing is written that readers refuse
            total += math.prod(check_shape(list(x.shape), limits, f"tensor {name!r}"))
        except FormatError as e:
            raise ValueError(f"{e} (readers refuse it)") from None
        if total > limits.max_total_elements:
            raise ValueError(f"tensors hold more than {limits.max_total_elements:,} elements in all (readers refuse "
                             "it; raise Limits.max_total_elements / --max-elements)")

    def prepare(name: str) -> tuple[Quantized, str, EncodedTensor]:
        x = tensors[name]
        if isinstance(x, Quantized):
            q, dtype = x, "float32"
        else:
            spec = recipe.spec_for(name)
            try:
                q = quantize(x, spec)
                check_representable(x, q)
            except ValueError as e:
                raise ValueError(f"tensor {name!r} ({spec}): {e}") from None
            dtype = _SOURCE_DTYPES[x.dtype]
        return q, dtype, encode_tensor(q, coder, name, parallel=False)

    # Tensors are quantized and coded concurrently (torch, numba, zlib, lzma and zstd release
    # the GIL); results are assembled in name order, so the bytes do not depend on timing.
    prepared = list(thread_pool().map(prepare, names)) if len(names) > 1 else [prepare(n) for n in names]
    entries, blobs, infos = [], [], []
    offset = 0
    for name, (q, dtype, enc) in zip(names, prepared):
        payload = b"".join(b for _, _, b in enc.streams.values())
        entry = {"name": name, "shape": list(q.shape), "dtype": dtype, "scheme": str(q.spec), "offset": offset,
                 "crc": zlib.crc32(payload)}
        entry.update({k: [t, c, len(b)] for k, (t, c, b) in enc.streams.items()})
        entries.append(entry)
        blobs.append(payload)
        infos.append(_tensor_info(entry, q.spec, {k: c for k, (_, c, _) in enc.streams.items()},
                                  {k: len(b) for k, (_, _, b) in enc.streams.items()}, enc.streams["codes"][2][:1]))
        offset += len(payload)
    files = sorted((code or {}).items())
    for fname, text in files:
        if not isinstance(fname, str) or not isinstance(text, str):
            raise ValueError(f"code file {fname!r}: needs a str name and str source")
        why = code_name_error(fname, limits)
        if why:
            raise ValueError(f"code file {fname!r}: the name {why} (readers refuse it)")
    code_raw = b"".join(t.encode("utf-8") for _, t in files)
    c_t, c_id, code_blob = encode_stream(np.frombuffer(code_raw, np.uint8), StreamDesc(len(code_raw)), "auto")
    header = {"tensors": entries, "metadata": _canonical(dict(metadata or {})),
              "code": {"files": [[n, len(t.encode("utf-8"))] for n, t in files], "coder": c_id,
                       "offset": offset, "length": len(code_blob), "crc": zlib.crc32(code_blob)}}
    packed = msgpack.packb(header, use_bin_type=True)
    hcoding, hstored = 0, packed
    zstandard = zstd_module()
    if zstandard is not None:  # without zstandard the header stays plain: a writer's choice (spec §1)
        zh = zstandard.ZstdCompressor(level=22, write_checksum=False, write_content_size=True,
                                      write_dict_id=False).compress(packed)
        if len(zh) < len(packed):
            hcoding, hstored = 1, zh
    body = _PREFIX.pack(MAGIC, MAJOR, MINOR, hcoding, 0, len(hstored), len(packed)) + hstored
    body += b"".join(blobs) + code_blob
    data = body + struct.pack("<I", zlib.crc32(body))
    info = ArtifactInfo(total_bytes=len(data), model_bytes=len(data) - len(code_blob), code_bytes=len(code_blob),
                        header_bytes=FIXED_BYTES + len(hstored), format_version=FORMAT_VERSION, tensors=infos)
    return data, info


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write via a temp file in the same directory, then rename (mode per umask); never
    clobbers unless asked (`FileExistsError`).  See `pgolf_codec.atomic.atomic_write`."""
    atomic_write(path, data, overwrite=overwrite)


def write_artifact(path: str | Path, tensors: Mapping[str, torch.Tensor | Quantized],
                   recipe: Recipe | str | QuantSpec, *, metadata: Mapping[str, Any] | None = None,
                   code: Mapping[str, str] | None = None, coder: str | int = "auto",
                   max_bytes: int | None = None, overwrite: bool = False, limits: Limits = Limits()) -> ArtifactInfo:
    """Quantize, code and write an artifact atomically; returns its `ArtifactInfo`.

    Raises `ArtifactTooLarge` (nothing written) when the file would exceed `max_bytes`,
    `FileExistsError` when `path` exists and `overwrite` is False.
    """
    data, info = build_artifact(tensors, recipe, metadata=metadata, code=code, coder=coder, limits=limits)
    if max_bytes is not None and len(data) > max_bytes:
        raise ArtifactTooLarge(f"artifact would be {len(data):,} bytes, over the limit of {max_bytes:,} "
                               f"(model {info.model_bytes:,} + code {info.code_bytes:,})")
    write_bytes_atomic(path, data, overwrite=overwrite)
    return info


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class CodeStream:
    """A tensor's codes as stored, before the unpack transform (what a GPU loader uploads).

    payload: uint8 1-D, validated: `ceil(n·bits/8)` bit-packed bytes (5 trits per byte for
      ternary) with zero padding when `packed`, else one code per byte, every code below
      `spec.levels`; n = prod(shape), row-major.
    scales: float32 (rows, n_groups); zeros: uint8 (rows, n_groups) or None (as `Quantized`).
    """

    spec: QuantSpec
    shape: tuple[int, ...]
    payload: np.ndarray
    packed: bool
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def to_quantized(self) -> Quantized:
        """The same tensor as a `Quantized` for dequantizing (codes unpacked on the host; q8
        exponent codes are not carried, so it is not a write-ready `Quantized` for q8)."""
        rows, row_len = rows_view_shape(self.shape)
        codes = self.payload
        if self.packed:
            n = rows * row_len
            codes = bitpack.unpack_trits(codes, n) if self.spec.kind == "ternary" else bitpack.unpack(
                codes, self.spec.bits, n)
        return Quantized(self.spec, self.shape, torch.from_numpy(codes).reshape(rows, row_len), self.scales,
                         self.zeros)


@dataclass
class Artifact:
    """A decoded artifact: float32 tensors, the Quantized they came from, metadata, code, sizes.

    `streams` holds the int/ternary tensors as `CodeStream`s instead of `quantized` when the
    artifact was read with `unpack=False`; `tensors` covers both.
    """

    quantized: dict[str, Quantized]
    metadata: dict
    code: dict[str, str]
    info: ArtifactInfo
    streams: dict[str, CodeStream] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> float32 CPU tensor (dequantized on first access), in header order."""
        if self._tensors is None:
            qs = {**self.quantized, **{k: c.to_quantized() for k, c in self.streams.items()}}
            self._tensors = {k: dequantize(qs[k]) for k in sorted(qs)}
        return self._tensors


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field(d: Mapping, key: str, kind, where: str):
    if key not in d:
        raise BadHeader(f"{where}: missing field {key!r}")
    v = d[key]
    ok = _is_int(v) if kind is int else isinstance(v, kind)
    if not ok:
        raise BadHeader(f"{where}: field {key!r} has type {type(v).__name__}, expected {getattr(kind, '__name__', kind)}")
    return v


def code_name_error(name: str, limits: Limits = Limits()) -> str | None:
    """Why `name` is not a valid code-file name (spec §2), or None: a relative path of
    1..`limits.max_name_bytes` UTF-8 bytes whose `/`-separated parts are non-empty, not `.`
    or `..`, and hold no `\\`, `:` or control character (nothing can escape the folder it
    is unpacked into)."""
    try:
        nbytes = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if not 1 <= nbytes <= limits.max_name_bytes:
        return f"must be 1..{limits.max_name_bytes} UTF-8 bytes"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' path part (or a leading, trailing or double '/')"
    if any(ch in "\\:" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return "contains '\\', ':' or a control character"
    return None


def _u32(v: Any, where: str) -> int:
    if not _is_int(v) or not 0 <= v < 1 << 32:
        raise BadHeader(f"{where} must be an unsigned 32-bit integer")
    return v


def _parse_prefix(data: bytes, limits: Limits) -> tuple[int, bytes]:
    """Check fixed bytes, lengths and the file CRC; return (payload start, stored header)."""
    if len(data) > limits.max_file_bytes:
        raise LimitExceeded(f"file is {len(data)} bytes, limit {limits.max_file_bytes}")
    if data[:4] != MAGIC[: len(data[:4])]:
        raise BadMagic(f"not a pgolf artifact: magic {data[:4]!r}, expected {MAGIC!r}")
    if len(data) < FIXED_BYTES:
        raise Truncated(f"file is {len(data)} bytes, shorter than the {FIXED_BYTES}-byte minimum")
    magic, major, minor, hcoding, flags, hlen, hraw = _PREFIX.unpack_from(data)
    if major != MAJOR:
        raise UnsupportedVersion(f"format major version {major} (this reader implements {MAJOR}.x)")
    if hcoding not in (0, 1) or flags != 0:
        raise BadHeader(f"unknown header coding {hcoding} or flags {flags}")
    if hlen > len(data) - FIXED_BYTES:
        raise Truncated(f"header declares {hlen} bytes, only {len(data) - FIXED_BYTES} follow")
    if hraw > limits.max_header_bytes:
        raise LimitExceeded(f"header declares {hraw} decoded bytes, limit {limits.max_header_bytes}")
    if hcoding == 0 and hraw != hlen:
        raise BadHeader("uncompressed header with differing stored and decoded lengths")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise ChecksumMismatch("file CRC-32 does not match (corrupted or truncated file)")
    return _PREFIX.size + hlen, data[_PREFIX.size:_PREFIX.size + hlen]


def _decode_header(stored: bytes, hcoding_raw: tuple[int, int]) -> dict:
    hcoding, hraw = hcoding_raw
    if hcoding == 1:
        zstandard = require_zstd("the header")
        try:
            if zstandard.frame_content_size(stored) != hraw:
                raise BadHeader("compressed header size does not match its declared length")
            raw = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(
                stored, max_output_size=max(hraw, 1), allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise BadHeader(f"header does not decompress: {e}") from None
        if len(raw) != hraw:
            raise BadHeader("header decompresses to the wrong length")
    else:
        raw = stored
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise BadHeader(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise BadHeader("header is not a map")
    return header


def _check_entry(e: Any, i: int, limits: Limits,
                 decode_limits: bool = True) -> tuple[QuantSpec, tuple[int, ...], dict[str, StreamDesc]]:
    """(spec, shape, stream descriptors) of one header entry; `decode_limits=False` skips the
    element and stream-size limits (a header-only read allocates nothing they bound)."""
    where = f"tensor #{i}"
    if not isinstance(e, dict):
        raise BadHeader(f"{where}: entry is not a map")
    name = _field(e, "name", str, where)
    where = f"tensor {name[:80]!r}"
    if not name or len(name.encode()) > limits.max_name_bytes:
        raise BadHeader(f"{where}: name is empty or longer than {limits.max_name_bytes} bytes")
    shape = check_shape(_field(e, "shape", list, where), limits, where, elements=decode_limits)
    if _field(e, "dtype", str, where) not in _SOURCE_DTYPES.values():
        raise BadHeader(f"{where}: unknown source dtype {e['dtype']!r}")
    try:
        scheme = _field(e, "scheme", str, where)
        if any(ch.isspace() for ch in scheme):
            raise ValueError(f"scheme {scheme!r} contains whitespace")
        spec = QuantSpec.parse(scheme)
    except ValueError as err:
        raise BadHeader(f"{where}: {err}") from None
    _u32(e.get("crc"), f"{where}: crc")
    descs = _stream_descs(spec, shape)
    for k, d in descs.items():
        if decode_limits and d.nbytes > limits.max_stream_bytes:
            raise LimitExceeded(f"{where}: {k} stream of {d.nbytes:,} bytes, limit {limits.max_stream_bytes:,}")
        s = _field(e, k, list, where)
        if len(s) != 3 or not all(_is_int(v) and v >= 0 for v in s):
            raise BadHeader(f"{where}: {k} must be [transform, coder, length]")
    for k in ("codes", "scales", "zeros"):
        if k not in descs and k in e:
            raise BadHeader(f"{where}: scheme {spec} has no {k} stream")
    return spec, shape, descs


@dataclass
class _Layout:
    """A validated header and where everything lies (byte offsets into the file)."""

    header_bytes: int  # fixed bytes + stored header
    payload_start: int
    metadata: dict
    tensors: list[tuple[dict, QuantSpec, tuple[int, ...], dict[str, StreamDesc]]]
    files: list[list]  # [name, decoded byte length] of every code file
    code_raw_len: int
    code_coder: int
    code_start: int
    code_len: int
    code_crc: int


def _layout(data: bytes, limits: Limits, decode_limits: bool = True) -> _Layout:
    """Parse the prefix and header and check every rule that needs no payload decoding:
    lengths, CRCs (file, tensors, code section), layout and limits (element and stream
    limits only with `decode_limits`).  Allocates nothing sized by a declared length."""
    payload_start, stored = _parse_prefix(data, limits)
    header = _decode_header(stored, (data[6], struct.unpack_from("<I", data, 12)[0]))
    payload_end = len(data) - 4
    entries = _field(header, "tensors", list, "header")
    if len(entries) > limits.max_tensors:
        raise LimitExceeded(f"{len(entries)} tensors, limit {limits.max_tensors}")
    metadata = _field(header, "metadata", dict, "header")
    code_hdr = _field(header, "code", dict, "header")
    checked, names, total, offset = [], set(), 0, 0
    mv = memoryview(data)
    for i, e in enumerate(entries):
        spec, shape, descs = _check_entry(e, i, limits, decode_limits)
        if e["name"] in names:
            raise BadHeader(f"duplicate tensor name {e['name']!r}")
        if checked and e["name"].encode() < checked[-1][0]["name"].encode():
            raise BadHeader(f"tensor {e['name']!r}: tensors are not sorted by name (UTF-8 bytes)")
        names.add(e["name"])
        total += math.prod(shape)
        if decode_limits and total > limits.max_total_elements:
            raise LimitExceeded(f"tensors declare more than {limits.max_total_elements:,} elements in all "
                                f"(raise Limits.max_total_elements / --max-elements)")
        if _field(e, "offset", int, f"tensor {e['name']!r}") != offset:
            raise BadHeader(f"tensor {e['name']!r}: offset {e['offset']} != {offset} (streams must be contiguous)")
        span = sum(e[k][2] for k in descs)
        if payload_start + offset + span > payload_end:
            raise Truncated(f"tensor {e['name']!r} ends past the end of the payload")
        if zlib.crc32(mv[payload_start + offset:payload_start + offset + span]) != e["crc"]:
            raise ChecksumMismatch(f"tensor {e['name']!r}: payload CRC-32 mismatch")
        offset += span
        checked.append((e, spec, shape, descs))
    files = _field(code_hdr, "files", list, "code")
    if len(files) > limits.max_code_files:
        raise LimitExceeded(f"{len(files)} code files, limit {limits.max_code_files}")
    if not all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and f[0] and _is_int(f[1])
               and f[1] >= 0 for f in files):
        raise BadHeader("code: files must be [name, byte length] pairs")
    if len({f[0] for f in files}) != len(files):
        raise BadHeader("code: duplicate file name")
    for f in files:
        why = code_name_error(f[0], limits)
        if why:
            raise BadHeader(f"code: file name {f[0][:80]!r} {why}")
    if any(a[0].encode() > b[0].encode() for a, b in zip(files, files[1:])):
        raise BadHeader("code: files are not sorted by name (UTF-8 bytes)")
    code_raw_len = sum(f[1] for f in files)
    if code_raw_len > limits.max_code_bytes:
        raise LimitExceeded(f"code section declares {code_raw_len} bytes, limit {limits.max_code_bytes}")
    c_coder = _field(code_hdr, "coder", int, "code")
    c_len = _field(code_hdr, "length", int, "code")
    if _field(code_hdr, "offset", int, "code") != offset or c_len < 0:
        raise BadHeader("code section must directly follow the tensor payloads")
    if payload_start + offset + c_len != payload_end:
        raise (Truncated if payload_start + offset + c_len > payload_end else BadHeader)(
            f"declared payload ends at {payload_start + offset + c_len}, file payload ends at {payload_end}")
    cstart = payload_start + offset
    if zlib.crc32(mv[cstart:cstart + c_len]) != _u32(code_hdr.get("crc"), "code: crc"):
        raise ChecksumMismatch("code section CRC-32 mismatch")
    return _Layout(FIXED_BYTES + len(stored), payload_start, metadata, checked, files, code_raw_len, c_coder,
                   cstart, c_len, code_hdr["crc"])


@dataclass
class ArtifactHeader:
    """What the header of an artifact says, read without decoding any payload (`inspect`).

    info: sizes as `ArtifactInfo`; metadata; code_files: names in the code section;
    over_limits: why a full read with the given `Limits` would refuse the file
    (the `LimitExceeded` message), or None when it is within them.
    """

    info: ArtifactInfo
    metadata: dict
    code_files: list[str]
    over_limits: str | None = None


def _info(data: bytes, lay: _Layout) -> ArtifactInfo:
    infos = []
    for e, spec, _, descs in lay.tensors:
        start = lay.payload_start + e["offset"]
        head = data[start:start + min(e["codes"][2], 1)]
        infos.append(_tensor_info(e, spec, {k: e[k][1] for k in descs}, {k: e[k][2] for k in descs}, head))
    return ArtifactInfo(total_bytes=len(data), model_bytes=len(data) - lay.code_len, code_bytes=lay.code_len,
                        header_bytes=lay.header_bytes, format_version=f"{data[4]}.{data[5]}", tensors=infos)


def read_header_bytes(data: bytes, limits: Limits = Limits()) -> ArtifactHeader:
    """Validate an artifact's structure and checksums and describe it, decoding no payload:
    memory is the file's bytes plus its header, whatever sizes the header declares."""
    data = bytes(data)
    lay = _layout(data, limits, decode_limits=False)
    try:
        _layout(data, limits)
        over = None
    except LimitExceeded as e:
        over = str(e)
    return ArtifactHeader(_info(data, lay), lay.metadata, [f[0] for f in lay.files], over)


def read_header(path: str | Path, limits: Limits = Limits()) -> ArtifactHeader:
    """`read_header_bytes` of a file (at most `limits.max_file_bytes` are read)."""
    return read_header_bytes(_read_file(Path(path), limits), limits)


def read_artifact_bytes(data: bytes, limits: Limits = Limits(), *, unpack: bool = True) -> Artifact:
    """Validate and decode an artifact held in memory (see `read_artifact`)."""
    data = bytes(data)
    lay = _layout(data, limits)
    quantized, code_streams = {}, {}
    mv = memoryview(data)
    for e, spec, shape, descs in lay.tensors:
        pos = lay.payload_start + e["offset"]
        raw_codes = not unpack and not spec.is_float
        streams = {}
        for k, d in descs.items():
            t, c, n = e[k]
            try:
                if raw_codes and k == "codes":
                    streams[k] = _code_payload(mv[pos:pos + n], t, c, d, spec, limits)
                else:
                    streams[k] = decode_stream(mv[pos:pos + n], t, c, d, limits)
            except FormatError as err:
                raise type(err)(f"tensor {e['name']!r} {k}: {err}") from None
            pos += n
        if raw_codes:
            scales, zeros, _, _ = _tables(spec, shape, streams, e["name"])
            payload, packed = streams["codes"]
            code_streams[e["name"]] = CodeStream(spec, shape, payload, packed, scales, zeros)
        else:
            quantized[e["name"]] = _to_quantized(spec, shape, streams, e["name"])
    try:
        raw = decode_stream(mv[lay.code_start:lay.code_start + lay.code_len], 0, lay.code_coder,
                            StreamDesc(lay.code_raw_len), limits).tobytes()
    except FormatError as err:
        raise type(err)(f"code section: {err}") from None
    code, pos = {}, 0
    for fname, n in lay.files:
        try:
            code[fname] = raw[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise BadPayload(f"code file {fname!r} is not valid UTF-8") from None
        pos += n
    return Artifact(quantized=quantized, metadata=lay.metadata, code=code, info=_info(data, lay), streams=code_streams)


def _code_payload(blob: memoryview, transform: int, coder_id: int, desc: StreamDesc, spec: QuantSpec,
                  limits: Limits) -> tuple[np.ndarray, bool]:
    """(validated code stream before the unpack transform, packed?) of an int/ternary tensor."""
    data = decode_coded(blob, transform, coder_id, desc, limits)
    packed = transform == TRANSFORM_PACKED
    check_stream(torch.from_numpy(data), desc.nbytes, spec, packed)
    return data, packed


def _tables(spec: QuantSpec, shape: tuple[int, ...], streams: dict[str, np.ndarray], name: str):
    """(scales float32 (rows, ng), zeros uint8 or None, q8 codes or None, q8 ref or None), validated."""
    rows, row_len = rows_view_shape(shape)
    ng = n_groups(row_len, spec.group)
    sraw = streams["scales"]
    sc = ref = None
    if spec.scale_dtype == "q8":
        ref = torch.from_numpy(sraw[:4].view("<f4").astype(np.float32)).reshape(())
        sc = torch.from_numpy(sraw[4:].copy()).reshape(rows, ng)
        scales = ref * Q8_TABLE[sc.long()]
        bad_ref = not (math.isfinite(float(ref)) and float(ref) >= 0)
    else:
        if spec.scale_dtype == "bf16":
            scales = torch.from_numpy(sraw.view("<i2").astype(np.int16)).view(torch.bfloat16).float()
        else:
            scales = torch.from_numpy(sraw.view("<f2").astype(np.float16)).float()
        scales = scales.reshape(rows, ng)
        bad_ref = False
    # >= 2^-126: a subnormal scale (e.g. q8's ref·T[e] underflowing) could be flushed to zero
    # on some devices, so the values would depend on where they are decoded
    if bad_ref or (scales.numel() and not bool((torch.isfinite(scales) & (scales >= _MIN_SCALE)).all())):
        raise BadPayload(f"tensor {name!r}: scales must be finite and at least 2^-126 (no zero or subnormal)")
    zeros = None if spec.symmetric else torch.from_numpy(streams["zeros"]).reshape(rows, ng)
    return scales, zeros, sc, ref


def _to_quantized(spec: QuantSpec, shape: tuple[int, ...], streams: dict[str, np.ndarray], name: str) -> Quantized:
    rows, row_len = rows_view_shape(shape)
    if spec.is_float:
        raw = streams["codes"]
        if spec.kind == "bf16":
            codes = torch.from_numpy(raw.view("<i2").astype(np.int16)).view(torch.bfloat16)
        else:
            codes = torch.from_numpy(raw.view("<f2" if spec.kind == "fp16" else "<f4").astype(
                np.float16 if spec.kind == "fp16" else np.float32))
        return Quantized(spec, shape, codes.reshape(rows, row_len), torch.zeros((rows, 0)))
    scales, zeros, sc, ref = _tables(spec, shape, streams, name)
    codes = torch.from_numpy(streams["codes"]).reshape(rows, row_len)
    return Quantized(spec, shape, codes, scales, zeros, sc, ref)


def _read_file(path: Path, limits: Limits) -> bytes:
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise LimitExceeded(f"{path}: file is {size:,} bytes, limit {limits.max_file_bytes:,}")
    with open(path, "rb") as f:
        return f.read(limits.max_file_bytes + 1)


def read_artifact(path: str | Path, limits: Limits = Limits(), *, unpack: bool = True) -> Artifact:
    """Read, validate and decode an artifact file.  Any defect raises a `FormatError` subclass.

    Every declared size is checked against `limits` before anything is decoded
    (`LimitExceeded`).  unpack=False: int/ternary tensors come back as `Artifact.streams`
    (`CodeStream`: the codes as stored, bit-packed or one per byte, validated) instead of
    `Artifact.quantized`.
    """
    return read_artifact_bytes(_read_file(Path(path), limits), limits, unpack=unpack)


def load(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """name -> float32 tensor on `device`, dequantized there (bit-identical on CPU and CUDA).

    On CUDA with Triton, the stored code bytes go to the device and one kernel pass per
    tensor expands them (`load_to_device`); otherwise codes are unpacked on the host and
    dequantized on `device` with torch.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and gpu.kernels_available(dev):
        return load_to_device(path, dev)
    art = read_artifact(path)
    out = {}
    for name, q in art.quantized.items():
        moved = Quantized(q.spec, q.shape, q.codes.to(dev), q.scales.to(dev),
                          None if q.zeros is None else q.zeros.to(dev), q.scale_codes, q.scale_ref)
        out[name] = dequantize(moved)
    return out


def load_to_device(path: str | Path, device: str | torch.device = "cuda",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read an artifact and return name -> tensor (original shape, `dtype`) on `device`.

    The file is validated and entropy-decoded on the host, but the codes are not unpacked
    there (`read_artifact(..., unpack=False)`): the stored code bytes (bit-packed, 5 trits per
    byte, or one code per byte) and the small scale/zero tables go to the device, and one
    kernel pass per tensor (`gpu.dequantize_packed`) expands them, so at most ~b/8 bytes per
    weight cross the bus.
    With dtype=float32 the result is bit-identical to `read_artifact(path).tensors`, which is
    also what a device without kernels gets.
    """
    if dtype not in gpu.OUT_DTYPES:
        raise ValueError(f"dtype: expected one of {gpu.OUT_DTYPES}, got {dtype}")
    dev = torch.device(device)
    art = read_artifact(path, unpack=False)
    out: dict[str, torch.Tensor] = {}
    for name, q in art.quantized.items():  # float passthrough tensors
        out[name] = q.codes.to(dev, non_blocking=True).float().reshape(q.shape).to(dtype)
    for name, cs in art.streams.items():
        # The container validated the stream on the host (length, padding, alphabet).
        payload = torch.from_numpy(cs.payload).to(dev, non_blocking=True)
        zeros = None if cs.zeros is None else cs.zeros.to(dev, non_blocking=True)
        out[name] = gpu.dequantize_packed(payload, cs.shape, cs.spec, cs.scales.to(dev, non_blocking=True), zeros,
                                          dtype, packed=cs.packed, validate=False)
    return {k: out[k] for k in sorted(out)}
