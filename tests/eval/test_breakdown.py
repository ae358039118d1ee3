"""Per-document statistics: they add up to the totals, match each document scored alone, and the
bootstrap and paired comparison say tie where the difference is noise."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pgolf_eval.breakdown import BUCKETS, compare, summarize
from pgolf_eval.evaluate import evaluate_tokens
from pgolf_eval.sliding import document_segments
from pgolf_train.tokenizer import byte_tables

from .conftest import tiny_model


@pytest.mark.parametrize("kw", [{}, {"stride": 4}, {"stride": 4, "doc_isolated": True}, {"truncate": True}])
def test_per_document_sums_are_the_totals(val_tokens, sp1024, kw):
    res = evaluate_tokens(tiny_model(), val_tokens, byte_tables(sp1024, 1024), seq_len=16, log=None, **kw)
    d = res.per_doc
    assert len(d["length"]) == len(document_segments(val_tokens, 1)) and sum(d["length"]) == len(val_tokens) - 1
    assert sum(d["tokens"]) == res.tokens and sum(d["bytes"]) == res.bytes
    assert sum(d["loss"]) / math.log(2) / res.bytes == pytest.approx(res.val_bpb, rel=1e-9)
    assert sum(b["tokens"] for b in res.docs["buckets"]) == res.tokens
    assert sum(b["documents"] for b in res.docs["buckets"]) == res.docs["documents"]
    lo, hi = res.docs["bpb_ci95"]
    assert lo < res.val_bpb < hi


def test_a_documents_loss_is_its_score_alone(val_tokens, sp1024):
    """Document-isolated, each document's row equals evaluating that document by itself."""
    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    res = evaluate_tokens(model, val_tokens, tables, seq_len=16, stride=4, doc_isolated=True, log=None)
    seg = document_segments(val_tokens, 1)
    for i in (1, 2):
        b, e = seg[i]
        alone = evaluate_tokens(model, val_tokens[b:e + 1], tables, seq_len=16, stride=4, log=None)
        assert res.per_doc["loss"][i] == pytest.approx(alone.val_loss * alone.tokens, rel=1e-5)
        assert (res.per_doc["tokens"][i], res.per_doc["bytes"][i]) == (alone.tokens, alone.bytes)


def _fake(lengths, bpb_of, rng):
    length = np.asarray(lengths)
    nbytes = (length * 3.1).astype(int)
    loss = np.array([bpb_of(n) * b * math.log(2) for n, b in zip(length, nbytes)]) * rng.uniform(0.8, 1.2, len(length))
    return {"per_doc": {"length": length.tolist(), "tokens": length.tolist(), "bytes": nbytes.tolist(),
                        "loss": loss.tolist()}}


def test_buckets_and_paired_verdicts():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 20000, 200)
    base = _fake(lengths, lambda n: 1.5, rng)
    s = summarize(base["per_doc"])
    assert [b["bucket"] for b in s["buckets"]] == [name for name, _, _ in BUCKETS]
    assert sum(b["token_share"] for b in s["buckets"]) == pytest.approx(1.0)
    same = compare(base, base)
    assert same["overall"]["delta"] == 0 and same["overall"]["verdict"] == "tie"
    # 2% better on every document: a gain whose interval excludes 0, in every bucket
    better = {"per_doc": {**base["per_doc"], "loss": (np.array(base["per_doc"]["loss"]) * 0.98).tolist()}}
    c = compare(better, base)
    assert c["overall"]["verdict"] == "better" and all(b["verdict"] == "better" for b in c["buckets"])
    assert c["overall"]["ci95"][0] < c["overall"]["delta"] < c["overall"]["ci95"][1] < 0
    # better on one long document only, worse elsewhere by noise: the short documents say so
    loss = np.array(base["per_doc"]["loss"])
    loss[np.argmax(lengths)] *= 0.5
    skew = {"per_doc": {**base["per_doc"], "loss": loss.tolist()}}
    c = compare(skew, base)
    assert c["under_2k"]["delta"] == 0 and c["under_2k"]["verdict"] == "tie"
    assert summarize(base["per_doc"]) == s  # the bootstrap is seeded: the same interval every time
    with pytest.raises(ValueError, match="same documents"):
        compare(_fake(lengths[:-1], lambda n: 1.5, rng), base)


def test_two_tokenizers_compare_by_documents():
    """The same documents under another tokenizer (other token lengths, same bytes) pair by bytes,
    in the reference's buckets; different documents still refuse (a vocabulary arm once did)."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(50, 20000, 200)
    base = _fake(lengths, lambda n: 1.5, rng)
    fewer = np.maximum(1, (lengths * 0.9).astype(int))  # a bigger vocabulary: fewer tokens, same text
    other = {"per_doc": {"length": fewer.tolist(), "tokens": fewer.tolist(), "bytes": base["per_doc"]["bytes"],
                         "loss": (np.array(base["per_doc"]["loss"]) * 0.97).tolist()}}
    c = compare(other, base)
    assert c["overall"]["verdict"] == "better" and c["overall"]["delta"] == pytest.approx(-0.03 * 1.5, rel=0.2)
    ref_docs = {b["bucket"]: b["documents"] for b in summarize(base["per_doc"])["buckets"] if b["documents"]}
    assert [b["bucket"] for b in c["buckets"]] == list(ref_docs)
    moved = dict(other["per_doc"], bytes=(np.array(base["per_doc"]["bytes"]) + 1).tolist())
    with pytest.raises(ValueError, match="byte counts differ"):
        compare({"per_doc": moved}, base)

