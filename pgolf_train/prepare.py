"""Documents → tokenizer → challenge shards, and the checks that keep bpb honest.

``pgolf data prepare``: stream documents (``.jsonl``, ``.jsonl.xz``, ``.jsonl.zst``, ``.txt``),
hold out the first ``val_docs`` as validation, train a SentencePiece BPE tokenizer on a bounded
sample of the *training* documents only, tokenize on all cores, and write train/val shards, a
per-document hash sidecar and ``manifest.json``. Training documents identical (up to whitespace)
to a validation document are dropped, so the split cannot leak.

The dataset is built in a hidden sibling of ``--out`` (marked unfinished) and swapped in only when
complete, so a failed or interrupted run leaves the previous dataset as it was.

``pgolf data check``: proves the byte tables equal the UTF-8 length of the decoded val text,
document by document, and that no val document occurs in train; refuses an unfinished dataset, a
tokenizer other than the manifest's, shards that differ from the manifest, out-of-vocabulary train
tokens and a val stream that does not start with BOS.

``pgolf data sweep``: tokens per byte and embedding bytes per vocabulary size.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import io
import json
import lzma
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .shards import (BOS_ID, DEFAULT_SHARD_TOKENS, INCOMPLETE_MARKER, ShardError, ShardWriter, document_hashes,
                     document_starts, list_shards, read_header, read_shard, write_atomic)
from .staging import staged_directory
from .tokenizer import (MIN_BPE_VOCAB, byte_tables, check_space_piece, file_sha256, load_byte_sidecar,
                        load_sentencepiece, token_bytes, train_tokenizer)

MANIFEST = "manifest.json"
TOKENIZER_PREFIX = "tokenizer"
DOC_HASHES = "doc_hashes_{split}.bin"  # uint64 little-endian, one per kept document, input order
MAX_DOC_BYTES = 64 << 20  # a single input line/document larger than this is refused, not read
BATCH_BYTES = 1 << 20     # text per worker task: amortizes IPC, yet enough tasks to balance the pool
_SHARD_NAME = re.compile(r"fineweb_(train|val|val_bytes)_\d{6}\.bin")


class DocumentError(ValueError):
    """An input document file is malformed; the message names the file, line and problem."""


# ----------------------------------------------------------------------------------------- input

class _Counting(io.RawIOBase):
    """Counts bytes read from the underlying (possibly compressed) file, for progress and ETA."""

    def __init__(self, f) -> None:
        self.f, self.pos = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.pos += n or 0
        return n


def _open_text(path: Path, counter: _Counting) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".xz"):
        stream = lzma.open(counter)
    elif name.endswith(".zst"):
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(counter)
    else:
        stream = counter
    return io.TextIOWrapper(io.BufferedReader(stream) if stream is counter else stream, encoding="utf-8", newline="\n")


def _check_suffix(path: Path) -> None:
    name = path.name.lower()
    if not name.endswith((".jsonl", ".jsonl.xz", ".jsonl.zst", ".txt")):
        raise DocumentError(f"{path}: unsupported document file; expected .jsonl, .jsonl.xz, .jsonl.zst or .txt")


def iter_documents(path: str | os.PathLike, text_field: str = "text", progress: list[int] | None = None) -> Iterator[str]:
    """Documents of one file, in order.

    ``.jsonl*``: one JSON object per line, the document in ``text_field``. ``.txt``: documents
    separated by blank lines. ``progress[0]`` (if given) tracks the on-disk bytes consumed.
    """
    path = Path(path)
    _check_suffix(path)
    is_txt = path.name.lower().endswith(".txt")
    with open(path, "rb", buffering=0) as raw:
        counter = _Counting(raw)
        try:
            with _open_text(path, counter) as f:
                para: list[str] = []
                for lineno, line in enumerate(iter(lambda: f.readline(MAX_DOC_BYTES + 1), ""), 1):
                    if progress is not None:
                        progress[0] = counter.pos
                    if len(line) > MAX_DOC_BYTES:
                        raise DocumentError(f"{path}:{lineno}: line longer than {MAX_DOC_BYTES} characters")
                    if is_txt:
                        if line.strip():
                            para.append(line)
                        elif para:
                            yield "".join(para).rstrip("\n")
                            para = []
                        continue
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DocumentError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise DocumentError(f"{path}:{lineno}: no {text_field!r} field in the JSON object")
                    text = obj[text_field]
                    if not isinstance(text, str):
                        raise DocumentError(f"{path}:{lineno}: {text_field!r} is {type(text).__name__}, not a string")
                    yield text
                if para:
                    yield "".join(para).rstrip("\n")
        except UnicodeDecodeError as e:
            raise DocumentError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (lzma.LZMAError, EOFError) as e:
            raise DocumentError(f"{path}: corrupt xz stream ({e})") from None
        except Exception as e:  # zstandard raises its own ZstdError, not importable without the module
            if type(e).__name__ == "ZstdError":
                raise DocumentError(f"{path}: corrupt zstd stream ({e})") from None
            raise


def doc_hash(text: str) -> int:
    """64-bit hash of a document with whitespace runs collapsed (so re-wrapped copies still match)."""
    norm = " ".join(text.split()).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


class _Progress:
    """Periodic progress lines: documents, MB/s of text, tokens, and an ETA from input bytes read."""

    def __init__(self, label: str, total_input_bytes: int, every: float = 5.0) -> None:
        self.label, self.total, self.every = label, max(total_input_bytes, 1), every
        self.t0 = self.last = time.monotonic()

    def maybe(self, docs: int, text_bytes: int, tokens: int, input_done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(input_done / self.total, 1.0)
        eta = f"{dt * (1 - frac) / frac:.0f}s" if frac > 0 else "?"
        print(f"[{self.label}] {docs:,} docs  {text_bytes / 1e6:,.1f} MB text  {text_bytes / 1e6 / dt:.2f} MB/s  "
              f"{tokens:,} tokens  {100 * frac:.1f}% of input  ETA {eta}", flush=True)


def read_documents(paths: list[Path], text_field: str = "text", max_docs: int | None = None,
                   done: list[int] | None = None) -> Iterator[str]:
    """Documents of all files in order (at most ``max_docs``); ``done[0]`` = input bytes consumed."""
    done = [0] if done is None else done
    n, base = 0, 0
    for path in paths:
        pos = [0]
        for text in iter_documents(path, text_field, pos):
            if max_docs is not None and n >= max_docs:
                return
            done[0] = base + pos[0]
            n += 1
            yield text
        base += path.stat().st_size
        done[0] = base


# ---------------------------------------------------------------------------------- tokenizing

_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    _SP = load_sentencepiece(model_path)


def _encode_batch(texts: list[str]) -> np.ndarray:
    """BOS + tokens of each document, concatenated (uint16)."""
    ids = _SP.encode(texts, num_threads=1)  # parallelism comes from processes, not oversubscribed threads
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype=np.uint16)
    pos = 0
    for seq in ids:
        out[pos] = BOS_ID
        out[pos + 1:pos + 1 + len(seq)] = seq
        pos += 1 + len(seq)
    return out


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in docs:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(docs: Iterable[str], model_path: str | os.PathLike, workers: int = 1) -> Iterator[np.ndarray]:
    """Token arrays (BOS-prefixed documents, uint16) for ~1 MB batches of ``docs``, in input order."""
    yield from encode_batches(_batches(docs), model_path, workers)


def encode_batches(batches: Iterable[list[str]], model_path: str | os.PathLike, workers: int = 1) -> Iterator[np.ndarray]:
    """One token array (BOS-prefixed documents, uint16) per batch of documents, in order.

    With ``workers > 1`` batches are encoded by a process pool; at most ``2 * workers`` batches are
    in flight (``Pool.imap`` would read the whole input ahead), so memory stays bounded however
    long the input is.
    """
    if workers <= 1:
        _init_worker(str(model_path))
        for batch in batches:
            yield _encode_batch(batch)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ------------------------------------------------------------------------------------- prepare

_STRAY_TMP = re.compile(r"\.(fineweb_|doc_hashes_|manifest\.json|tokenizer\.).*\.tmp")


def _is_dataset_file(name: str) -> bool:
    """A file `prepare` writes (or an interrupted write left behind): replaced, never carried over."""
    return bool(_SHARD_NAME.fullmatch(name) or _STRAY_TMP.fullmatch(name)
                or name in (MANIFEST, INCOMPLETE_MARKER, *(DOC_HASHES.format(split=s) for s in ("train", "val"))))


def _existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if _is_dataset_file(p.name))


def check_document_files(paths: list[Path]) -> None:
    """Refuse, before anything is read or written, a document path that is missing or not a file."""
    if not paths:
        raise ValueError("no document files given")
    for p in paths:
        _check_suffix(p)
        if not p.exists():
            raise FileNotFoundError(f"document file not found: {p}")
        if not p.is_file():
            raise DocumentError(f"{p}: not a regular file (a directory, FIFO or device); give document files")


def _check_settings(vocab: int, val_docs: int, max_docs: int | None, shard_tokens: int, train_tok: bool,
                    tokenizer_sample_bytes: int) -> None:
    if val_docs < 1:
        raise ValueError(f"--val-docs must be >= 1, got {val_docs}")
    if max_docs is not None and max_docs <= val_docs:
        raise ValueError(f"--max-docs ({max_docs}) must exceed --val-docs ({val_docs}) to leave training documents")
    if not 1 <= shard_tokens <= 2**31 - 1:
        raise ValueError(f"--shard-tokens must be in 1..{2**31 - 1}, got {shard_tokens}")
    if train_tok and not MIN_BPE_VOCAB <= vocab <= 65536:
        raise ValueError(f"--vocab {vocab} is outside {MIN_BPE_VOCAB}..65536: a tokenizer needs 4 special and 256 "
                         "byte-fallback pieces plus the sample's characters, and shards hold uint16 ids")
    if train_tok and tokenizer_sample_bytes <= 0:
        raise ValueError(f"--tokenizer-sample-mb must be > 0 (got {tokenizer_sample_bytes / 1e6:g}): "
                         "the tokenizer trains on that much training text")


def _check_tokenizer(model_path: Path, vocab: int):
    sp = load_sentencepiece(model_path)
    if sp.vocab_size() != vocab:
        raise ValueError(f"tokenizer {model_path} has {sp.vocab_size()} pieces, not --vocab {vocab}")
    if sp.vocab_size() > 65536:
        raise ValueError(f"tokenizer {model_path} has {sp.vocab_size()} pieces; shards hold uint16 ids")
    check_space_piece(sp)
    return sp


def prepare(docs: list[str | os.PathLike], out_dir: str | os.PathLike, *, vocab: int, val_docs: int,
            tokenizer: str | os.PathLike | None = None, text_field: str = "text",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, max_docs: int | None = None, workers: int | None = None,
            tokenizer_sample_bytes: int = 100_000_000, force: bool = False, log_every: float = 5.0) -> dict:
    """Build a challenge-format data directory from documents; returns the manifest (also written
    to ``out_dir/manifest.json``).

    ``val_docs``: the first N documents (input order) form the val split. ``tokenizer``: reuse
    this SentencePiece model instead of training one (its vocab must equal ``vocab``); otherwise a
    BPE tokenizer is trained on the first ``tokenizer_sample_bytes`` of training text. Existing
    shards in ``out_dir`` are refused unless ``force``. The dataset is built in a hidden sibling
    directory and swapped in only when complete, so a failure (a bad input line, a signal) leaves
    the previous contents as they were; files of ``out_dir`` that prepare does not write are kept.
    """
    paths = [Path(p) for p in docs]
    check_document_files(paths)
    _check_settings(vocab, val_docs, max_docs, shard_tokens, tokenizer is None, tokenizer_sample_bytes)
    if tokenizer is not None:
        _check_tokenizer(Path(tokenizer), vocab)
    workers = max(1, workers or os.cpu_count() or 1)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    stale = _existing_outputs(out)
    if stale and not force:
        raise FileExistsError(f"{out} already holds prepared data ({stale[0].name}, ...); pass --force to replace it")
    model_out = out / f"{TOKENIZER_PREFIX}.model"
    if tokenizer is None and model_out.exists() and not force:
        raise FileExistsError(f"{model_out} exists; pass --force to retrain it")
    with staged_directory(out, carry=lambda name: not _is_dataset_file(name)) as work:
        manifest = _build(paths, work, vocab=vocab, val_docs=val_docs, tokenizer=tokenizer, text_field=text_field,
                          shard_tokens=shard_tokens, max_docs=max_docs, workers=workers,
                          tokenizer_sample_bytes=tokenizer_sample_bytes, log_every=log_every)
    print(f"[prepare] done: val {manifest['splits']['val']['docs']:,} docs / {manifest['splits']['val']['tokens']:,} "
          f"tokens, train {manifest['splits']['train']['docs']:,} docs / {manifest['splits']['train']['tokens']:,} "
          f"tokens, {manifest['train_docs_dropped_as_val_duplicates']} train duplicates of val dropped, "
          f"{manifest['seconds']:.1f}s -> {out}", flush=True)
    return manifest


def _build(paths: list[Path], out: Path, *, vocab: int, val_docs: int, tokenizer: str | os.PathLike | None,
           text_field: str, shard_tokens: int, max_docs: int | None, workers: int, tokenizer_sample_bytes: int,
           log_every: float) -> dict:
    """Tokenizer, shards, hashes and manifest of ``paths`` into the (empty, staging) directory ``out``."""
    total_input = sum(p.stat().st_size for p in paths)
    t_start = time.monotonic()

    # Pass 1 (only when training a tokenizer): the sample comes from training documents only.
    if tokenizer is None:
        done = [0]
        stream = read_documents(paths, text_field, max_docs, done)
        skipped = sum(1 for _ in zip(range(val_docs), stream))
        if skipped < val_docs:
            raise ValueError(f"inputs hold {skipped} documents, fewer than --val-docs {val_docs}")
        print(f"[prepare] training a {vocab}-piece BPE tokenizer on <= {tokenizer_sample_bytes / 1e6:.0f} MB "
              "of training text", flush=True)
        t0 = time.monotonic()
        try:
            model_path = train_tokenizer(stream, out / TOKENIZER_PREFIX, vocab, max_bytes=tokenizer_sample_bytes,
                                         num_threads=workers, overwrite=True)
        except DocumentError:
            raise
        except ValueError as e:
            raise ValueError(f"tokenizer training failed (--vocab {vocab}, --tokenizer-sample-mb "
                             f"{tokenizer_sample_bytes / 1e6:g}): {e}") from None
        stream.close()
        tok_record = {"trained": True, "sample_bytes_max": tokenizer_sample_bytes,
                      "seconds": round(time.monotonic() - t0, 2)}
        print(f"[prepare] tokenizer trained in {tok_record['seconds']:.1f}s", flush=True)
    else:
        model_path = Path(tokenizer)
        tok_record = {"trained": False, "source": str(model_path.resolve())}
    sp = _check_tokenizer(model_path, vocab)
    tok_record.update(path=str(model_path.name if model_path.parent == out else model_path),
                      sha256=file_sha256(model_path), vocab_size=int(sp.vocab_size()))

    # Pass 2: hash and split in this process, tokenize in the pool, stream into shards.
    stats = {s: {"docs": 0, "tokens": 0, "text_bytes": 0, "shards": 0} for s in ("train", "val")}
    hashes: dict[str, list[int]] = {"train": [], "val": []}
    val_set: set[int] = set()
    dropped = [0]
    done = [0]
    order: collections.deque = collections.deque()  # split of each queued batch, in order

    def split_docs() -> Iterator[str]:
        # Batches never mix splits: val is closed off before the first training document.
        n = 0
        for text in read_documents(paths, text_field, max_docs, done):
            split = "val" if n < val_docs else "train"
            n += 1
            h = doc_hash(text)
            if split == "val":
                val_set.add(h)
            elif h in val_set:
                dropped[0] += 1
                continue
            hashes[split].append(h)
            stats[split]["docs"] += 1
            stats[split]["text_bytes"] += len(text.encode("utf-8"))
            yield split, text

    def batched() -> Iterator[list[str]]:
        batch, size, cur = [], 0, "val"
        for split, text in split_docs():
            if batch and (split != cur or size >= BATCH_BYTES):
                order.append(cur)
                yield batch
                batch, size = [], 0
            cur = split
            batch.append(text)
            size += len(text)
        if batch:
            order.append(cur)
            yield batch

    progress = _Progress("prepare", total_input, log_every)
    writers = {s: ShardWriter(out, s, shard_tokens) for s in ("train", "val")}
    for tokens in encode_batches(batched(), model_path, workers):
        split = order.popleft()
        writers[split].add(tokens)
        stats[split]["tokens"] += int(tokens.size)
        progress.maybe(stats["train"]["docs"] + stats["val"]["docs"],
                       stats["train"]["text_bytes"] + stats["val"]["text_bytes"],
                       stats["train"]["tokens"] + stats["val"]["tokens"], done[0])
    for split, w in writers.items():
        stats[split]["shards"] = len(w.close())
    progress.maybe(stats["train"]["docs"] + stats["val"]["docs"],
                   stats["train"]["text_bytes"] + stats["val"]["text_bytes"],
                   stats["train"]["tokens"] + stats["val"]["tokens"], total_input, force=True)
    if stats["val"]["docs"] < val_docs:
        raise ValueError(f"inputs hold {stats['val']['docs']} documents, fewer than --val-docs {val_docs}")
    if stats["train"]["docs"] == 0:
        raise ValueError("no training documents left after the val split")
    for split, hs in hashes.items():
        write_atomic(out / DOC_HASHES.format(split=split), [np.asarray(hs, dtype="<u8").tobytes()], overwrite=True)

    manifest = {
        "format": "pgolf-data/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths],
        "text_field": text_field,
        "val_rule": f"first {val_docs} documents in input order",
        "max_docs": max_docs,
        "shard_tokens": shard_tokens,
        "tokenizer": tok_record,
        "splits": stats,
        "train_docs_dropped_as_val_duplicates": dropped[0],
        "doc_hashes": {"kind": "blake2b-64 of whitespace-collapsed UTF-8, little-endian uint64 per kept doc",
                       "train": DOC_HASHES.format(split="train"), "val": DOC_HASHES.format(split="val")},
        "seconds": round(time.monotonic() - t_start, 2),
        "workers": workers,
    }
    write_atomic(out / MANIFEST, [(json.dumps(manifest, indent=2) + "\n").encode()], overwrite=True)
    return manifest


# --------------------------------------------------------------------------------------- check

def _read_doc_hashes(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    raw = path.read_bytes()
    if len(raw) % 8:
        raise ValueError(f"{path}: size {len(raw)} is not a multiple of 8 (uint64 document hashes)")
    return np.frombuffer(raw, dtype="<u8")


def _load_manifest(data_dir: Path, problems: list[str]) -> dict | None:
    path = data_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return None
    if not isinstance(manifest, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return manifest


def _completeness_problems(data_dir: Path, manifest: dict | None, split_paths: dict[str, list[Path]]) -> list[str]:
    """Signs of a dataset that prepare did not finish, or that changed since: stray temp files,
    prepare's hashes without its manifest, shard counts that differ from the manifest's."""
    problems = []
    stray = sorted(p.name for p in data_dir.iterdir() if _STRAY_TMP.fullmatch(p.name))
    if stray:
        problems.append(f"{data_dir} holds unfinished writes ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}): "
                        "an interrupted `pgolf data prepare`; prepare it again")
    hashes = [n for n in (DOC_HASHES.format(split=s) for s in ("train", "val")) if (data_dir / n).exists()]
    if manifest is None and hashes:
        problems.append(f"{data_dir} holds {hashes[0]} but no {MANIFEST}: `pgolf data prepare` did not finish")
    splits = manifest.get("splits") if manifest else None
    for split, paths in split_paths.items():
        rec = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("shards"), int) or not isinstance(rec.get("tokens"), int):
            if manifest is not None:
                problems.append(f"{data_dir / MANIFEST}: no shard and token counts of the {split} split")
            continue
        tokens = sum(read_header(p) for p in paths)
        if (len(paths), tokens) != (rec["shards"], rec["tokens"]):
            problems.append(f"{data_dir}: {len(paths)} {split} shards with {tokens:,} tokens, but {MANIFEST} records "
                            f"{rec['shards']} with {rec['tokens']:,}: shards are missing, extra or changed")
    return problems


def _tokenizer_problem(model: Path, sha: str, manifest: dict | None) -> str | None:
    rec = manifest.get("tokenizer") if manifest else None
    want = rec.get("sha256") if isinstance(rec, dict) else None
    if want is None or want == sha:
        return None
    return (f"tokenizer {model} (sha256 {sha[:12]}...) is not the one {MANIFEST} records "
            f"({rec.get('path')!r}, sha256 {str(want)[:12]}...): the shards were made with another tokenizer")


def check(data_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
          decode_batch: int = 2048, max_examples: int = 5) -> dict:
    """Verify a data directory; returns a report whose ``"ok"`` is True only when exact and leak-free.

    * bytes: for every val document, the byte tables' count equals the UTF-8 length of the
      decoded text (totals and the first mismatching document are reported);
    * space: the tokenizer spells a lone space as the one-byte "▁" piece;
    * leaks: no val document's token sequence (and, when ``doc_hashes_*.bin`` are present, no
      whitespace-normalized text) also occurs in train;
    * problems: the dataset is complete (no marker or stray temp files; shard counts match the
      manifest), the tokenizer is the manifest's, every train token is below the vocabulary and the
      val stream starts with BOS (else eval would count bytes of tokens that belong to no document).

    An unfinished dataset (prepare's marker present) is refused with ``ShardError``.
    """
    data_dir = Path(data_dir)
    model = Path(tokenizer) if tokenizer else data_dir / f"{TOKENIZER_PREFIX}.model"
    sp = load_sentencepiece(model)
    sha = file_sha256(model)
    report: dict = {"data_dir": str(data_dir), "tokenizer": {"path": str(model), "sha256": sha,
                                                             "vocab_size": int(sp.vocab_size())}}
    problems: list[str] = []
    manifest = _load_manifest(data_dir, problems)
    if (problem := _tokenizer_problem(model, sha, manifest)) is not None:
        problems.append(problem)
    try:
        check_space_piece(sp)
        report["space_piece"] = {"ok": True}
    except ValueError as e:
        report["space_piece"] = {"ok": False, "error": str(e)}

    val_paths, train_paths = list_shards(data_dir, "val"), list_shards(data_dir, "train")
    if not val_paths:
        raise FileNotFoundError(f"no fineweb_val_*.bin shards in {data_dir}")
    problems += _completeness_problems(data_dir, manifest, {"train": train_paths, "val": val_paths})
    for p in train_paths:
        try:
            read_shard(p, sp.vocab_size())
        except ShardError as e:
            problems.append(str(e))
    stream = np.concatenate([read_shard(p, sp.vocab_size()) for p in val_paths])
    if stream.size == 0:
        problems.append(f"{data_dir}: the val shards hold no tokens")
    elif stream[0] != BOS_ID:
        first = next(p for p in val_paths if read_header(p))
        problems.append(f"{first}: the val stream starts with token {int(stream[0])}, not BOS ({BOS_ID}): tokens "
                        "before the first BOS belong to no document, and eval would count bytes this check cannot")
    tables = byte_tables(sp)
    starts = document_starts(stream)
    per_token = np.zeros(stream.size, dtype=np.int64)
    per_token[1:] = token_bytes(stream[1:], tables, stream[:-1])
    prefix = int(starts[0]) if starts.size else int(stream.size)  # a document continued from elsewhere
    table_docs = np.add.reduceat(per_token, starts) if starts.size else np.zeros(0, np.int64)
    ends = np.append(starts[1:], stream.size)
    decoded = np.zeros(starts.size, dtype=np.int64)
    for lo in range(0, starts.size, decode_batch):
        hi = min(lo + decode_batch, starts.size)
        texts = sp.decode([stream[s + 1:e].tolist() for s, e in zip(starts[lo:hi], ends[lo:hi])])
        decoded[lo:hi] = [len(t.encode("utf-8")) for t in texts]
    bad = np.flatnonzero(table_docs != decoded)
    first = None
    if bad.size:
        j = int(bad[0])
        text = sp.decode(stream[starts[j] + 1:ends[j]].tolist())
        first = {"doc": j, "table_bytes": int(table_docs[j]), "decoded_bytes": int(decoded[j]), "text": text[:200]}
    sidecar = load_byte_sidecar(data_dir)
    report["bytes"] = {
        "val_docs": int(starts.size), "val_tokens": int(stream.size), "partial_prefix_tokens": prefix,
        "table_bytes": int(table_docs.sum()), "decoded_bytes": int(decoded.sum()),
        "mismatched_docs": int(bad.size), "first_mismatch": first, "exact": bool(bad.size == 0),
        "sidecar_bytes": None if sidecar is None else int(sidecar[1:].sum(dtype=np.int64)),
    }

    # Leak check on token sequences: catches duplicates however the text was spelled before tokenizing.
    val_h, _ = document_hashes(val_paths)
    train_h, _ = document_hashes(train_paths)
    leaked = np.flatnonzero(np.isin(val_h, train_h))
    nonempty = np.flatnonzero(ends - starts > 1)  # document_hashes skips empty documents
    examples = []
    for k in leaked[:max_examples]:
        j = int(nonempty[k])
        examples.append({"val_doc": j, "text": sp.decode(stream[starts[j] + 1:ends[j]].tolist())[:120]})
    leak = {"val_docs_hashed": int(val_h.size), "train_docs_hashed": int(train_h.size),
            "token_duplicates": int(leaked.size), "examples": examples}
    text_val = _read_doc_hashes(data_dir / DOC_HASHES.format(split="val"))
    text_train = _read_doc_hashes(data_dir / DOC_HASHES.format(split="train"))
    leak["text_duplicates"] = (None if text_val is None or text_train is None
                               else int(np.isin(text_val, text_train).sum()))
    leak["ok"] = leak["token_duplicates"] == 0 and not leak["text_duplicates"]
    report["leak"] = leak
    report["problems"] = problems
    report["ok"] = bool(report["space_piece"]["ok"] and report["bytes"]["exact"] and leak["ok"] and not problems)
    return report


# --------------------------------------------------------------------------------------- sweep

def _take_text(docs: Iterable[str], max_bytes: int, exclude: set[int] = frozenset()) -> list[str]:
    out, used = [], 0
    for text in docs:
        if exclude and doc_hash(text) in exclude:
            continue  # a training copy of a val document would flatter the tokenizer
        out.append(text)
        used += len(text.encode("utf-8"))
        if used >= max_bytes:
            break
    return out


def sweep(docs: list[str | os.PathLike], val_docs: str | os.PathLike, vocabs: list[int], *, bits: float = 6,
          dim: int = 512, sample_bytes: int = 20_000_000, val_max_docs: int | None = None,
          text_field: str = "text", workers: int | None = None) -> list[dict]:
    """Tokens per byte on ``val_docs`` and embedding bytes (vocab × dim × bits/8) per vocab size.

    Each tokenizer trains on the same sample (first ``sample_bytes`` of ``docs``, val duplicates
    removed). A vocab too small for byte fallback (< 261) is reported as the plain byte-level
    tokenizer: one token per UTF-8 byte.
    """
    val = list(read_documents([Path(val_docs)], text_field, val_max_docs, [0]))
    if not val:
        raise ValueError(f"{val_docs}: no documents")
    val_set = {doc_hash(t) for t in val}
    sample = _take_text(read_documents([Path(p) for p in docs], text_field, None, [0]), sample_bytes, val_set)
    sample_mb = sum(len(t.encode("utf-8")) for t in sample) / 1e6
    raw_bytes = sum(len(t.encode("utf-8")) for t in val)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pgolf-sweep-") as tmp:
        for v in vocabs:
            t0 = time.monotonic()
            if v < MIN_BPE_VOCAB:
                tokens, counted, kind = raw_bytes, raw_bytes, "bytes"
            else:
                model = train_tokenizer(iter(sample), Path(tmp) / f"v{v}", v, num_threads=workers)
                sp = load_sentencepiece(model)
                ids = sp.encode(val)
                tokens = sum(len(x) for x in ids)
                stream = np.fromiter((t for seq in ids for t in (BOS_ID, *seq)), dtype=np.int64)
                counted = int(token_bytes(stream[1:], byte_tables(sp), stream[:-1]).sum())
                kind = "sentencepiece-bpe"
            emb = int(round(v * dim * bits / 8))
            rows.append({"vocab": v, "tokenizer": kind, "val_tokens": tokens, "val_bytes": counted,
                         "tokens_per_byte": tokens / counted, "bytes_per_token": counted / tokens,
                         "embedding_bytes": emb, "embedding_share_of_16MB": emb / 16_000_000,
                         "train_sample_mb": round(sample_mb, 2), "seconds": round(time.monotonic() - t0, 2)})
            print(f"[sweep] vocab {v:>6}: {rows[-1]['tokens_per_byte']:.4f} tokens/byte, "
                  f"embedding {emb / 1e6:.2f} MB ({rows[-1]['seconds']:.1f}s)", flush=True)
    return rows


def format_sweep(rows: list[dict], bits: float, dim: int) -> str:
    """The sweep as a text table."""
    lines = [f"{'vocab':>6} {'tokens/byte':>11} {'bytes/token':>11} {'emb MB':>8} {'of 16MB':>8}   "
             f"(embedding = vocab x {dim} x {bits} bits)"]
    for r in rows:
        lines.append(f"{r['vocab']:>6} {r['tokens_per_byte']:>11.4f} {r['bytes_per_token']:>11.3f} "
                     f"{r['embedding_bytes'] / 1e6:>8.3f} {100 * r['embedding_share_of_16MB']:>7.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI

def _cmd_prepare(args: argparse.Namespace) -> int:
    prepare(args.docs, args.out, vocab=args.vocab, val_docs=args.val_docs, tokenizer=args.tokenizer,
            text_field=args.text_field, shard_tokens=args.shard_tokens, max_docs=args.max_docs,
            workers=args.workers, tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 1e6), force=args.force)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    report = check(args.dir, args.tokenizer)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        b, leak = report["bytes"], report["leak"]
        print(f"space piece: {'ok' if report['space_piece']['ok'] else report['space_piece']['error']}")
        print(f"bytes: tables {b['table_bytes']:,}  decoded UTF-8 {b['decoded_bytes']:,}  over {b['val_docs']:,} "
              f"val docs ({b['val_tokens']:,} tokens): {'exact' if b['exact'] else 'MISMATCH'}")
        if b["first_mismatch"]:
            m = b["first_mismatch"]
            print(f"  first mismatch: doc {m['doc']}: tables {m['table_bytes']} vs decoded {m['decoded_bytes']}: "
                  f"{m['text'][:80]!r}")
        if b["sidecar_bytes"] is not None:
            print(f"  byte sidecar: {b['sidecar_bytes']:,} bytes (overrides the tables for bpb)")
        print(f"leaks: {leak['token_duplicates']} val docs with a token-identical train doc"
              + ("" if leak["text_duplicates"] is None else f", {leak['text_duplicates']} by text hash")
              + f" ({leak['val_docs_hashed']:,} val / {leak['train_docs_hashed']:,} train docs)")
        for ex in leak["examples"]:
            print(f"  val doc {ex['val_doc']}: {ex['text'][:80]!r}")
        for problem in report["problems"]:
            print(f"problem: {problem}")
        print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    vocabs = [int(v) for v in args.vocabs.split(",") if v.strip()]
    rows = sweep(args.docs, args.val_docs, vocabs, bits=args.bits, dim=args.dim,
                 sample_bytes=int(args.sample_mb * 1e6), val_max_docs=args.val_max_docs,
                 text_field=args.text_field, workers=args.workers)
    print(json.dumps(rows, indent=2) if args.json else format_sweep(rows, args.bits, args.dim))
    return 0


def add_parser(subparsers) -> None:
    """Add ``pgolf data prepare|check|sweep``."""
    data = subparsers.add_parser("data", help="prepare shards and tokenizers; check byte accounting and leaks")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("prepare", help="documents -> tokenizer -> train/val shards")
    p.add_argument("--docs", nargs="+", required=True, help=".jsonl, .jsonl.xz, .jsonl.zst or .txt files, in order")
    p.add_argument("--vocab", type=int, required=True, help="tokenizer vocabulary size")
    p.add_argument("--val-docs", type=int, required=True, help="the first N documents form the val split")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="reuse this SentencePiece .model instead of training one")
    p.add_argument("--text-field", default="text", help="JSON field holding the document text")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--max-docs", type=int, help="stop after this many documents (val included)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    p.add_argument("--tokenizer-sample-mb", type=float, default=100.0, help="training text for the tokenizer, MB")
    p.add_argument("--force", action="store_true", help="replace shards already in --out")
    p.set_defaults(func=_cmd_prepare)

    c = sub.add_parser("check", help="prove exact byte accounting and a leak-free split")
    c.add_argument("dir", help="data directory with fineweb_{train,val}_*.bin")
    c.add_argument("--tokenizer", help="SentencePiece .model (default DIR/tokenizer.model)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_cmd_check)

    s = sub.add_parser("sweep", help="tokens/byte vs embedding bytes across vocabulary sizes")
    s.add_argument("--docs", nargs="+", required=True, help="training document files")
    s.add_argument("--val-docs", required=True, help="document file to measure tokens per byte on")
    s.add_argument("--vocabs", default="256,512,1024,2048,4096,8192,16384")
    s.add_argument("--bits", type=float, default=6, help="bits per embedding weight")
    s.add_argument("--dim", type=int, default=512, help="embedding width")
    s.add_argument("--sample-mb", type=float, default=20.0, help="tokenizer training text, MB")
    s.add_argument("--val-max-docs", type=int, help="use only the first N val documents")
    s.add_argument("--text-field", default="text")
    s.add_argument("--workers", type=int, default=os.cpu_count())
    s.add_argument("--json", action="store_true", help="print rows as JSON")
    s.set_defaults(func=_cmd_sweep)
