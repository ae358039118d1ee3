"""`pgolf data prepare|check|sweep` end to end on real FineWeb and Wikipedia text."""
from __future__ import annotations

import argparse
import json
import lzma

import numpy as np
import pytest
import zstandard

from pgolf_train.prepare import DocumentError, add_parser, check, iter_documents, prepare, sweep
from pgolf_train.shards import document_starts, list_shards, read_shard, write_shard
from pgolf_train.tokenizer import load_sentencepiece


def pgolf_main(argv: list[str]) -> int:
    """`pgolf ARGV` through this module's own `data` subcommands."""
    parser = argparse.ArgumentParser(prog="pgolf")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _texts(path, limit=None):
    return [t for _, t in zip(range(limit or 10**9), iter_documents(path))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, fineweb_docs, wiki_shard):
    """FineWeb (first 40 docs = val) then a Wikipedia shard, with a trained 512-piece tokenizer."""
    out = tmp_path_factory.mktemp("data")
    manifest = prepare([fineweb_docs, wiki_shard], out, vocab=512, val_docs=40, shard_tokens=250_000,
                       workers=2, tokenizer_sample_bytes=3_000_000)
    return out, manifest


def test_prepare_end_to_end(prepared, fineweb_docs, wiki_shard):
    out, m = prepared
    assert json.loads((out / "manifest.json").read_text()) == m
    n_fw, n_wiki = len(_texts(fineweb_docs)), len(_texts(wiki_shard))
    assert m["splits"]["val"]["docs"] == 40
    assert m["splits"]["train"]["docs"] + m["train_docs_dropped_as_val_duplicates"] == n_fw + n_wiki - 40
    assert m["tokenizer"]["trained"] and m["tokenizer"]["vocab_size"] == 512
    assert [i["bytes"] for i in m["inputs"]] == [fineweb_docs.stat().st_size, wiki_shard.stat().st_size]
    sp = load_sentencepiece(out / "tokenizer.model")
    for split in ("train", "val"):
        paths = list_shards(out, split)
        assert len(paths) == m["splits"][split]["shards"]
        tokens = np.concatenate([read_shard(p, 512) for p in paths])
        assert tokens.size == m["splits"][split]["tokens"]
        assert tokens[0] == 1 and document_starts(tokens).size == m["splits"][split]["docs"]
        assert all(read_shard(p).size == 250_000 for p in paths[:-1])
    # val = the first 40 documents in input order, each BOS + its tokens, no EOS
    val = np.concatenate([read_shard(p) for p in list_shards(out, "val")])
    expect = [t for text in _texts(fineweb_docs, 40) for t in [1, *sp.encode(text)]]
    assert val.tolist() == expect
    report = check(out)
    assert report["ok"], report
    assert report["bytes"]["table_bytes"] == report["bytes"]["decoded_bytes"] > 0


def test_refuses_existing_shards_and_force_replaces(tmp_path, prepared, fineweb_docs, sp1024):
    out, _ = prepared
    with pytest.raises(FileExistsError, match="--force"):
        prepare([fineweb_docs], out, vocab=1024, val_docs=10, tokenizer=sp1024)
    work = tmp_path / "d"
    work.mkdir()
    stale = write_shard(work / "fineweb_train_000007.bin", [1, 2, 3])
    with pytest.raises(FileExistsError):
        prepare([fineweb_docs], work, vocab=1024, val_docs=10, tokenizer=sp1024)
    m = prepare([fineweb_docs], work, vocab=1024, val_docs=10, tokenizer=sp1024, force=True, workers=1)
    assert not stale.exists()  # no shard of an earlier run survives a --force
    assert m["tokenizer"]["trained"] is False and m["tokenizer"]["sha256"]
    with pytest.raises(ValueError, match="not --vocab 512"):
        prepare([fineweb_docs], work, vocab=512, val_docs=10, tokenizer=sp1024, force=True)


def test_leaks_dropped_at_prepare_and_caught_by_check(tmp_path, fineweb_docs, sp1024, capsys):
    docs = _texts(fineweb_docs, 60)
    src = tmp_path / "docs.jsonl"
    # val doc 3 reappears in train, re-wrapped: prepare must drop that copy
    planted = docs + ["  " + docs[3].replace(" ", "\n", 5) + "\n"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted))
    out = tmp_path / "d"
    m = prepare([src], out, vocab=1024, val_docs=20, tokenizer=sp1024, workers=1)
    assert m["train_docs_dropped_as_val_duplicates"] == 1 and m["splits"]["train"]["docs"] == 40
    assert check(out, sp1024)["ok"]
    # plant the duplicate directly in a train shard: the token-hash check must fail
    val = np.concatenate([read_shard(p) for p in list_shards(out, "val")])
    starts = document_starts(val)
    write_shard(out / "fineweb_train_000001.bin", val[starts[5]:starts[6]])
    report = check(out, sp1024)
    assert not report["ok"] and report["leak"]["token_duplicates"] == 1
    assert report["leak"]["examples"][0]["val_doc"] == 5
    assert pgolf_main(["data", "check", str(out), "--tokenizer", str(sp1024)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_check_finds_byte_mismatch(tmp_path, fineweb_docs, sp1024):
    out = tmp_path / "d"
    prepare([fineweb_docs], out, vocab=1024, val_docs=5, tokenizer=sp1024, workers=1, max_docs=20)
    assert pgolf_main(["data", "check", str(out), "--tokenizer", str(sp1024), "--json"]) == 0
    sp = load_sentencepiece(sp1024)
    # a lone UTF-8 lead byte decodes to U+FFFD (3 bytes) but the tables count 1
    write_shard(out / "fineweb_val_000001.bin", [1, sp.piece_to_id("<0xE2>")])
    b = check(out, sp1024)["bytes"]
    assert not b["exact"] and b["first_mismatch"]["doc"] == 5
    assert (b["first_mismatch"]["table_bytes"], b["first_mismatch"]["decoded_bytes"]) == (1, 3)


def test_input_formats(tmp_path, fineweb_docs):
    docs = _texts(fineweb_docs, 5)
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps({"body": t}) + "\n" for t in docs).encode()))
    assert _texts_field(zst, "body") == docs
    xz = tmp_path / "a.jsonl.xz"
    xz.write_bytes(lzma.compress("".join(json.dumps({"text": t}) + "\n" for t in docs).encode()))
    assert _texts(xz) == docs
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert _texts(txt) == ["first doc\nline two", "second doc"]


def _texts_field(path, field):
    return list(iter_documents(path, field))


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', "a.jsonl:2: invalid JSON"),
    ('{"body": "x"}\n', "a.jsonl:1: no 'text' field"),
    ('{"text": 5}\n', "a.jsonl:1: 'text' is int"),
    ('["text"]\n', "a.jsonl:1: no 'text' field"),
])
def test_bad_input_named(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(DocumentError, match=message):
        list(iter_documents(path))


def test_bad_compressed_and_suffix(tmp_path):
    bad = tmp_path / "a.jsonl.xz"
    bad.write_bytes(b"not xz at all")
    with pytest.raises(DocumentError, match="corrupt xz"):
        list(iter_documents(bad))
    latin = tmp_path / "b.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DocumentError, match="not UTF-8"):
        list(iter_documents(latin))
    with pytest.raises(DocumentError, match="unsupported"):
        list(iter_documents(tmp_path / "c.parquet"))


def test_sweep(tmp_path, fineweb_docs, wiki_shard):
    rows = sweep([wiki_shard], fineweb_docs, [256, 512, 1024], bits=6, dim=512, sample_bytes=2_000_000,
                 val_max_docs=50, workers=2)
    assert [r["vocab"] for r in rows] == [256, 512, 1024]
    assert rows[0]["tokenizer"] == "bytes" and rows[0]["tokens_per_byte"] == 1.0
    assert 1.0 > rows[1]["tokens_per_byte"] > rows[2]["tokens_per_byte"] > 0.2
    assert [r["embedding_bytes"] for r in rows] == [256 * 384, 512 * 384, 1024 * 384]
