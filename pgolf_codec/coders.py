"""Entropy stage: the coder registry, stream transforms, and best-of selection ("auto").

A payload *stream* is a byte string with a known decoded length (`StreamDesc`).  Before
the coder runs, a *transform* reshapes it (spec/FORMAT.md "Transforms"):
  0 bytes    as is: one code per byte (general compressors model this best), or raw
             little-endian float bytes;
  1 packed   codes bit-packed at ceil(log2 alphabet) bits (5 trits/byte for ternary);
  2 shuffle  byte planes of w-byte floats (all first bytes, then all second bytes, ...).
Coders (ids are part of the format): 0 raw, 1 zstd, 2 lzma, 3 zlib, 4 rANS
(`pgolf_codec/rans.py`), 5–15 reserved.  A new coder registers itself with `register`; the
container needs no change.  Decoders raise `FormatError` on any bad blob and never
produce (or allocate) more than `ctx.n` bytes.
"""
from __future__ import annotations

import lzma
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import zstandard

from . import bitpack
from .errors import BadPayload, FormatError, Limits, UnsupportedCoder

MAX_CODER_ID = 15
TRANSFORM_BYTES, TRANSFORM_PACKED, TRANSFORM_SHUFFLE = 0, 1, 2
TRANSFORM_NAMES = {TRANSFORM_BYTES: "bytes", TRANSFORM_PACKED: "packed", TRANSFORM_SHUFFLE: "shuffle"}


@dataclass(frozen=True)
class CoderContext:
    """What a coder knows about the stream it codes (all from the header, never the blob).

    n: bytes of the (transformed) stream; alphabet: exclusive bound on its byte values
    (2^bits or 3 for one code per byte, 256 otherwise); rows/row_len: the tensor's row view
    (codes streams; rows=1, row_len=n otherwise); scales: float32 (rows, n_groups) group
    scales for parametric coders (codes streams only, else None); limits: reader limits.
    """

    n: int
    alphabet: int = 256
    rows: int = 1
    row_len: int = 0
    scales: np.ndarray | None = None
    limits: Limits = field(default_factory=Limits)


class Coder:
    """Base class of a registered coder; subclasses set `id`, `name` and implement both methods."""

    id: int = -1
    name: str = ""

    def supports(self, ctx: CoderContext) -> bool:
        """Whether "auto" should try this coder on a stream (default: always)."""
        return True

    def encode(self, data: np.ndarray, ctx: CoderContext) -> bytes:
        raise NotImplementedError

    def decode(self, blob: bytes, ctx: CoderContext) -> np.ndarray:
        raise NotImplementedError


CODERS: dict[int, Coder] = {}


def register(coder: Coder) -> Coder:
    """Add a coder to the registry (ids 0..15, unique id and name)."""
    if not (isinstance(coder.id, int) and 0 <= coder.id <= MAX_CODER_ID):
        raise ValueError(f"coder id must be 0..{MAX_CODER_ID}, got {coder.id!r}")
    clash = [c for c in CODERS.values() if c.name == coder.name and c.id != coder.id]
    if coder.id in CODERS or clash:
        raise ValueError(f"coder {coder.id} ({coder.name}) is already registered")
    CODERS[coder.id] = coder
    return coder


def coder_by_name(name: str | int) -> Coder:
    """Registered coder by name ("zstd") or id; ValueError naming the known ones otherwise."""
    for c in CODERS.values():
        if c.name == name or c.id == name:
            return c
    known = ", ".join(c.name for c in sorted(CODERS.values(), key=lambda c: c.id))
    raise ValueError(f"unknown coder {name!r} (known: auto, {known})")


def _check_len(out: bytes, ctx: CoderContext, what: str) -> np.ndarray:
    if len(out) != ctx.n:
        raise BadPayload(f"{what} stream decodes to {len(out)} bytes, header declares {ctx.n}")
    return np.frombuffer(out, dtype=np.uint8).copy()


class RawCoder(Coder):
    id, name = 0, "raw"

    def encode(self, data, ctx):
        return np.ascontiguousarray(data, dtype=np.uint8).tobytes()

    def decode(self, blob, ctx):
        return _check_len(bytes(blob), ctx, "raw")


class ZstdCoder(Coder):
    """Zstandard frames with the content size (so decoders size buffers by it), no checksum."""

    id, name = 1, "zstd"

    def __init__(self, level: int = 22):
        self.level = level

    def encode(self, data, ctx):
        c = zstandard.ZstdCompressor(level=self.level, write_checksum=False, write_content_size=True,
                                     write_dict_id=False, threads=0)
        return c.compress(np.ascontiguousarray(data, dtype=np.uint8).tobytes())

    def decode(self, blob, ctx):
        blob = bytes(blob)
        try:
            size = zstandard.frame_content_size(blob)
            if size != ctx.n:  # -1 (unknown) or a mismatch: refuse before allocating
                raise BadPayload(f"zstd frame declares {size} bytes, header declares {ctx.n}")
            d = zstandard.ZstdDecompressor(max_window_size=1 << 27)
            out = d.decompress(blob, max_output_size=max(ctx.n, 1), allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise BadPayload(f"zstd: {e}") from None
        return _check_len(out, ctx, "zstd")


def _lzma_filters(n: int) -> list[dict]:
    # Raw LZMA2 (no .xz container: saves ~60 bytes a stream); the dictionary size follows
    # from the declared length so the decoder never reserves more than the stream needs.
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
             "dict_size": min(max(n, 4096), 1 << 26)}]


class LzmaCoder(Coder):
    id, name = 2, "lzma"

    def encode(self, data, ctx):
        return lzma.compress(np.ascontiguousarray(data, dtype=np.uint8).tobytes(),
                             format=lzma.FORMAT_RAW, filters=_lzma_filters(ctx.n))

    def decode(self, blob, ctx):
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(ctx.n))
        try:
            out = d.decompress(bytes(blob), max_length=ctx.n + 1)
        except lzma.LZMAError as e:
            raise BadPayload(f"lzma: {e}") from None
        if not d.eof or d.unused_data:
            raise BadPayload("lzma stream is truncated or has trailing bytes")
        return _check_len(out, ctx, "lzma")


class ZlibCoder(Coder):
    """Raw deflate (no zlib header/adler: the container has its own CRC), level 9."""

    id, name = 3, "zlib"

    def encode(self, data, ctx):
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        return c.compress(np.ascontiguousarray(data, dtype=np.uint8).tobytes()) + c.flush()

    def decode(self, blob, ctx):
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(bytes(blob), ctx.n + 1)
        except zlib.error as e:
            raise BadPayload(f"zlib: {e}") from None
        if not d.eof or d.unused_data:
            raise BadPayload("zlib stream is truncated or has trailing bytes")
        return _check_len(out, ctx, "zlib")


for _c in (RawCoder(), ZstdCoder(), LzmaCoder(), ZlibCoder()):
    register(_c)


@dataclass(frozen=True)
class StreamDesc:
    """A payload stream as the header determines it.

    nbytes: decoded length; alphabet: exclusive bound on byte values (256 = any);
    width: float element size for the shuffle transform (1 = not shufflable);
    rows/row_len/scales: passed to coders through `CoderContext` (codes streams).
    """

    nbytes: int
    alphabet: int = 256
    width: int = 1
    rows: int = 1
    row_len: int = 0
    scales: np.ndarray | None = field(default=None, compare=False)

    def transforms(self) -> tuple[int, ...]:
        """Transforms valid for this stream, in id order."""
        t = [TRANSFORM_BYTES]
        if self.alphabet < 256:
            t.append(TRANSFORM_PACKED)
        if self.width > 1:
            t.append(TRANSFORM_SHUFFLE)
        return tuple(t)

    def packed_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.alphabet)))


def _forward(data: np.ndarray, t: int, desc: StreamDesc) -> np.ndarray:
    if t == TRANSFORM_PACKED:
        return bitpack.pack_trits(data) if desc.alphabet == 3 else bitpack.pack(data, desc.packed_bits())
    if t == TRANSFORM_SHUFFLE:
        return np.ascontiguousarray(data.reshape(-1, desc.width).T).ravel()
    return data


def _transformed_ctx(t: int, desc: StreamDesc, limits: Limits) -> CoderContext:
    if t == TRANSFORM_PACKED:
        n = bitpack.trits_len(desc.nbytes) if desc.alphabet == 3 else bitpack.packed_len(desc.nbytes, desc.packed_bits())
        alphabet = 256
    else:
        n, alphabet = desc.nbytes, desc.alphabet if t == TRANSFORM_BYTES else 256
    return CoderContext(n=n, alphabet=alphabet, rows=desc.rows, row_len=desc.row_len or n,
                        scales=desc.scales, limits=limits)


def _inverse(data: np.ndarray, t: int, desc: StreamDesc) -> np.ndarray:
    if t == TRANSFORM_PACKED:
        if desc.alphabet == 3:
            return bitpack.unpack_trits(data, desc.nbytes)
        return bitpack.unpack(data, desc.packed_bits(), desc.nbytes)
    if t == TRANSFORM_SHUFFLE:
        return np.ascontiguousarray(data.reshape(desc.width, -1).T).ravel()
    return data


_POOL: ThreadPoolExecutor | None = None
_PARALLEL_MIN_BYTES = 1 << 18  # below this, thread hand-off costs more than it saves


def _map(fn, items: list) -> list:
    """Run candidate encodings in threads (the compressors release the GIL) for big streams."""
    global _POOL
    if len(items) < 2:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    return list(_POOL.map(fn, items))


def encode_stream(data: np.ndarray, desc: StreamDesc, coder: str | int = "auto",
                  limits: Limits = Limits()) -> tuple[int, int, bytes]:
    """Code one stream: (transform id, coder id, blob), the smallest over the candidates.

    `coder="auto"` tries every registered coder that `supports` the stream under every valid
    transform; a named coder tries only the transforms.  Ties go to the lowest coder id,
    then the lowest transform id, so the result is deterministic.
    """
    data = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    if data.size != desc.nbytes:
        raise ValueError(f"stream has {data.size} bytes, descriptor says {desc.nbytes}")
    coders = sorted(CODERS.values(), key=lambda c: c.id) if coder == "auto" else [coder_by_name(coder)]
    cands = []
    for t in desc.transforms():
        ctx = _transformed_ctx(t, desc, limits)
        td = _forward(data, t, desc)
        cands += [(c, t, td, ctx) for c in coders if coder != "auto" or c.supports(ctx)]
    blobs = (_map if desc.nbytes >= _PARALLEL_MIN_BYTES else lambda f, xs: [f(x) for x in xs])(
        lambda cand: cand[0].encode(cand[2], cand[3]), cands)
    best = min(range(len(cands)), key=lambda i: (len(blobs[i]), cands[i][0].id, cands[i][1]))
    return cands[best][1], cands[best][0].id, bytes(blobs[best])


def decode_stream(blob: bytes, transform: int, coder_id: int, desc: StreamDesc,
                  limits: Limits = Limits()) -> np.ndarray:
    """Inverse of `encode_stream`: uint8[desc.nbytes]; `FormatError` on any inconsistency."""
    if transform not in desc.transforms():
        raise BadPayload(f"transform {transform} is not valid for this stream")
    if coder_id not in CODERS:
        raise UnsupportedCoder(f"coder {coder_id} is not supported by this reader")
    ctx = _transformed_ctx(transform, desc, limits)
    try:
        data = CODERS[coder_id].decode(blob, ctx)
    except FormatError:
        raise
    except Exception as e:  # a third-party coder's bug must still surface as a format error
        raise BadPayload(f"coder {coder_id} failed: {type(e).__name__}: {e}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size != ctx.n:
        raise BadPayload(f"coder {coder_id} returned the wrong number of bytes")
    out = _inverse(data.ravel(), transform, desc)
    if desc.alphabet < 256 and out.size and int(out.max()) >= desc.alphabet:
        raise BadPayload(f"code {int(out.max())} is outside the alphabet of {desc.alphabet}")
    return out

from .rans import RansCoder  # noqa: E402  (coder 4; rans.py does not import this module)
register(RansCoder())
