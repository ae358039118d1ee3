"""The causal n-gram tilt: proposals against a dictionary reference, causality, the closed-form tilt
against the renormalized softmax, and the tilted evaluation against a brute-force loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_eval.evaluate import evaluate_tokens
from pgolf_eval.ngram import NgramTilt, proposals, propose, tilt_losses
from pgolf_eval.ttt import TTTConfig
from pgolf_train.tokenizer import byte_tables

from .conftest import tiny_model
from .test_evaluate import brute_force


def reference_propose(tokens: list[int], order: int) -> tuple[list[int], list[float], list[int]]:
    """The rule spelled out with exact dictionaries: the longest context seen before t proposes the
    token that first reached the highest count after it."""
    follow: dict[tuple, dict[int, int]] = {}
    best: dict[tuple, tuple[int, int]] = {}
    out_t, out_c, out_n = [], [], []
    for t, nxt in enumerate(tokens):
        tok, conf, seen = -1, 0.0, 0
        for k in range(min(order, t), 0, -1):
            ctx = tuple(tokens[t - k:t])
            if ctx in follow:
                b, n = best[ctx]
                seen = sum(follow[ctx].values())
                tok, conf = b, n / seen
                break
        out_t.append(tok)
        out_c.append(conf)
        out_n.append(seen)
        for k in range(1, min(order, t) + 1):
            ctx = tuple(tokens[t - k:t])
            counts = follow.setdefault(ctx, {})
            counts[nxt] = counts.get(nxt, 0) + 1
            if counts[nxt] > best.get(ctx, (-1, 0))[1]:
                best[ctx] = (nxt, counts[nxt])
    return out_t, out_c, out_n


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=120), st.integers(1, 6))
def test_proposals_match_the_dictionary_rule(tokens, order):
    tok, conf, seen = propose(np.array(tokens), NgramTilt(order=order, table_bits=16))
    want_t, want_c, want_n = reference_propose(tokens, order)
    assert tok.tolist() == want_t and seen.tolist() == want_n
    np.testing.assert_allclose(conf, want_c, rtol=1e-6)
    for cfg in (NgramTilt(order=order, threshold=0.6, table_bits=16), NgramTilt(order=order, min_count=2, table_bits=16)):
        hat = proposals(np.array(tokens), cfg)
        on = (np.array(want_c) >= cfg.threshold) & (np.array(want_n) >= cfg.min_count)
        assert hat.tolist() == np.where(on, want_t, -1).tolist()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=150), st.integers(1, 5))
def test_doc_scope_is_the_rule_within_each_document(tokens, order):
    """scope "doc": each document (from a BOS, id 1) on its own, as if the stream began there; what
    precedes a document's first BOS is a document too."""
    tokens = np.array(tokens)
    tok, conf, seen = propose(tokens, NgramTilt(order=order, scope="doc", table_bits=16), bos_id=1)
    cuts = [0, *np.flatnonzero(tokens == 1).tolist(), len(tokens)]
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        want_t, want_c, want_n = reference_propose(tokens[a:b].tolist(), order)
        assert tok[a:b].tolist() == want_t and seen[a:b].tolist() == want_n
        np.testing.assert_allclose(conf[a:b], want_c, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=2, max_size=200), st.data())
def test_a_proposal_reads_only_earlier_tokens(tokens, data):
    """Changing tokens[t:] leaves every proposal up to t as it was (the score stays score-first)."""
    t = data.draw(st.integers(0, len(tokens) - 1))
    changed = tokens[:t] + data.draw(st.lists(st.integers(0, 7), min_size=len(tokens) - t,
                                              max_size=len(tokens) - t))
    a, ca, _ = propose(np.array(tokens))
    b, cb, _ = propose(np.array(changed))
    assert a[:t + 1].tolist() == b[:t + 1].tolist() and ca[:t + 1].tolist() == cb[:t + 1].tolist()


def test_small_tables_forget_but_stay_causal_and_bounded():
    """A stream far longer than the tables: proposals still come only from earlier tokens (a
    prefix's proposals do not depend on what follows) and every entry is a token or -1."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 20000)
    tokens[10000:12000] = tokens[2000:4000]  # a long repeat the n-gram can find
    cfg = NgramTilt(table_bits=16)  # 65,536 slots for 320,000 contexts
    tok, conf, _ = propose(tokens, cfg)
    head, _, _ = propose(tokens[:11000], cfg)
    assert tok[:11000].tolist() == head.tolist()
    assert ((tok == -1) | ((tok >= 0) & (tok < 50))).all() and ((conf >= 0) & (conf <= 1)).all()
    hat = proposals(tokens, cfg)
    assert (hat[10100:12000] == tokens[10100:12000]).mean() > 0.8  # the repeat is found despite forgetting


def test_tilt_is_the_renormalized_boosted_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    y = torch.randint(0, 11, (3, 7), generator=g)
    hat = torch.randint(-1, 11, (3, 7), generator=g)
    hat[0, :3] = y[0, :3]  # some proposals right
    beta = 2.625
    boosted = logits.double() + beta * F.one_hot(hat.clamp_min(0), 11).double() * (hat >= 0)[..., None]
    want = -torch.log_softmax(boosted, -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(tilt_losses(logits, y, hat, beta).double(), want, rtol=1e-5, atol=1e-5)
    plain = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(3, 7)
    torch.testing.assert_close(tilt_losses(logits, y, torch.full_like(y, -1), beta), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride", [None, 5])
def test_tilted_evaluation_equals_a_brute_force_loop(val_tokens, sp1024, stride):
    """Every target's tilted loss from its own context, as plain/sliding windows score it; and the
    report says how many targets the tilt touched and how often it was right."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp1024))
    model, W, cfg = tiny_model(), 16, NgramTilt(order=4, threshold=0.5)
    toks = val_tokens[:200].copy()
    toks[120:180] = toks[20:80]  # a repeat, so that the tilt fires
    hat = proposals(toks, cfg)
    T = len(toks) - 1
    if stride is None:
        def start(j):
            return (j // W) * W
    else:
        def start(j):
            return 0 if j < W else min(W + stride * math.ceil((j + 1 - W) / stride), T) - W
    nats, n, nbytes = 0.0, 0, 0
    _, n, nbytes = brute_force(model, toks, sp, start)
    for j in range(T):
        s = start(j)
        with torch.no_grad():
            logits = model(torch.as_tensor(toks[s:j + 1].astype(np.int64))[None])[0, -1].double()
        nats += float(tilt_losses(logits[None], torch.tensor([int(toks[j + 1])]), torch.tensor([int(hat[j + 1])]),
                                  cfg.boost)[0])
    res = evaluate_tokens(model, toks, byte_tables(sp1024, 1024), seq_len=W, stride=stride, batch_tokens=64,
                          tilt=cfg, log=None)
    assert (res.tokens, res.bytes) == (n, nbytes)
    assert res.val_loss == pytest.approx(nats / n, rel=1e-5)
    info = res.extra["tilt"]
    on = hat[1:] >= 0
    assert info["targets_tilted"] == on.sum() > 20
    assert info["proposal_right"] == pytest.approx((hat[1:][on] == toks[1:][on]).mean())
    plain = evaluate_tokens(model, toks, byte_tables(sp1024, 1024), seq_len=W, stride=stride, batch_tokens=64,
                            log=None)
    assert res.val_loss != plain.val_loss


def test_a_stream_without_repeats_scores_as_untilted(sp1024):
    model = tiny_model()
    toks = np.concatenate([[1], np.arange(2, 300)])  # no context ever recurs: nothing is proposed
    tables = byte_tables(sp1024, 1024)
    a = evaluate_tokens(model, toks, tables, seq_len=16, tilt=NgramTilt(), log=None)
    b = evaluate_tokens(model, toks, tables, seq_len=16, log=None)
    assert a.extra["tilt"]["targets_tilted"] == 0 and a.extra["tilt"]["proposal_right"] is None
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-6)


def test_settings_are_checked():
    for bad in (dict(order=0), dict(threshold=0.0), dict(threshold=1.5), dict(boost=-1.0),
                dict(boost=float("nan")), dict(min_count=0), dict(scope="corpus"), dict(table_bits=40)):
        with pytest.raises(ValueError, match="n-gram"):
            NgramTilt(**bad)


def test_ttt_scores_tilted_and_adapts_as_without(val_tokens, sp1024):
    """With TTT the tilt changes the scores, not the adaptation: a stream where nothing is proposed
    scores exactly as without it; on one with repeats, the same chunks adapt, and the tilted score
    differs, by an amount that vanishes with the boost."""
    tables, ttt = byte_tables(sp1024, 1024), TTTConfig(chunk=8, scope="doc")
    fresh = np.concatenate([[1], np.arange(2, 160)])
    a = evaluate_tokens(tiny_model(), fresh, tables, seq_len=16, ttt=ttt, tilt=NgramTilt(), log=None)
    b = evaluate_tokens(tiny_model(), fresh, tables, seq_len=16, ttt=ttt, log=None)
    assert a.extra["tilt"]["targets_tilted"] == 0 and a.val_loss == pytest.approx(b.val_loss, rel=1e-6)
    toks = val_tokens[:200].copy()
    toks[120:180] = toks[20:80]
    cfg = NgramTilt(order=4, threshold=0.5)
    tilted = evaluate_tokens(tiny_model(), toks, tables, seq_len=16, ttt=ttt, tilt=cfg, log=None)
    plain = evaluate_tokens(tiny_model(), toks, tables, seq_len=16, ttt=ttt, log=None)
    faint = evaluate_tokens(tiny_model(), toks, tables, seq_len=16, ttt=ttt,
                            tilt=NgramTilt(order=4, threshold=0.5, boost=1e-6), log=None)
    assert tilted.extra["tilt"]["targets_tilted"] > 20
    assert tilted.extra["ttt"]["adapted_chunks"] == plain.extra["ttt"]["adapted_chunks"] > 0
    assert tilted.val_loss != pytest.approx(plain.val_loss, rel=1e-4)
    assert faint.val_loss == pytest.approx(plain.val_loss, rel=1e-5)
