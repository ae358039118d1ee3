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

"auto" is exact best-of on small streams.  On a one-code-per-byte stream of at least
`EXACT_MAX_BYTES` it first asks whether the bytes have structure beyond their symbol
frequencies (repeats, or order-1 context), comparing with a fixed permutation of the same
bytes; without such structure a general compressor (`Coder.general`) cannot beat rANS,
which codes at the order-0 entropy, so only the other coders run.  Results are cached by
content, so a stream sized by `encoded_size` and then written is coded once.

`zstandard` is optional at run time: it is imported on first use; without it "auto" skips
coder 1 and decoding a zstd stream raises `UnsupportedCoder` naming the package.
"""
from __future__ import annotations

import hashlib
import lzma
import math
import os
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

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


def zstd_module() -> ModuleType | None:
    """The `zstandard` module, or None when it is not installed (it is imported lazily)."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def require_zstd(what: str) -> ModuleType:
    """The `zstandard` module; `UnsupportedCoder` naming the missing package otherwise."""
    z = zstd_module()
    if z is None:
        raise UnsupportedCoder(f"{what} is zstd-coded and the 'zstandard' package is not installed "
                               "(pip install zstandard)")
    return z


class Coder:
    """Base class of a registered coder; subclasses set `id`, `name` and implement both methods.

    `general`: a general-purpose byte compressor (LZ family), whose only gain over the
    order-0 entropy of a stream comes from repeats and context; "auto" skips it on large
    streams that have neither.  Default False: a coder is always tried.
    """

    id: int = -1
    name: str = ""
    general: bool = False

    def supports(self, ctx: CoderContext) -> bool:
        """Whether "auto" should try this coder on a stream (default: always)."""
        return True

    def encode(self, data: np.ndarray, ctx: CoderContext) -> bytes:
        raise NotImplementedError

    def decode(self, blob: bytes, ctx: CoderContext) -> np.ndarray:
        raise NotImplementedError


# Content-addressed cache of coded streams: `encoded_size` during bit allocation and the
# final write code the same streams; the second time is a lookup.  Bounded by blob bytes.
_CACHE: OrderedDict[tuple, tuple[int, int, bytes]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_MAX_BYTES = 256 << 20
_cache_bytes = 0


def _digest(a: np.ndarray | None) -> bytes:
    return b"" if a is None else hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8), digest_size=16).digest()


def _cache_put(key: tuple, value: tuple[int, int, bytes]) -> None:
    global _cache_bytes
    with _CACHE_LOCK:
        if key in _CACHE:
            return
        _CACHE[key] = value
        _cache_bytes += len(value[2])
        while _cache_bytes > _CACHE_MAX_BYTES and _CACHE:
            _cache_bytes -= len(_CACHE.popitem(last=False)[1][2])


def clear_cache() -> None:
    """Forget every cached stream encoding."""
    global _cache_bytes
    with _CACHE_LOCK:
        _CACHE.clear()
        _cache_bytes = 0


CODERS: dict[int, Coder] = {}


def register(coder: Coder) -> Coder:
    """Add a coder to the registry (ids 0..15, unique id and name); clears the encode cache."""
    if not (isinstance(coder.id, int) and 0 <= coder.id <= MAX_CODER_ID):
        raise ValueError(f"coder id must be 0..{MAX_CODER_ID}, got {coder.id!r}")
    clash = [c for c in CODERS.values() if c.name == coder.name and c.id != coder.id]
    if coder.id in CODERS or clash:
        raise ValueError(f"coder {coder.id} ({coder.name}) is already registered")
    CODERS[coder.id] = coder
    clear_cache()  # cached "auto" choices may change with a new candidate
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

    id, name, general = 1, "zstd", True

    def __init__(self, level: int = 22):
        self.level = level

    def supports(self, ctx):
        return zstd_module() is not None

    def encode(self, data, ctx):
        zstandard = require_zstd("coder 1")
        c = zstandard.ZstdCompressor(level=self.level, write_checksum=False, write_content_size=True,
                                     write_dict_id=False, threads=0)
        return c.compress(np.ascontiguousarray(data, dtype=np.uint8).tobytes())

    def decode(self, blob, ctx):
        zstandard = require_zstd("this stream")
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
    id, name, general = 2, "lzma", True

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

    id, name, general = 3, "zlib", True

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


EXACT_MAX_BYTES = 1 << 16  # "auto" tries every candidate on streams shorter than this
_STRUCTURE_GAIN = 0.005  # a probe must gain this fraction over the permuted bytes to count
_PERMUTE_SEED = 0x9E3779B9
_POOL: ThreadPoolExecutor | None = None
_PARALLEL_MIN_BYTES = 1 << 18  # below this, thread hand-off costs more than it saves


def thread_pool() -> ThreadPoolExecutor:
    """The codec's shared worker pool (the compressors and numba kernels release the GIL).

    Tasks submitted here must not wait on other tasks of this pool (no nesting): callers
    that fan out over tensors run each tensor's candidates inline.
    """
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="pgolf-codec")
    return _POOL


def _order1_bits(x: np.ndarray) -> float:
    """Empirical conditional entropy H(x[i] | x[i-1]) · (n-1), in bits."""
    joint = np.bincount(x[:-1].astype(np.int64) * 256 + x[1:], minlength=1 << 16).reshape(256, 256)
    ctx = joint.sum(axis=1, keepdims=True)
    nz = joint > 0
    return float(-(joint[nz] * np.log2((joint / np.maximum(ctx, 1))[nz])).sum())


def _lz_probe_bytes(x: np.ndarray) -> int:
    """Size under a fast LZ pass whose window covers the whole stream (zstd level 1 with
    long-distance matching; zlib level 1 when zstandard is missing)."""
    z = zstd_module()
    if z is None:
        return len(zlib.compress(x.tobytes(), 1))
    params = z.ZstdCompressionParameters.from_level(
        1, source_size=x.size, window_log=min(27, max(10, (x.size - 1).bit_length())), enable_ldm=True)
    return len(z.ZstdCompressor(compression_params=params).compress(x.tobytes()))


def has_structure(data: np.ndarray) -> bool:
    """Whether a byte stream has structure a general compressor could use beyond its byte
    frequencies: repeats (a fast LZ probe) or order-1 context (conditional entropy).

    Each statistic is compared with the same statistic of a fixed-seed permutation of the
    bytes: same frequencies, no structure, so estimator bias and the probe's own overhead
    cancel and the answer does not hinge on a calibrated threshold.  Deterministic.
    """
    x = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    if x.size < 2:
        return False
    perm = np.random.default_rng(_PERMUTE_SEED).permutation(x)
    keep = 1.0 - _STRUCTURE_GAIN
    if _order1_bits(x) < keep * _order1_bits(perm):
        return True
    return _lz_probe_bytes(x) < keep * _lz_probe_bytes(perm)


def encode_stream(data: np.ndarray, desc: StreamDesc, coder: str | int = "auto",
                  limits: Limits = Limits(), *, exhaustive: bool = False,
                  parallel: bool = True) -> tuple[int, int, bytes]:
    """Code one stream: (transform id, coder id, blob), the smallest over the candidates.

    `coder="auto"` tries every registered coder that `supports` the stream under every valid
    transform, except that on a one-code-per-byte stream of at least `EXACT_MAX_BYTES` with
    no structure (`has_structure`) the `general` coders are skipped (`exhaustive=True` keeps
    them).  A named coder tries only the transforms.  Ties go to the lowest coder id, then
    the lowest transform id, so the result is deterministic.  `parallel`: run the candidates
    of a large stream in `thread_pool()` (pass False from inside that pool).
    """
    data = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    if data.size != desc.nbytes:
        raise ValueError(f"stream has {data.size} bytes, descriptor says {desc.nbytes}")
    auto = coder == "auto"
    coders = sorted(CODERS.values(), key=lambda c: c.id) if auto else [coder_by_name(coder)]
    key = (_digest(data), desc.nbytes, desc.alphabet, desc.width, desc.rows, desc.row_len, _digest(desc.scales),
           tuple(c.id for c in coders), exhaustive, zstd_module() is not None)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if (auto and not exhaustive and desc.width == 1 and desc.nbytes >= EXACT_MAX_BYTES
            and not has_structure(data)):
        coders = [c for c in coders if not getattr(c, "general", False)]
    cands = []
    for t in desc.transforms():
        ctx = _transformed_ctx(t, desc, limits)
        td = _forward(data, t, desc)
        cands += [(c, t, td, ctx) for c in coders if not auto or c.supports(ctx)]
    run = lambda cand: cand[0].encode(cand[2], cand[3])  # noqa: E731
    if parallel and len(cands) > 1 and desc.nbytes >= _PARALLEL_MIN_BYTES:
        blobs = list(thread_pool().map(run, cands))
    else:
        blobs = [run(c) for c in cands]
    best = min(range(len(cands)), key=lambda i: (len(blobs[i]), cands[i][0].id, cands[i][1]))
    out = (cands[best][1], cands[best][0].id, bytes(blobs[best]))
    _cache_put(key, out)
    return out


def decode_coded(blob: bytes, transform: int, coder_id: int, desc: StreamDesc,
                 limits: Limits = Limits()) -> np.ndarray:
    """The coder's output for a stream, before the inverse transform: uint8 of exactly the
    transformed length (`ceil(n·bits/8)` / `ceil(n/5)` bytes when packed).  Only the coder
    has run; the caller validates the bytes (`decode_stream` unpacks and checks them)."""
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
    return data.ravel()


def decode_stream(blob: bytes, transform: int, coder_id: int, desc: StreamDesc,
                  limits: Limits = Limits()) -> np.ndarray:
    """Inverse of `encode_stream`: uint8[desc.nbytes]; `FormatError` on any inconsistency."""
    out = _inverse(decode_coded(blob, transform, coder_id, desc, limits), transform, desc)
    if desc.alphabet < 256 and out.size and int(out.max()) >= desc.alphabet:
        raise BadPayload(f"code {int(out.max())} is outside the alphabet of {desc.alphabet}")
    return out

from .rans import RansCoder  # noqa: E402  (coder 4; rans.py does not import this module)
register(RansCoder())
