"""Byte accounting equals the UTF-8 length of decoded text, for the challenge's tokenizer and ours."""
from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
from hypothesis import given, strategies as st

from pgolf_train.shards import write_shard
from pgolf_train.tokenizer import (ByteTables, byte_tables, check_space_piece, count_bytes, load_byte_sidecar,
                                   load_sentencepiece, token_bytes, tokenizer_info, train_tokenizer, val_bytes)


def _jsonl(path, limit=None):
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(limit or 10**9), f)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wiki_shard):
    """Tokenizers of vocab 512 and 2048 trained on ~2 MB of Wikipedia (never on the FineWeb docs tested)."""
    out = tmp_path_factory.mktemp("tok")
    texts = _jsonl(wiki_shard, 150)
    return {v: train_tokenizer(texts, out / f"v{v}", v, max_bytes=2_000_000) for v in (512, 2048)}


def _assert_exact(model, docs):
    sp = load_sentencepiece(model)
    tables = byte_tables(sp)
    total_tables = total_decoded = 0
    for text in docs:
        ids = sp.encode(text)
        decoded = len(sp.decode(ids).encode("utf-8"))
        assert val_bytes(np.array([1, *ids]), tables) == decoded, text[:80]
        total_tables += decoded
        total_decoded += len(text.encode("utf-8"))
    # normalization (nmt_nfkc) drops a little whitespace, never more than a few percent
    assert 0.97 * total_decoded < total_tables <= total_decoded


def test_sp1024_exact_on_fineweb(sp1024, fineweb_docs):
    _assert_exact(sp1024, _jsonl(fineweb_docs))


@pytest.mark.parametrize("vocab", [512, 2048])
def test_trained_exact_on_fineweb(trained, fineweb_docs, vocab):
    sp = load_sentencepiece(trained[vocab])
    assert sp.vocab_size() == vocab
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>"]
    assert len(sp.encode("20240520")) == 8  # split_digits
    check_space_piece(sp)
    _assert_exact(trained[vocab], _jsonl(fineweb_docs, 100))


def test_larger_vocab_compresses_more(trained, fineweb_docs):
    text = " ".join(_jsonl(fineweb_docs, 50))
    n = {v: len(load_sentencepiece(m).encode(text)) for v, m in trained.items()}
    assert n[2048] < 0.9 * n[512]


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200))
def test_exact_on_arbitrary_text(sp1024_tables, text):
    sp, tables = sp1024_tables
    ids = sp.encode(text)
    # tokens of a document follow BOS; prev of the first target is BOS (a boundary)
    assert val_bytes(np.array([1, *ids], dtype=np.int64), tables) == len(sp.decode(ids).encode("utf-8"))


@pytest.fixture(scope="module")
def sp1024_tables(sp1024):
    sp = load_sentencepiece(sp1024)
    return sp, byte_tables(sp)


def test_challenge_rule_piece_by_piece(sp1024_tables):
    sp, t = sp1024_tables
    the, a_byte = sp.piece_to_id("\u2581the"), sp.piece_to_id("<0x41>")
    assert (t.base_bytes[the], t.has_leading_space[the], t.is_boundary[the]) == (3, True, False)
    assert (t.base_bytes[a_byte], t.has_leading_space[a_byte], t.is_boundary[a_byte]) == (1, False, False)
    for special in range(4):  # pad, bos, eos, unk count nothing and are boundaries
        assert t.base_bytes[special] == 0 and t.is_boundary[special]
    # the leading space counts only when the previous token is not a boundary
    assert count_bytes(np.array([the, the]), t, np.array([1, the])) == 3 + 4
    assert token_bytes(np.array([the]), t, np.array([2])).tolist() == [3]


def test_tables_padded_to_model_vocab(sp1024):
    t = byte_tables(sp1024, vocab_size=1100)
    assert t.vocab_size == 1100 and t.is_boundary[1024:].all() and not t.base_bytes[1024:].any()
    with pytest.raises(ValueError, match="outside"):
        count_bytes(np.array([1100]), t, np.array([1]))
    with pytest.raises(ValueError):
        ByteTables(np.zeros(3, np.int16), np.zeros(2, bool), np.zeros(3, bool))


def test_missing_space_piece_refused(tmp_path, sp1024):
    """Without a "▁" piece a space falls back to the 3 UTF-8 bytes of U+2581: 3 tokens, and the
    tables charge 3 bytes for 1. Such a tokenizer must be refused."""
    raw = sp1024.read_bytes()
    entry = b"\x0a\x03\xe2\x96\x81\x15"  # proto: piece = "▁" (3 UTF-8 bytes), then its score
    assert raw.count(entry) == 1
    broken = tmp_path / "nospace.model"
    broken.write_bytes(raw.replace(entry, b"\x0a\x03\xe2\x96\x82\x15"))  # rename it to "▂"
    sp = load_sentencepiece(broken)
    ids = sp.encode("x .")
    assert len(ids) == 5 and val_bytes(np.array([1, *ids]), byte_tables(sp)) == 5
    with pytest.raises(ValueError, match="\u2581"):
        check_space_piece(sp)
    check_space_piece(sp1024)


def test_train_refuses_overwrite_and_bad_vocab(tmp_path, trained):
    with pytest.raises(ValueError, match="vocab size 256"):
        train_tokenizer(["abc"], tmp_path / "t", 256)
    (tmp_path / "t.model").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        train_tokenizer(["abc"], tmp_path / "t", 512)
    assert (tmp_path / "t.model").read_bytes() == b"mine"
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_sentencepiece(tmp_path / "t.model")
    info = tokenizer_info(trained[512])
    assert info["vocab_size"] == 512 and len(info["sha256"]) == 64


def test_byte_sidecar(tmp_path, sp1024_tables):
    _, tables = sp1024_tables
    assert load_byte_sidecar(tmp_path) is None
    tokens = np.array([1, 300, 301, 1, 302], dtype=np.uint16)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 4, 2, 0, 7])
    side = load_byte_sidecar(tmp_path)
    assert val_bytes(tokens, tables, side) == 13  # the sidecar overrides the tables
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 4], overwrite=True)
    with pytest.raises(ValueError, match="byte sidecar mismatch"):
        load_byte_sidecar(tmp_path)


def test_the_same_tokenizer_trained_twice_is_the_same_file(wiki_shard, tmp_path):
    """SentencePiece records the output path it was given (a temp name with the process id) and the
    thread count in the model file, so a tokenizer retrained by the same command had a new checksum
    on every run and machine. The trainer writes them machine-independent; the model still loads."""
    texts = _jsonl(wiki_shard, 60)
    files = []
    for sub, threads in (("a", 1), ("b", 2)):
        (tmp_path / sub).mkdir()
        files.append(train_tokenizer(texts, tmp_path / sub / "tok", 512, max_bytes=500_000, num_threads=threads))
    a, b = (f.read_bytes() for f in files)
    assert a == b
    assert b".tmp" not in a and str(tmp_path).encode() not in a
    sp = load_sentencepiece(files[0])
    assert sp.get_piece_size() == 512 and sp.decode(sp.encode("Hello world 123")) == "Hello world 123"
