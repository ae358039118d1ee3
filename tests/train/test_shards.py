"""Shard format: exact bytes, roundtrips, and one rejection per rule."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from pgolf_train.shards import (HEADER_BYTES, MAGIC, ShardError, ShardWriter, document_starts,
                                list_shards, read_shard, shard_name, write_shard)


def _header(count: int, magic: int = MAGIC, version: int = 1) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, count)
    return h.tobytes()


@given(hnp.arrays(np.uint16, st.integers(0, 3000)))
def test_roundtrip(tmp_path_factory, tokens):
    path = tmp_path_factory.mktemp("s") / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    back = read_shard(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)


def test_exact_layout(tmp_path):
    path = write_shard(tmp_path / "x.bin", [1, 258, 65535])
    raw = path.read_bytes()
    assert raw[:HEADER_BYTES] == _header(3)
    assert raw[HEADER_BYTES:] == bytes([1, 0, 2, 1, 255, 255])  # little-endian uint16


def test_writer_refuses_to_overwrite(tmp_path):
    path = write_shard(tmp_path / "a.bin", [1, 2])
    with pytest.raises(FileExistsError):
        write_shard(path, [1])
    write_shard(path, [1], overwrite=True)
    assert read_shard(path).tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp files left behind


@pytest.mark.parametrize("bad", [[-1], [65536], np.array([1.5])])
def test_writer_rejects_unrepresentable_tokens(tmp_path, bad):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "a.bin", bad)


@pytest.mark.parametrize("raw, rule", [
    (b"\x00" * 100, "truncated header"),
    (_header(2, magic=20240521) + b"\x01\x00\x02\x00", "bad magic"),
    (_header(2, version=2) + b"\x01\x00\x02\x00", "unsupported version"),
    (_header(-5), "bad token count"),
    (_header(3) + b"\x01\x00\x02\x00", "size mismatch"),          # truncated payload
    (_header(1) + b"\x01\x00\x02\x00", "size mismatch"),          # trailing bytes
    (_header(2) + b"\x01\x00\x02", "size mismatch"),              # odd length
])
def test_malformed_rejected(tmp_path, raw, rule):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(raw)
    with pytest.raises(ShardError) as e:
        read_shard(path)
    assert e.value.rule == rule
    assert str(path) in str(e.value) and rule in str(e.value)


def test_token_out_of_vocab(tmp_path):
    path = write_shard(tmp_path / "s.bin", [1, 5, 1023, 1024, 7])
    assert read_shard(path, vocab_size=1025).size == 5
    with pytest.raises(ShardError, match="token out of vocabulary.*1024 at position 3"):
        read_shard(path, vocab_size=1024)


def test_empty_shard(tmp_path):
    assert read_shard(write_shard(tmp_path / "e.bin", [])).size == 0


def test_list_shards(tmp_path):
    for name in ["fineweb_val_000001.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin",
                 "fineweb_train_000000.bin", "fineweb_val_00001.bin", "notes.txt"]:
        (tmp_path / name).write_bytes(_header(0))
    assert [p.name for p in list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [p.name for p in list_shards(tmp_path, "val_bytes")] == ["fineweb_val_bytes_000000.bin"]
    assert [p.name for p in list_shards(tmp_path, "train")] == ["fineweb_train_000000.bin"]
    with pytest.raises(ValueError):
        list_shards(tmp_path, "test")
    assert shard_name("train", 12) == "fineweb_train_000012.bin"


@given(st.lists(st.lists(st.integers(2, 65535), max_size=40), max_size=30), st.integers(1, 50))
def test_shard_writer_streams_documents(tmp_path_factory, docs, shard_tokens):
    out = tmp_path_factory.mktemp("w")
    stream = np.array([t for d in docs for t in [1, *d]], dtype=np.uint16)
    with ShardWriter(out, "train", shard_tokens) as w:
        for d in docs:
            w.add(np.array([1, *d], dtype=np.uint16))
    paths = list_shards(out, "train")
    assert paths == w.paths
    sizes = [read_shard(p).size for p in paths]
    assert all(s == shard_tokens for s in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= shard_tokens)
    joined = np.concatenate([read_shard(p) for p in paths]) if paths else np.zeros(0, np.uint16)
    np.testing.assert_array_equal(joined, stream)
    assert document_starts(joined).size == len(docs)


def test_an_unfinished_dataset_is_refused_by_the_loaders(tmp_path):
    import torch

    from pgolf_train.loader import DistributedTokenLoader
    from pgolf_train.shards import INCOMPLETE_MARKER, ShardError, list_shards

    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3, 4])
    (tmp_path / INCOMPLETE_MARKER).write_bytes(b"")
    for split in ("train", "val"):
        with pytest.raises(ShardError, match="unfinished dataset"):
            list_shards(tmp_path, split)
    with pytest.raises(ShardError, match="unfinished dataset"):
        DistributedTokenLoader(tmp_path, 0, 1, torch.device("cpu"))
    assert [p.name for p in list_shards(tmp_path, "train", allow_incomplete=True)] == ["fineweb_train_000000.bin"]
