"""`pgolf data prepare|check|sweep` end to end on real FineWeb and Wikipedia text."""
from __future__ import annotations

import argparse
import json
import lzma
import os

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


# ------------------------------------------------------------------------- failures keep what was there

def _tree(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _write_docs(path, texts, bad_line=None):
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    if bad_line is not None:
        lines.insert(bad_line - 1, '{"text": broken\n')
    path.write_text("".join(lines))
    return path


@pytest.fixture
def small(tmp_path, fineweb_docs, sp1024):
    """A valid 30-document dataset (sp1024) with a user's file beside it."""
    out = tmp_path / "d"
    prepare([fineweb_docs], out, vocab=1024, val_docs=5, tokenizer=sp1024, workers=1, max_docs=30)
    (out / "notes.txt").write_text("mine")
    return out


@pytest.mark.parametrize("trained", [False, True])
def test_failed_force_leaves_the_previous_dataset(tmp_path, small, fineweb_docs, sp1024, trained, capsys):
    bad = _write_docs(tmp_path / "bad.jsonl", _texts(fineweb_docs, 30), bad_line=6)
    before = _tree(small)
    args = ["data", "prepare", "--docs", str(bad), "--val-docs", "3", "--out", str(small), "--force", "--workers", "1"]
    args += ["--vocab", "400", "--tokenizer-sample-mb", "1"] if trained else ["--vocab", "1024", "--tokenizer", str(sp1024)]
    with pytest.raises(DocumentError, match="bad.jsonl:6: invalid JSON"):
        pgolf_main(args)
    assert _tree(small) == before  # shards, hashes, manifest and the user's file, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d"]  # no staging directory left
    assert check(small, sp1024)["ok"]


def test_force_replaces_the_dataset_and_keeps_other_files(small, fineweb_docs, sp1024):
    write_shard(small / "fineweb_train_000009.bin", [1, 2, 3])  # a stale shard of some earlier run
    m = prepare([fineweb_docs], small, vocab=1024, val_docs=4, tokenizer=sp1024, workers=1, max_docs=20, force=True)
    assert m["splits"]["val"]["docs"] == 4 and json.loads((small / "manifest.json").read_text()) == m
    assert (small / "notes.txt").read_text() == "mine" and not (small / "fineweb_train_000009.bin").exists()
    assert check(small, sp1024)["ok"]


def test_failed_prepare_leaves_no_directory(tmp_path, fineweb_docs, sp1024):
    bad = _write_docs(tmp_path / "bad.jsonl", _texts(fineweb_docs, 10), bad_line=6)
    with pytest.raises(DocumentError):
        prepare([bad], tmp_path / "new" / "d", vocab=1024, val_docs=3, tokenizer=sp1024, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # a retry needs no --force
    pre = tmp_path / "empty"
    pre.mkdir()
    with pytest.raises(DocumentError):
        prepare([bad], pre, vocab=1024, val_docs=3, tokenizer=sp1024, workers=1)
    prepare([_write_docs(tmp_path / "ok.jsonl", _texts(fineweb_docs, 10))], pre, vocab=1024, val_docs=3,
            tokenizer=sp1024, workers=1)  # an empty directory is no reason for --force


def test_a_dataset_being_built_is_refused(tmp_path, fineweb_docs, sp1024, monkeypatch):
    """While prepare runs (or after a kill), its staging directory is marked unfinished: check and
    the shard loaders refuse it."""
    import pgolf_train.prepare as prep
    from pgolf_train.shards import ShardError

    seen = []
    real = prep.write_atomic

    def spy(path, parts, **kw):
        if path.name == "manifest.json":
            seen.append(path.parent)
            with pytest.raises(ShardError, match="unfinished dataset"):
                check(path.parent, sp1024)
        return real(path, parts, **kw)

    monkeypatch.setattr(prep, "write_atomic", spy)
    prepare([fineweb_docs], tmp_path / "d", vocab=1024, val_docs=3, tokenizer=sp1024, workers=1, max_docs=10)
    assert seen and seen[0].name.startswith(".d.new-") and not seen[0].exists()
    assert check(tmp_path / "d", sp1024)["ok"]


# ------------------------------------------------------------------------------- check finds more

def _rewrite(path, fn):
    tokens = read_shard(path).copy()
    fn(tokens)
    write_shard(path, tokens, overwrite=True)


def _problems(out, sp1024, capsys):
    report = check(out, sp1024)
    assert not report["ok"]
    capsys.readouterr()
    assert pgolf_main(["data", "check", str(out), "--tokenizer", str(sp1024)]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and all(f"problem: {p}" in printed for p in report["problems"])
    return report["problems"]


def test_check_fails_a_tokenizer_other_than_the_manifests(tmp_path, small, sp1024, capsys):
    sp = load_sentencepiece(sp1024)
    raw = bytearray(sp1024.read_bytes())
    piece = sp.id_to_piece(500).encode()
    at = raw.index(bytes([len(piece)]) + piece + b"\x15") + len(piece) + 2  # the piece's float score
    raw[at] ^= 1  # same vocabulary size, another model
    other = tmp_path / "other.model"
    other.write_bytes(raw)
    assert load_sentencepiece(other).vocab_size() == 1024
    [problem] = _problems(small, other, capsys)
    assert "other.model" in problem and "not the one manifest.json records" in problem


def test_check_fails_an_out_of_vocabulary_train_token(small, sp1024, capsys):
    _rewrite(small / "fineweb_train_000000.bin", lambda t: t.__setitem__(7, 60000))
    [problem] = _problems(small, sp1024, capsys)
    assert "fineweb_train_000000.bin: token out of vocabulary: token 60000 at position 7" in problem


def test_check_fails_a_val_stream_not_starting_with_bos(small, sp1024, capsys):
    _rewrite(small / "fineweb_val_000000.bin", lambda t: t.__setitem__(0, 100))
    [problem] = _problems(small, sp1024, capsys)
    assert "fineweb_val_000000.bin: the val stream starts with token 100, not BOS" in problem


def test_check_fails_an_unfinished_or_changed_dataset(small, sp1024, capsys):
    write_shard(small / "fineweb_train_000001.bin", [1, 5, 6])  # one shard more than the manifest's
    (small / ".fineweb_train_000002.bin.x1y2.tmp").write_bytes(b"half a shard")  # a write cut off by a kill
    problems = _problems(small, sp1024, capsys)
    assert any("unfinished writes (.fineweb_train_000002.bin.x1y2.tmp)" in p for p in problems)
    assert any("2 train shards with" in p and "records 1 with" in p for p in problems)
    (small / "manifest.json").unlink()  # prepare's hashes without its manifest
    assert any("no manifest.json" in p for p in _problems(small, sp1024, capsys))
    (small / "manifest.json").write_text("{not json")
    assert any("manifest.json: not valid JSON" in p for p in _problems(small, sp1024, capsys))


# ------------------------------------------------------------------------------- clear input errors

def test_docs_that_are_not_a_regular_file(tmp_path, sp1024):
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DocumentError, match="docs.jsonl: not a regular file"):
        prepare([fifo], tmp_path / "d", vocab=1024, val_docs=3, tokenizer=sp1024)
    with pytest.raises(FileNotFoundError, match="document file not found"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "d", vocab=1024, val_docs=3, tokenizer=sp1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


@pytest.mark.parametrize("flags, message", [
    (["--vocab", "300"], r"--vocab 300.*too small for this text: it needs at least \d+ pieces"),
    (["--vocab", "200"], r"--vocab 200 is outside 261\.\.65536"),
    (["--vocab", "70000"], r"--vocab 70000 is outside 261\.\.65536"),
    (["--vocab", "512", "--tokenizer-sample-mb", "0"], r"--tokenizer-sample-mb must be > 0"),
    (["--vocab", "512", "--shard-tokens", "0"], r"--shard-tokens must be in 1\.\."),
])
def test_bad_tokenizer_settings_are_named(tmp_path, fineweb_docs, flags, message):
    docs = _write_docs(tmp_path / "a.jsonl", _texts(fineweb_docs, 12))
    with pytest.raises(ValueError, match=message) as e:
        pgolf_main(["data", "prepare", "--docs", str(docs), "--val-docs", "2", "--out", str(tmp_path / "d"),
                    "--workers", "1", *flags])
    assert "INTERNAL" not in str(e.value) and not (tmp_path / "d").exists()
