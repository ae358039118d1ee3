"""Fuzzing the reader with >= 10,000 mutated artifacts: only FormatError, never a crash or hang.

Four mutation families, so that every layer is reached despite the checksums:
raw bytes (caught by the file CRC or the prefix checks), bytes with the file CRC repaired
(reaches the header parser), structured header edits re-serialized with valid lengths and
CRC (reaches schema validation), and payload edits with tensor and file CRCs repaired
(reaches the coders, transforms and code checks).
"""
from __future__ import annotations

import copy
import struct
import time
import zlib

import msgpack
import numpy as np
import pytest
import torch
import zstandard

import pgolf_codec as pc

LIMITS = pc.Limits(max_tensor_elements=1 << 20, max_total_elements=1 << 21, max_stream_bytes=1 << 22,
                   max_header_bytes=1 << 20, max_code_bytes=1 << 20)


def _bases() -> list[bytes]:
    torch.manual_seed(0)
    t = {"emb": torch.randn(6, 10) * 0.02, "norm": torch.ones(5), "w": torch.randn(4, 3, 2)}
    recipes = ["emb=int8:scale=q8;norm=fp16;*=int4:asym:group=4", "*=ternary", "emb=bf16;*=int3:sdclip=2:group=5",
               "*=int6:scale=bf16"]
    out = []
    for i, r in enumerate(recipes):
        for coder in ("auto", "raw", "zstd", "lzma", "zlib"):
            out.append(pc.build_artifact(t, r, metadata={"model_config": {"n": i}}, code={"m.py": "x = 1\n" * 5},
                                         coder=coder)[0])
    return out


def _split(data: bytes):
    _, _, _, hc, _, hlen, _ = struct.unpack_from("<4sBBBBII", data)
    stored = data[16:16 + hlen]
    raw = zstandard.ZstdDecompressor().decompress(stored) if hc == 1 else stored
    return msgpack.unpackb(raw), data[16 + hlen:-4]


def _join(header, payload: bytes, raw_header: bytes | None = None) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True) if raw_header is None else raw_header
    body = struct.pack("<4sBBBBII", b"PGLF", 1, 0, 0, 0, len(raw), len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _fix_crc(b: bytearray) -> bytes:
    b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def _mutate_bytes(rng, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.integers(6)
    if op == 0:  # bit flips
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(len(b))
            b[i] ^= 1 << rng.integers(8)
    elif op == 1:  # truncation
        return bytes(b[: rng.integers(len(b))])
    elif op == 2:  # extension
        return bytes(b) + bytes(rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8))
    elif op == 3:  # byte set to an extreme
        b[rng.integers(len(b))] = int(rng.choice([0, 0xFF, 0x7F, 0x80]))
    elif op == 4:  # delete a range
        i = rng.integers(len(b))
        del b[i: i + rng.integers(1, 16)]
    else:  # overwrite a u32 with a large length
        i = rng.integers(max(1, len(b) - 4))
        b[i:i + 4] = struct.pack("<I", int(rng.choice([0xFFFFFFFF, 1 << 30, len(b) + 1, 0])))
    return bytes(b)


_EVIL = [None, True, -1, 0, 1, 2, 3, 4, 15, 255, 1 << 31, 1 << 62, -(1 << 63), 2.5, "", "int9", "x" * 2000,
         [], [0, 0], [1, 2, 3], [0, 0, 1 << 40], {}, {"a": 1}, b"\x00", [[1, 1]], ["a", -1]]


def _walk(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _mutate_header(rng, header: dict) -> dict:
    paths = [p for p in _walk(header) if p]
    for _ in range(rng.integers(1, 3)):
        p = paths[rng.integers(len(paths))]
        parent = header
        try:
            for k in p[:-1]:
                parent = parent[k]
            op = rng.integers(4)
            if op == 0:
                parent[p[-1]] = _EVIL[rng.integers(len(_EVIL))]
            elif op == 1 and isinstance(parent, dict):
                del parent[p[-1]]
            elif op == 2:  # swap with another field's value
                q = paths[rng.integers(len(paths))]
                other = header
                for k in q:
                    other = other[k]
                parent[p[-1]] = copy.deepcopy(other)  # a copy: no cycles when other is an ancestor
            elif isinstance(parent[p[-1]], int) and not isinstance(parent[p[-1]], bool):  # extend / shrink
                parent[p[-1]] = parent[p[-1]] + int(rng.choice([-1, 1, 7, 1 << 20]))
        except (KeyError, IndexError, TypeError):
            pass
    return header


def _mutate_payload(rng, header: dict, payload: bytes) -> bytes:
    """Corrupt one tensor stream and repair its CRC so the decoders see the bytes."""
    p = bytearray(payload)
    t = header["tensors"][rng.integers(len(header["tensors"]))]
    span = sum(t[k][2] for k in ("codes", "scales", "zeros") if k in t)
    if span == 0:
        return _join(header, bytes(p))
    for _ in range(rng.integers(1, 3)):
        i = t["offset"] + rng.integers(span)
        p[i] = (p[i] ^ (1 << rng.integers(8))) if rng.integers(2) else int(rng.integers(256))
    t["crc"] = zlib.crc32(bytes(p[t["offset"]: t["offset"] + span]))
    return _join(header, bytes(p))


def _read(data: bytes, unpack: bool) -> str:
    try:
        pc.read_artifact_bytes(data, LIMITS, unpack=unpack)
    except pc.FormatError as e:
        return type(e).__name__
    return "ok"


def _check(data: bytes) -> str:
    """The outcome of reading `data`; reading the code streams without unpacking them (the
    GPU loader's path) must accept and reject exactly the same files, with the same error."""
    outcome = _read(data, True)
    assert _read(data, False) == outcome
    return outcome


def test_fuzz_mutated_artifacts_only_raise_format_error():
    bases = _bases()
    for b in bases:
        assert _check(b) == "ok"
    rng = np.random.default_rng(20240520)
    outcomes: dict[str, int] = {}
    n = 0
    start = time.monotonic()
    plan = [("bytes", 3000), ("bytes+crc", 2500), ("header", 3000), ("payload", 2000)]
    for family, count in plan:
        for _ in range(count):
            base = bases[rng.integers(len(bases))]
            if family == "bytes":
                data = _mutate_bytes(rng, base)
            elif family == "bytes+crc":
                data = _fix_crc(bytearray(_mutate_bytes(rng, base))) if len(base) > 24 else base
            elif family == "header":
                header, payload = _split(base)
                data = _join(_mutate_header(rng, header), payload)
            else:
                header, payload = _split(base)
                data = _mutate_payload(rng, header, payload)
            t0 = time.monotonic()
            try:
                result = _check(data)
            except Exception as e:  # the property under test: nothing but FormatError escapes
                pytest.fail(f"{family} mutation raised {type(e).__name__}: {e}")
            assert time.monotonic() - t0 < 5.0, f"{family} mutation took too long"
            key = f"{family}:{result}"
            outcomes[key] = outcomes.get(key, 0) + 1
            n += 1
    assert n >= 10_000
    # every family must mostly be rejected, and rejections must come from several rules
    for family, count in plan[:3]:  # payload edits of raw-coded codes are often valid codes
        ok = outcomes.get(f"{family}:ok", 0)
        assert ok < count * (0.5 if family == "header" else 0.2), (family, outcomes)
    names = {k.split(":")[1] for k in outcomes}
    assert {"ChecksumMismatch", "Truncated", "BadHeader", "BadPayload", "LimitExceeded"} <= names, outcomes
    print(f"{n} mutations in {time.monotonic() - start:.1f}s: {dict(sorted(outcomes.items()))}")
