"""TTT that never silently turns off: warm-up outside the clock, a robust cost estimate, adapted_fraction,
and phased (carried) adaptation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf_eval.evaluate import evaluate_tokens
from pgolf_eval.sliding import document_segments
from pgolf_eval.ttt import TTTConfig, _phase_plan, _stream_schedule, stream_slots

from .conftest import tiny_model
from .test_evaluate import FakeClock, Recorder, Timed, byte_tables_flat, unique_stream


class SlowStart(Timed):
    """``Timed``, but its first ``slow`` scoring forwards cost 50x: a GPU's first calls (context,
    kernel loading) once made the budget planner believe scoring would take 35x its real cost."""

    def __init__(self, inner: torch.nn.Module, clock: FakeClock, slow: int) -> None:
        super().__init__(inner, clock)
        self.slow = slow

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.slow > 0:
            self.slow -= 1
            self.clock.now += 49.0 * idx.numel()
        return super().token_losses(idx, targets)


def test_slow_first_calls_do_not_switch_adaptation_off(monkeypatch):
    """Five slow scoring calls (the warm-up's two and the first three steps'): with a budget that
    covers the real cost, every chunk still adapts and the score is the unbudgeted one."""
    from pgolf_eval import ttt as ttt_mod

    clock = FakeClock()
    monkeypatch.setattr(ttt_mod, "time", clock)
    toks, tables = unique_stream(900, 113), byte_tables_flat(4096)
    cfg = TTTConfig(chunk=4, rank=2, lr=0.05)
    free = evaluate_tokens(Timed(tiny_model(vocab=4096), clock), toks, tables, seq_len=16, ttt=cfg,
                           batch_tokens=64, log=None)
    budget, clock.now = 2 * clock.now, 0.0
    res = evaluate_tokens(SlowStart(tiny_model(vocab=4096), clock, slow=5), toks, tables, seq_len=16, ttt=cfg,
                          batch_tokens=64, time_budget=budget, log=None)
    t = res.extra["ttt"]
    assert not t["budget_exceeded"] and t["adapted_fraction"] == 1.0
    assert t["adapted_chunks"] == free.extra["ttt"]["adapted_chunks"] > 0
    assert res.val_loss == pytest.approx(free.val_loss, rel=1e-9)
    assert t["warmup_s"] > 0 and t["cost_samples"] >= 3


@pytest.mark.parametrize("scope", ["doc", "phased", "both"])
def test_tiny_budget_scores_every_token_and_says_how_little_adapted(val_tokens, sp1024, scope):
    from pgolf_train.tokenizer import byte_tables

    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    # (one document in flight; the carried adapter first updates after 800 finished targets, and what is
    # scored before that counts as adapted only while the budget still covers the updates)
    toks, cfg = val_tokens[:1200], TTTConfig(chunk=4, rank=2, lr=0.05, scope=scope, phase_tokens=800, parallel_docs=1)
    full = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, time_budget=1e6, log=None)
    tiny = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, time_budget=1e-3, log=None)
    assert full.extra["ttt"]["adapted_fraction"] == 1.0 and not full.extra["ttt"]["budget_exceeded"]
    assert tiny.tokens == full.tokens == len(toks) - 1 and tiny.bytes == full.bytes
    assert tiny.extra["ttt"]["budget_exceeded"] and tiny.extra["ttt"]["adapted_fraction"] < 0.5
    if scope != "doc":  # the carried adapter too: every planned update was refused
        assert full.extra["ttt"]["phases_trained"] > 0 and tiny.extra["ttt"]["phases_trained"] == 0


def test_warmup_runs_on_synthetic_tokens_and_changes_nothing():
    toks, tables = unique_stream(300, 37), byte_tables_flat(4096)
    cfg = TTTConfig(chunk=6, rank=2, lr=0.05)
    cold, warm = Recorder(inner=tiny_model(vocab=4096)), Recorder(inner=tiny_model(vocab=4096))
    a = evaluate_tokens(cold, toks, tables, seq_len=16, ttt=cfg, batch_tokens=64, log=None)
    from pgolf_eval.ttt import run_ttt

    loss, count, info = run_ttt(warm, toks, cfg, seq_len=16, device=torch.device("cpu"), batch_tokens=64,
                             warmup=True)
    n_warm = len(warm.calls) - len(cold.calls)
    assert n_warm == 4 and info["warmup_s"] > 0  # scoring and adapting passes at the chunk and full width
    stream = toks.astype(np.int64).tolist()
    for idx, _, _ in warm.calls[:n_warm]:  # no warm-up row is a window of the validation stream
        for row in idx.tolist():
            assert not any(stream[i:i + len(row)] == row for i in range(len(stream) - len(row) + 1))
    for (x1, y1, g1), (x2, y2, g2) in zip(cold.calls, warm.calls[n_warm:]):
        assert g1 == g2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert loss / count == pytest.approx(a.val_loss, rel=1e-9)


def test_stream_schedule_fills_freed_slots_in_stream_order():
    steps = _stream_schedule([3, 1, 2, 1], slots=2)
    rows = [st.tolist() for st in steps]
    # slot 1 frees after document 1's single chunk: document 2 takes it, then document 3 takes slot 0
    assert rows == [[[0, 0, 0], [1, 1, 0]], [[0, 0, 1], [1, 2, 0]], [[0, 0, 2], [1, 2, 1]], [[0, 3, 0]]]
    # every chunk of every document exactly once, each document's in order
    flat = [(lane, k) for st in steps for _, lane, k in st.tolist()]
    assert sorted(flat) == [(d, k) for d, n in enumerate([3, 1, 2, 1]) for k in range(n)]


def test_phase_plan_trains_only_on_documents_already_scored_in_full():
    seg = np.array([[0, 10], [10, 50], [50, 55], [55, 60], [60, 200], [200, 210]])
    chunks = [1, 4, 1, 1, 14, 1]
    steps = _stream_schedule(chunks, slots=2)
    plan = _phase_plan(steps, seg, 40)
    done = {}  # document -> the step its last chunk was scored
    for s, st in enumerate(steps):
        for _, lane, k in st.tolist():
            if k + 1 == chunks[lane]:
                done[lane] = s
    trained = []
    for s, docs in sorted(plan.items()):
        for b, e in docs.tolist():
            lane = seg[:, 0].tolist().index(b)
            assert done[lane] <= s  # scored in full before the step the adapter learns from it
            trained.append(lane)
        assert (docs[:, 1] - docs[:, 0]).sum() >= 40 and s + 1 < len(steps)
    assert trained == sorted(set(trained)) and len(plan) >= 1  # each document once, in stream order


def test_stream_slots_follow_the_longest_document():
    assert stream_slots(TTTConfig(), [10, 10, 10, 10], cap=128) == 8  # 2 x 40 / 10
    assert stream_slots(TTTConfig(), [100, 1, 1, 1], cap=128) == 3
    assert stream_slots(TTTConfig(), [1] * 1000, cap=128) == 128
    assert stream_slots(TTTConfig(parallel_docs=5), [1] * 1000, cap=128) == 5


@pytest.mark.parametrize("scope", ["phased", "both"])
def test_phased_ttt_carries_what_earlier_documents_taught(val_tokens, sp1024, scope):
    """The carried adapter changes what is scored after its first update only: with one document in
    flight, the documents before it score exactly as without it, and the rest differently."""
    from pgolf_train.tokenizer import byte_tables

    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    toks = val_tokens[:1200]
    cfg = TTTConfig(chunk=4, rank=2, lr=0.05, scope=scope, phase_tokens=250, phase_lr=0.05, phase_batch=2,
                    parallel_docs=1)
    res = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, log=None)
    base = TTTConfig(chunk=4, rank=2, lr=0.05, epochs=0 if scope == "phased" else 1)
    ref = evaluate_tokens(model, toks, tables, seq_len=16, ttt=base, log=None)
    t = res.extra["ttt"]
    assert t["phases"] >= 3 and t["phases_trained"] == t["phases"] - 1 and t["adapted_fraction"] == 1.0
    seg = document_segments(toks, 1)
    first = int(np.searchsorted(np.cumsum(seg[:, 1] - seg[:, 0]), 250)) + 1  # documents before the first update
    assert 0 < first < len(seg)
    assert res.per_doc["loss"][:first] == pytest.approx(ref.per_doc["loss"][:first], rel=1e-5)
    assert res.per_doc["loss"][first:] != pytest.approx(ref.per_doc["loss"][first:], rel=1e-3)
    assert res.tokens == ref.tokens and res.bytes == ref.bytes


def test_scope_settings_are_checked():
    with pytest.raises(ValueError, match="scope"):
        TTTConfig(scope="global")
    with pytest.raises(ValueError, match="kind must be 'lora'"):
        TTTConfig(kind="full", scope="both")
    with pytest.raises(ValueError, match="carry"):
        TTTConfig(scope="phased", reset="carry")
    with pytest.raises(ValueError, match="phase_tokens"):
        TTTConfig(scope="phased", phase_tokens=0)
