"""Token shards in the challenge's binary format.

A shard is a 256-entry little-endian int32 header (``[0] = 20240520`` magic, ``[1] = 1`` version,
``[2] = token count``, the rest zero) followed by ``count`` little-endian uint16 tokens, so the
file is exactly ``1024 + 2 * count`` bytes. Every document starts with BOS (id 1); there is no EOS,
and a document may continue into the next shard. Files are named ``fineweb_train_%06d.bin`` and
``fineweb_val_%06d.bin``; the same header format holds a per-token byte sidecar
(``fineweb_val_bytes_%06d.bin``, one uint16 byte count per token).

The official FineWeb sp1024 shards of the challenge are read as they are.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
DEFAULT_SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val", "val_bytes")
# Present in a directory while `pgolf data prepare` is still building it (removed as its last step).
INCOMPLETE_MARKER = ".pgolf-incomplete"
_MAX_COUNT = 2**31 - 1  # the count lives in an int32


class ShardError(ValueError):
    """A shard file breaks a rule of the format; the message names the file and the rule."""

    def __init__(self, path: str | os.PathLike, rule: str, detail: str) -> None:
        self.path = str(path)
        self.rule = rule
        super().__init__(f"{self.path}: {rule}: {detail}")


def shard_name(split: str, index: int) -> str:
    """The challenge's file name for shard ``index`` of ``split`` (``train``, ``val``, ``val_bytes``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown shard split {split!r}; expected one of {SPLITS}")
    if not 0 <= index <= 999_999:
        raise ValueError(f"shard index {index} outside 0..999999")
    return f"fineweb_{split}_{index:06d}.bin"


def check_complete(directory: str | os.PathLike) -> None:
    """Refuse a directory that `pgolf data prepare` had not finished (it holds the marker)."""
    if (Path(directory) / INCOMPLETE_MARKER).exists():
        raise ShardError(directory, "unfinished dataset",
                         f"{INCOMPLETE_MARKER} is present: `pgolf data prepare` did not finish here; prepare it again")


def list_shards(directory: str | os.PathLike, split: str, *, allow_incomplete: bool = False) -> list[Path]:
    """The shards of ``split`` in ``directory``, in index order.

    Only exact ``fineweb_{split}_NNNNNN.bin`` names match, so ``val`` never picks up the
    ``val_bytes`` sidecars. A directory that `pgolf data prepare` had not finished is refused
    (``ShardError``) unless ``allow_incomplete``, so no loader reads half a dataset.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown shard split {split!r}; expected one of {SPLITS}")
    pattern = re.compile(rf"fineweb_{split}_(\d{{6}})\.bin")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"shard directory not found: {directory}")
    if not allow_incomplete:
        check_complete(directory)
    found = [(m.group(1), p) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and file size of a shard; returns its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(path, "truncated header", f"file is {size} bytes, the header alone is {HEADER_BYTES}")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if int(header[0]) != MAGIC:
        raise ShardError(path, "bad magic", f"header[0] = {int(header[0])}, expected {MAGIC}")
    if int(header[1]) != VERSION:
        raise ShardError(path, "unsupported version", f"header[1] = {int(header[1])}, expected {VERSION}")
    count = int(header[2])
    if count < 0:
        raise ShardError(path, "bad token count", f"header[2] = {count} is negative")
    if size != HEADER_BYTES + 2 * count:
        raise ShardError(path, "size mismatch",
                         f"header says {count} tokens, so {HEADER_BYTES + 2 * count} bytes; file is {size} bytes")
    return count


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a validated shard; returns its tokens, uint16 of shape ``(count,)`` (read-only).

    With ``vocab_size``, every token must be below it (one vectorized pass over the shard).
    """
    path = Path(path)
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise ShardError(path, "token out of vocabulary",
                             f"token {int(tokens[where])} at position {where} >= vocab size {vocab_size}")
    return tokens.view(np.ndarray) if tokens.dtype == np.uint16 else tokens.astype(np.uint16)


def _as_uint16(tokens: np.ndarray | list[int], path: Path) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size > _MAX_COUNT:
        raise ValueError(f"{path}: {arr.size} tokens exceed the int32 count of the header")
    if arr.size and arr.dtype != np.uint16:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: tokens must be integers, got {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{path}: tokens must fit uint16, got range [{lo}, {hi}]")
    return arr.astype("<u2", copy=False)


def write_atomic(path: str | os.PathLike, parts: list[bytes], *, overwrite: bool = False) -> None:
    """Write ``parts`` to ``path`` through a temp file in the same directory and a rename, so
    readers see the old file or the complete new one; refuses an existing file unless ``overwrite``."""
    from pgolf_codec.atomic import atomic_write  # mode per umask, fsync, no clobber

    atomic_write(path, parts, overwrite=overwrite)


def write_shard(path: str | os.PathLike, tokens: np.ndarray | list[int], *, overwrite: bool = False) -> Path:
    """Write ``tokens`` (integers in 0..65535, shape ``(n,)``) as a shard, atomically.

    The file appears complete or not at all (temp file in the same directory, then rename);
    an existing file is only replaced with ``overwrite=True``.
    """
    path = Path(path)
    data = _as_uint16(tokens, path)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, data.size)
    write_atomic(path, [header.tobytes(), data.tobytes()], overwrite=overwrite)
    return path


def document_starts(tokens: np.ndarray, bos_id: int = BOS_ID) -> np.ndarray:
    """Start offsets (int64, ascending) of the documents in a token stream: the BOS positions."""
    return np.flatnonzero(np.asarray(tokens) == bos_id)


class ShardWriter:
    """Streams tokens of one split into consecutive shards of ``shard_tokens`` tokens each.

    Documents are cut at shard boundaries exactly as the challenge's shards are (the stream is
    continuous); memory stays at one shard's worth of tokens.
    """

    def __init__(self, directory: str | os.PathLike, split: str, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 *, overwrite: bool = False) -> None:
        if not 1 <= shard_tokens <= _MAX_COUNT:
            raise ValueError(f"shard_tokens must be in 1..{_MAX_COUNT}, got {shard_tokens}")
        self.directory = Path(directory)
        self.split = split
        self.shard_tokens = shard_tokens
        self.overwrite = overwrite
        self.paths: list[Path] = []
        self.tokens_written = 0
        self._buf = np.empty(shard_tokens, dtype=np.uint16)
        self._fill = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens (uint16-compatible, shape ``(n,)``), writing every shard that fills up."""
        tokens = np.asarray(tokens)
        pos = 0
        while pos < tokens.size:
            take = min(self.shard_tokens - self._fill, tokens.size - pos)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        path = self.directory / shard_name(self.split, len(self.paths))
        write_shard(path, self._buf[:self._fill], overwrite=self.overwrite)
        self.paths.append(path)
        self.tokens_written += self._fill
        self._fill = 0

    def close(self) -> list[Path]:
        """Write the last partial shard; returns every shard path written."""
        if self._fill:
            self._flush()
        return self.paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def _mix64(h):
    # splitmix64 finalizer: spreads FNV's weak high bits so distinct documents rarely collide
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _doc_hash_kernel(tokens, bos, h, length, started, out, out_len):
    """FNV-1a over the 16-bit tokens of each BOS-started document; the state carries across shards."""
    n = 0
    prime = np.uint64(0x100000001B3)
    for i in range(tokens.shape[0]):
        t = tokens[i]
        if t == bos:
            if started and length > 0:
                out[n] = _mix64(h ^ np.uint64(length))
                out_len[n] = length
                n += 1
            h = np.uint64(0xCBF29CE484222325)
            length = 0
            started = True
        elif started:
            h = (h ^ np.uint64(t)) * prime
            length += 1
    return n, h, length, started


try:  # numba makes the scan run at memory speed; the plain loop is the same algorithm
    from pgolf_codec.jit import njit  # without the on-disk cache where there is nowhere to keep it

    _mix64 = njit()(_mix64)
    _doc_hash_kernel = njit()(_doc_hash_kernel)
except ImportError:  # pragma: no cover
    pass


def document_hashes(paths: list[Path] | list[str], bos_id: int = BOS_ID) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the token sequence of every non-empty document in ``paths`` (in order).

    Documents may span shards. Returns ``(hashes uint64[D], lengths int64[D])``, lengths in tokens
    without BOS; tokens before the first BOS (a document continued from elsewhere) are ignored.
    """
    hashes, lengths = [], []
    h, length, started = np.uint64(0), 0, False
    for path in paths:
        tokens = read_shard(path)
        cap = int(np.count_nonzero(tokens == bos_id)) + 1
        out, out_len = np.empty(cap, np.uint64), np.empty(cap, np.int64)
        n, h, length, started = _doc_hash_kernel(tokens, np.uint16(bos_id), np.uint64(h), length, started, out, out_len)
        hashes.append(out[:n])
        lengths.append(out_len[:n])
    if started and length > 0:  # the last document ends with the stream
        hashes.append(np.array([_mix64(np.uint64(h) ^ np.uint64(length))], np.uint64))
        lengths.append(np.array([length], np.int64))
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(hashes), np.concatenate(lengths)
