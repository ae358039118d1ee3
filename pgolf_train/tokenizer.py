"""SentencePiece tokenizers and exact byte accounting for bits per byte.

bpb divides nats by the UTF-8 bytes the tokens stand for, so the byte count must be exact. The
rule is the challenge's own (``build_sentencepiece_luts``): a target token ``t`` after a previous
token ``p`` counts ``base_bytes[t] + (has_leading_space[t] and not is_boundary[p])`` bytes, where
``base_bytes`` is the UTF-8 length of the piece with its leading "▁" removed, byte-fallback pieces
``<0xNN>`` count 1, and control/unknown/unused pieces count 0 and are the boundary tokens.
A per-token byte sidecar (``fineweb_val_bytes_%06d.bin``) overrides the tables for tokenizers
whose pieces do not spell the text directly.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from .shards import BOS_ID, ShardError, list_shards, read_shard

SPACE_PIECE = "\u2581"  # "▁", SentencePiece's visible space
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
MIN_BPE_VOCAB = 4 + 256 + 1  # specials + the 256 byte-fallback pieces + at least one merge/char


@dataclass(frozen=True)
class ByteTables:
    """Per-token byte lookup tables, each of shape ``(V,)``.

    ``base_bytes`` (int16): UTF-8 bytes of the piece without its leading "▁";
    ``has_leading_space`` (bool): the piece starts with "▁" (one more byte unless after a boundary);
    ``is_boundary`` (bool): control, unknown, unused, or beyond the tokenizer's vocabulary.
    """

    base_bytes: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray

    def __post_init__(self) -> None:
        shapes = {a.shape for a in (self.base_bytes, self.has_leading_space, self.is_boundary)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"ByteTables arrays must be 1-D of one length, got shapes {sorted(shapes)}")

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.shape[0])

    def to_torch(self, device="cpu"):
        """The three tables as torch tensors (int16, bool, bool) on ``device``, for GPU evaluation."""
        import torch

        return (torch.as_tensor(self.base_bytes, device=device),
                torch.as_tensor(self.has_leading_space, device=device),
                torch.as_tensor(self.is_boundary, device=device))


def load_sentencepiece(model: str | os.PathLike | spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor from a ``.model`` path (or the processor itself)."""
    if isinstance(model, spm.SentencePieceProcessor):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:  # sentencepiece reports a bad proto as RuntimeError
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None


def byte_tables(model: str | os.PathLike | spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteTables:
    """Byte tables of a SentencePiece model, padded to ``vocab_size`` (the model's embedding rows)
    with boundary entries that count 0 bytes, as the challenge does."""
    sp = load_sentencepiece(model)
    n = sp.vocab_size()
    size = max(n, vocab_size or 0)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


def token_bytes(tokens: np.ndarray, tables: ByteTables, prev_tokens: np.ndarray) -> np.ndarray:
    """Bytes of each target token given the token before it; int32 of the shape of ``tokens``."""
    t = np.asarray(tokens, dtype=np.int64)
    p = np.asarray(prev_tokens, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"tokens {t.shape} and prev_tokens {p.shape} must have one shape")
    v = tables.vocab_size
    for name, a in (("tokens", t), ("prev_tokens", p)):
        if a.size and (int(a.min()) < 0 or int(a.max()) >= v):
            raise ValueError(f"{name} hold ids outside the byte tables' vocabulary 0..{v - 1}")
    out = tables.base_bytes[t].astype(np.int32)
    out += tables.has_leading_space[t] & ~tables.is_boundary[p]
    return out


def count_bytes(tokens: np.ndarray, tables: ByteTables, prev_tokens: np.ndarray) -> int:
    """Total bytes of ``tokens`` (targets) given ``prev_tokens`` (one per target, same shape)."""
    return int(token_bytes(tokens, tables, prev_tokens).sum(dtype=np.int64))


def val_bytes(tokens: np.ndarray, tables: ByteTables, sidecar: np.ndarray | None = None) -> int:
    """Bytes of the targets ``tokens[1:]`` of a stream (each predicted from the one before).

    With a per-token ``sidecar`` (the byte counts of the same stream, shape of ``tokens``), the
    sidecar decides instead of the tables.
    """
    tokens = np.asarray(tokens)
    if sidecar is not None:
        sidecar = np.asarray(sidecar)
        if sidecar.shape != tokens.shape:
            raise ValueError(f"byte sidecar {sidecar.shape} does not match tokens {tokens.shape}")
        return int(sidecar[1:].sum(dtype=np.int64))
    return count_bytes(tokens[1:], tables, tokens[:-1])


def load_byte_sidecar(data_dir: str | os.PathLike) -> np.ndarray | None:
    """The concatenated val byte sidecars of ``data_dir`` (uint16, one per val token), or None.

    Sidecar shard ``i`` must hold exactly as many entries as val shard ``i``.
    """
    sidecars = list_shards(data_dir, "val_bytes")
    if not sidecars:
        return None
    vals = list_shards(data_dir, "val")
    if len(sidecars) != len(vals):
        raise ShardError(data_dir, "byte sidecar mismatch", f"{len(sidecars)} byte sidecars for {len(vals)} val shards")
    parts = []
    for side, val in zip(sidecars, vals):
        b = read_shard(side)
        n = read_shard(val).size
        if b.size != n:
            raise ShardError(side, "byte sidecar mismatch", f"{b.size} entries for {n} tokens in {val.name}")
        parts.append(b)
    return np.concatenate(parts)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_info(model: str | os.PathLike) -> dict:
    """``{"name", "sha256", "vocab_size"}`` as the artifact metadata records a tokenizer."""
    sp = load_sentencepiece(model)
    return {"name": Path(model).name, "sha256": file_sha256(model), "vocab_size": int(sp.vocab_size())}


def check_space_piece(model: str | os.PathLike | spm.SentencePieceProcessor) -> None:
    """Refuse a tokenizer that cannot spell a lone space as one one-byte piece.

    Without a plain "▁" piece, a space before punctuation or digits falls back to a byte or an
    unknown piece; the first wastes tokens, the second silently loses the byte from bpb.
    """
    sp = load_sentencepiece(model)
    sid = sp.piece_to_id(SPACE_PIECE)
    if sp.id_to_piece(sid) != SPACE_PIECE or sp.is_unknown(sid) or sp.is_control(sid) or sp.is_unused(sid):
        raise ValueError('tokenizer has no usable "\u2581" piece: a lone space cannot be encoded as one byte')
    tables = byte_tables(sp)
    for left, right in (("x", "."), ("a", "1"), ("word", ",")):
        ids = sp.encode(f"{left} {right}")
        cheap = len(sp.encode(left)) + 1 + len(sp.encode(right))
        if len(ids) > cheap or val_bytes(np.array([BOS_ID, *ids]), tables) != len(left) + 1 + len(right):
            raise ValueError(f'tokenizer spells the space in "{left} {right}" as {[sp.id_to_piece(i) for i in ids]}: '
                             'not one one-byte piece')


def _sentences(texts: Iterable[str], max_bytes: int, max_sentence_bytes: int) -> Iterator[str]:
    """Lines of ``texts`` (documents) up to ``max_bytes`` of UTF-8 in total.

    Documents are fed as lines because SentencePiece silently drops "sentences" longer than
    ``max_sentence_length``; the nmt_nfkc normalizer turns newlines into spaces anyway.
    """
    used = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            size = len(line.encode("utf-8"))
            if size > max_sentence_bytes:  # cut overlong lines instead of losing them
                line = line.encode("utf-8")[:max_sentence_bytes].decode("utf-8", "ignore")
                size = len(line.encode("utf-8"))
            if used + size > max_bytes:
                return
            used += size
            yield line


def explain_training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's trainer error (``INTERNAL: src/...cc(638) [check] text``) as a plain sentence."""
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        need = int(m.group(2))
        return (f"vocab size {vocab_size} is too small for this text: it needs at least {need} pieces "
                f"({need - 256 - len(SPECIAL_IDS)} characters covering 99.9% of the sample, 256 byte-fallback "
                f"pieces and {len(SPECIAL_IDS)} special ones)")
    if m := re.search(r"too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        return (f"vocab size {vocab_size} is too large for the training sample: it allows at most "
                f"{m.group(2)} pieces; use a smaller vocab or more text")
    if "sentences_.empty()" in message:
        return "no text to train the tokenizer on: the sample is empty (no non-blank line within its size)"
    detail = re.sub(r"^\w+: \S+\(\d+\) \[.*?\]\s*", "", message).strip() or message
    return f"SentencePiece could not train a {vocab_size}-piece tokenizer: {detail}"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        v |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return v, i
        shift += 7


def _put_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field number, wire type, the field's whole encoding) of a protobuf message, in order."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _varint(buf, i)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"tokenizer model: unexpected protobuf wire type {wire}")
        yield key >> 3, wire, buf[start:i]


# SentencePiece's ModelProto field 2 is its TrainerSpec; there, field 2 is model_prefix and 16 num_threads.
_TRAINER_SPEC, _MODEL_PREFIX, _NUM_THREADS = 2, 2, 16


def _canonical_model(proto: bytes, name: str) -> bytes:
    """The model file with its training record made machine-independent: SentencePiece stores the
    output path it was given (here a temp name holding the process id) and the thread count, so
    the same tokenizer trained twice had two checksums. model_prefix becomes ``name``; num_threads,
    a property of the machine and not of the model, is dropped. Pieces and rules are untouched."""
    out = bytearray()
    for num, wire, enc in _fields(proto):
        if num != _TRAINER_SPEC or wire != 2:
            out += enc
            continue
        _, length_at = _varint(enc, 0)  # past the key
        _, body_at = _varint(enc, length_at)  # past the length
        spec = bytearray()
        for f, w, e in _fields(enc[body_at:]):
            if f == _MODEL_PREFIX and w == 2:
                raw = name.encode()
                spec += _put_varint((_MODEL_PREFIX << 3) | 2) + _put_varint(len(raw)) + raw
            elif f != _NUM_THREADS:
                spec += e
        out += _put_varint((_TRAINER_SPEC << 3) | 2) + _put_varint(len(spec)) + spec
    return bytes(out)


def train_tokenizer(texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int, *,
                    max_bytes: int = 200_000_000, num_threads: int | None = None,
                    max_sentence_bytes: int = 16384, overwrite: bool = False) -> Path:
    """Train a SentencePiece BPE tokenizer with the challenge's settings; returns ``PREFIX.model``.

    Settings: byte_fallback, split_digits, nmt_nfkc, no dummy prefix, pad/bos/eos/unk = 0/1/2/3,
    character_coverage 0.999. Only the first ``max_bytes`` of text (UTF-8) are read, which bounds
    memory; pass training documents only, never validation ones. Writes ``PREFIX.model`` and
    ``PREFIX.vocab`` through temp names and renames them into place.
    """
    if vocab_size < MIN_BPE_VOCAB or vocab_size > 65536:
        raise ValueError(f"vocab size {vocab_size} outside {MIN_BPE_VOCAB}..65536 "
                         "(byte fallback needs 260 pieces; shards hold uint16 ids)")
    prefix = Path(model_prefix)
    final = [prefix.with_name(prefix.name + ext) for ext in (".model", ".vocab")]
    if not overwrite and any(p.exists() for p in final):
        raise FileExistsError(f"{final[0]} exists; pass overwrite=True to replace it")
    tmp = prefix.with_name(f".{prefix.name}.{os.getpid()}.tmp")
    raised: list[BaseException] = []

    def sentences() -> Iterator[str]:  # SentencePiece turns the iterator's exceptions into RuntimeError
        try:
            yield from _sentences(texts, max_bytes, max_sentence_bytes)
        except BaseException as e:
            raised.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=str(tmp), model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False, character_coverage=0.999, max_sentence_length=max_sentence_bytes,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **SPECIAL_IDS)
        model_tmp = tmp.with_name(tmp.name + ".model")
        model_tmp.write_bytes(_canonical_model(model_tmp.read_bytes(), prefix.name))
        for ext, dst in zip((".model", ".vocab"), final):
            os.replace(tmp.with_name(tmp.name + ext), dst)
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a tiny sample
        if raised:  # a bad document (or a signal) while reading the text: that, not SentencePiece's wrapper
            raise raised[0] from None
        raise ValueError(explain_training_error(str(e), vocab_size)) from None
    finally:
        for ext in (".model", ".vocab"):
            tmp.with_name(tmp.name + ext).unlink(missing_ok=True)
    return final[0]
