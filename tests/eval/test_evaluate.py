"""Exact bpb from an artifact: brute force agreement, coverage, document isolation, TTT legality."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf_eval.evaluate import evaluate_artifact, evaluate_tokens
from pgolf_eval.loader import EvalWarning, model_from_artifact
from pgolf_eval.ttt import TTTConfig, select_targets
from pgolf_train.tokenizer import byte_tables

from .conftest import pack, tiny_model


def brute_force(model, tokens: np.ndarray, sp: spm.SentencePieceProcessor, ctx_start) -> tuple[float, int, int]:
    """(nats, tokens, bytes) by a plain loop: one forward per target over its own context."""
    nats, nbytes, n = 0.0, 0, 0
    for j in range(len(tokens) - 1):
        s = ctx_start(j)
        if s is None:
            continue
        ctx = torch.as_tensor(tokens[s:j + 1].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ctx)[0, -1].double(), -1)
        t, p = int(tokens[j + 1]), int(tokens[j])
        nats -= float(logp[t])
        # the challenge's byte rule, spelled out from the SentencePiece pieces
        special = lambda i: sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)  # noqa: E731
        if not special(t):
            piece = sp.id_to_piece(t)
            lead = piece.startswith("\u2581")
            nbytes += 1 if sp.is_byte(t) else len(piece.lstrip("\u2581")[:len(piece) - lead].encode()) if lead else len(piece.encode())
            nbytes += int(lead and not special(p) and not sp.is_byte(t))
        n += 1
    return nats, n, nbytes


@pytest.fixture(scope="module")
def sp(sp1024):
    return spm.SentencePieceProcessor(model_file=str(sp1024))


@pytest.mark.parametrize("mode", ["plain", "truncate", "sliding"])
def test_artifact_bpb_equals_brute_force(artifact, val_tokens, sp, sp1024, mode):
    model, _ = model_from_artifact(artifact)
    toks, W, S = val_tokens[:120], 16, 5
    T = len(toks) - 1
    if mode == "sliding":
        def start(j):  # the window scoring j ends at the first W + k*S >= j + 1 (capped at T)
            if j < W:
                return 0
            return min(W + S * math.ceil((j + 1 - W) / S), T) - W
    else:
        def start(j):
            if mode == "truncate" and j >= (T // W) * W:
                return None
            return (j // W) * W
    nats, n, nbytes = brute_force(model, toks, sp, start)
    res = evaluate_tokens(model, toks, byte_tables(sp1024, 1024), seq_len=W, stride=S if mode == "sliding" else None,
                          truncate=mode == "truncate", batch_tokens=64, log=None)
    assert (res.tokens, res.bytes) == (n, nbytes)
    assert res.mode == ("sliding" if mode == "sliding" else "plain")
    assert res.coverage == ("truncate" if mode == "truncate" else "full")
    assert res.val_loss == pytest.approx(nats / n, rel=1e-5)
    assert res.val_bpb == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)


def test_stride_equal_to_window_is_plain(val_tokens, sp1024):
    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    a = evaluate_tokens(model, val_tokens, tables, seq_len=16, log=None)
    b = evaluate_tokens(model, val_tokens, tables, seq_len=16, stride=16, log=None)
    c = evaluate_tokens(model, val_tokens, tables, seq_len=16, stride=4, log=None)
    assert (a.val_bpb, a.tokens, a.bytes, a.mode) == (b.val_bpb, b.tokens, b.bytes, "plain")
    assert c.mode == "sliding" and c.tokens == a.tokens and c.val_bpb != a.val_bpb


class Recorder(torch.nn.Module):
    """Scores with a fixed random loss per token id (or a wrapped model); records every call."""

    def __init__(self, vocab: int = 4096, inner: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.weights = torch.rand(vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls.append((idx.detach().clone(), targets.detach().clone(), torch.is_grad_enabled()))
        return self.inner.token_losses(idx, targets) if self.inner is not None else self.weights[targets]


def unique_stream(n: int, doc_len: int, seed: int = 0) -> np.ndarray:
    """Distinct ids (>= 2) so a token identifies its position; BOS (1) opens each document."""
    rng = np.random.default_rng(seed)
    toks = rng.permutation(np.arange(2, n + 2)).astype(np.uint16)
    toks[::doc_len] = 1
    toks[rng.integers(1, n, 3)] = 1  # a few short documents too
    return toks


@pytest.mark.parametrize("W,S,isolated", [(16, 16, False), (16, 3, False), (16, 5, True), (8, 1, True), (32, 7, False)])
def test_every_target_scored_exactly_once(W, S, isolated):
    toks = unique_stream(700, 53)
    tables = byte_tables_flat(4096)
    rec = Recorder()
    res = evaluate_tokens(rec, toks, tables, seq_len=W, stride=S, doc_isolated=isolated, batch_tokens=50, log=None)
    # random per-id losses: the sum matches only if each target is scored once (BOS ids repeat: counted by multiplicity)
    expected = rec.weights[torch.as_tensor(toks[1:].astype(np.int64))].double().sum().item()
    assert res.tokens == len(toks) - 1
    assert res.val_loss * res.tokens == pytest.approx(expected, rel=1e-12)


def byte_tables_flat(vocab: int):
    from pgolf_train.tokenizer import ByteTables
    return ByteTables(np.ones(vocab, np.int16), np.zeros(vocab, bool), np.zeros(vocab, bool))


@pytest.mark.parametrize("S", [16, 5])
def test_doc_isolated_context_never_crosses_bos(S):
    toks = unique_stream(600, 41)
    rec = Recorder()
    evaluate_tokens(rec, toks, byte_tables_flat(4096), seq_len=16, stride=S, doc_isolated=True, batch_tokens=64, log=None)
    where = {int(t): i for i, t in enumerate(toks) if t != 1}
    rows = 0
    for idx, targets, _ in rec.calls:
        for row, trow in zip(idx.tolist(), targets.tolist()):
            live = [t for t in row if t != 0]  # 0 = right padding
            # the row's stream position: from its first non-BOS input
            k = next(i for i, t in enumerate(live + trow) if t != 1)
            begin = where[(live + trow)[k]] - k
            assert live == toks[begin:begin + len(live)].tolist()  # one contiguous stretch of the stream
            # its context holds no BOS but possibly the one opening it: no token before its document
            assert 1 not in live[1:]
            rows += 1
    assert rows > 0


@pytest.mark.parametrize("cfg", [TTTConfig(chunk=6, rank=2, lr=0.05, epochs=2, from_start=False),
                                 TTTConfig(chunk=6, rank=2, lr=0.05, reset="carry", targets=("q", "v", "mlp"),
                                           from_start=False),
                                 TTTConfig(kind="full", chunk=6, lr=0.01),
                                 TTTConfig(chunk=6, rank=2, lr=0.05),
                                 TTTConfig(chunk=6, rank=2, scope="phased", phase_tokens=30, phase_lr=0.05, phase_batch=2),
                                 TTTConfig(chunk=6, rank=2, lr=0.05, scope="both", phase_tokens=30, phase_batch=2),
                                 TTTConfig(kind="full", chunk=6, lr=0.01, scope="phased", phase_tokens=30)])
def test_ttt_updates_only_on_scored_tokens(cfg):
    toks = unique_stream(100, 37)
    inner = tiny_model(vocab=4096)
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    rec = Recorder(inner=inner)
    res = evaluate_tokens(rec, toks, byte_tables_flat(4096), seq_len=16, ttt=cfg, batch_tokens=64, log=None)
    where = {int(t): i for i, t in enumerate(toks) if t != 1}
    scored: set[int] = set()
    n_updates = 0
    for _, targets, grad in rec.calls:
        pos = {where[int(t)] for t in targets.flatten() if int(t) > 1}
        if grad:  # a training step: every target it sees must have been scored already
            assert pos <= scored
            n_updates += 1
        else:
            scored |= pos
    t = res.extra["ttt"]
    assert n_updates > 0 and (t["adapted_chunks"] > 0 or t["phases_trained"] > 0) and res.mode == "ttt"
    assert res.tokens == len(toks) - 1
    assert all(torch.equal(before[k], v) for k, v in inner.state_dict().items())  # weights restored
    # adaptation changed the score relative to no adaptation, scored on the same windows
    frozen = evaluate_tokens(inner, toks, byte_tables_flat(4096), seq_len=16, log=None,
                             ttt=TTTConfig(chunk=6, epochs=0, reset=cfg.reset, from_start=cfg.from_start))
    assert frozen.val_loss != res.val_loss


def test_ttt_from_the_start_adapts_inside_the_first_window(val_tokens, sp1024):
    """Chunked from each document's first token, the frozen model scores exactly as sliding does
    (same context per target when seq_len is a multiple of the chunk), and adaptation now reaches
    documents no longer than one window, which the sliding layout leaves unadapted."""
    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    toks = val_tokens[:400]
    short = np.concatenate([[1], toks[1:12], [1], toks[20:30]]).astype(np.uint16)  # two documents < seq_len
    cfg = TTTConfig(chunk=4, rank=2, lr=0.05, from_start=False)
    late = evaluate_tokens(model, short, tables, seq_len=16, ttt=cfg, log=None)
    early = evaluate_tokens(model, short, tables, seq_len=16, ttt=TTTConfig(**{**cfg.__dict__, "from_start": True}),
                            log=None)
    assert late.extra["ttt"]["adapted_chunks"] == 0 and early.extra["ttt"]["adapted_chunks"] == 2 + 2  # all chunks but the last of each
    assert early.val_loss != late.val_loss and early.tokens == late.tokens == len(short) - 1


@pytest.mark.parametrize("from_start", [False, True])
def test_ttt_without_updates_equals_sliding(val_tokens, sp1024, from_start):
    """Either layout, frozen, scores each target with the context sliding evaluation gives it (the
    growing windows too, when seq_len is a multiple of the chunk)."""
    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    toks = val_tokens[:400]
    sliding = evaluate_tokens(model, toks, tables, seq_len=16, stride=4, doc_isolated=True, log=None)
    still = evaluate_tokens(model, toks, tables, seq_len=16, ttt=TTTConfig(chunk=4, epochs=0, from_start=from_start),
                            log=None)
    assert still.val_loss == pytest.approx(sliding.val_loss, rel=1e-6) and still.tokens == sliding.tokens
    assert still.val_bpb == pytest.approx(sliding.val_bpb, rel=1e-6)


def test_ttt_budget_stops_adapting(val_tokens, sp1024):
    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    toks = val_tokens[:400]
    sliding = evaluate_tokens(model, toks, tables, seq_len=16, stride=4, doc_isolated=True, log=None)
    spent = evaluate_tokens(model, toks, tables, seq_len=16, ttt=TTTConfig(chunk=4), time_budget=0.0, log=None)
    t = spent.extra["ttt"]
    assert t["budget_exceeded"] and t["adapted_chunks"] == 0
    assert spent.val_bpb == pytest.approx(sliding.val_bpb, rel=1e-6)


class FakeClock:
    """Stands in for the ``time`` module of pgolf_eval.ttt: time passes only when ``Timed`` forwards."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Timed(torch.nn.Module):
    """A model whose forwards cost fake seconds: 1 per scored position, 3 per adapted one."""

    def __init__(self, inner: torch.nn.Module, clock: FakeClock) -> None:
        super().__init__()
        self.inner, self.clock = inner, clock

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.clock.now += (3.0 if torch.is_grad_enabled() else 1.0) * idx.numel()
        return self.inner.token_losses(idx, targets)


def test_ttt_time_budget_keeps_time_to_score_what_remains(monkeypatch):
    """The budget bounds the whole pass: adaptation stops while the time left still covers scoring
    the remaining chunks (it once stopped only when the budget was spent, and the scoring tail ran over)."""
    from pgolf_eval import ttt as ttt_mod

    clock = FakeClock()
    monkeypatch.setattr(ttt_mod, "time", clock)
    toks, tables = unique_stream(900, 113), byte_tables_flat(4096)
    model, cfg = Timed(tiny_model(vocab=4096), clock), TTTConfig(chunk=4, rank=2, lr=0.05)
    free = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, batch_tokens=64, log=None)
    full_cost, clock.now = clock.now, 0.0
    budget = full_cost / 3
    res = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, batch_tokens=64, time_budget=budget, log=None)
    t = res.extra["ttt"]
    assert t["budget_exceeded"] and 0 < t["adapted_chunks"] < free.extra["ttt"]["adapted_chunks"]
    spent = clock.now - t["warmup_s"]  # the synthetic warm-up runs before the clock starts
    assert t["warmup_s"] > 0 and 0.8 * budget < spent <= budget  # the pass ends inside the budget, using most of it
    assert t["stopped_adapting_at_s"] + t["scoring_reserve_s"] > budget and res.tokens == free.tokens


def test_ttt_plan_counts_the_positions_each_step_forwards():
    from pgolf_eval.ttt import _grouped_schedule, _lanes, _step_positions
    from pgolf_eval.sliding import document_segments

    toks, cfg = unique_stream(700, 53), TTTConfig(chunk=4, rank=2, lr=0.05, scope="doc")
    rec = Recorder(inner=tiny_model(vocab=4096))
    evaluate_tokens(rec, toks, byte_tables_flat(4096), seq_len=16, ttt=TTTConfig(**{**cfg.__dict__, "epochs": 0}),
                    batch_tokens=48, log=None)
    forwarded = np.array([x.numel() for x, _, grad in rec.calls if not grad])  # one scoring forward per step
    lanes = sorted(_lanes(document_segments(toks, 1), cfg, 16, False), key=len, reverse=True)
    assert np.array_equal(_step_positions(_grouped_schedule(lanes, 48 // 16), lanes), forwarded)


def test_lora_ttt_per_document_is_independent_of_documents_per_batch(val_tokens, sp1024):
    """The CPU default batches 8x fewer documents than the GPU one; with per-document adapters,
    a per-document mean loss and element-wise Adam, the score must not depend on it."""
    from pgolf_eval.evaluate import CPU_BATCH_TOKENS, DEFAULT_BATCH_TOKENS, default_batch_tokens

    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    toks, cfg = val_tokens[:600], TTTConfig(chunk=4, rank=2, lr=0.05, scope="doc")
    one = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, batch_tokens=16, log=None)
    many = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, batch_tokens=16 * 64, log=None)
    assert one.extra["ttt"]["documents_in_parallel"] == 1 and many.extra["ttt"]["documents_in_parallel"] == 64
    assert one.extra["ttt"]["adapted_chunks"] == many.extra["ttt"]["adapted_chunks"] > 0
    # float32 bmm over 1 or 64 lanes rounds differently, and Adam carries that through ~100 steps
    # (6.6e-6 relative seen on a 2-core CPU); a document leaking into another moves it far more
    assert many.val_loss == pytest.approx(one.val_loss, rel=1e-4) and many.tokens == one.tokens
    assert default_batch_tokens("cpu") == CPU_BATCH_TOKENS < DEFAULT_BATCH_TOKENS == default_batch_tokens("cuda")
    cpu = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, log=None)  # no batch given: by device
    assert cpu.extra["ttt"]["documents_in_parallel"] == CPU_BATCH_TOKENS // 16


def test_evaluate_artifact_sidecar_rope_and_tokenizer_checks(tmp_path, val_dir, sp1024):
    from pgolf_train.shards import write_shard
    from pgolf_train.tokenizer import tokenizer_info

    art = pack(tmp_path / "a.pgolf", tiny_model(), sp1024)
    base = evaluate_artifact(art, val_dir, sp1024, log=None)
    assert base.extra["byte_source"] == "tables" and base.seq_len == 16 and base.tokens == 1499
    long = evaluate_artifact(art, val_dir, sp1024, seq_len=64, rope_scaling="yarn", log=None)
    # a TTT kind alone fits its chunk to a context shorter than the default chunk (256)
    ttt = evaluate_artifact(art, val_dir, sp1024, ttt="lora", max_tokens=200, log=None)
    assert ttt.extra["ttt"]["chunk"] == 16 and math.isfinite(ttt.val_bpb)
    assert long.extra["rope_factor"] == 4.0 and math.isfinite(long.val_bpb)
    # a byte sidecar decides the byte count
    for i, n in enumerate((700, 800)):
        write_shard(val_dir / f"fineweb_val_bytes_{i:06d}.bin", np.full(n, 2, np.uint16))
    side = evaluate_artifact(art, val_dir, sp1024, log=None)
    assert side.bytes == 2 * 1499 and side.val_loss == base.val_loss
    # tokenizer of another vocabulary: error; same vocabulary, other hash: warning
    info = tokenizer_info(sp1024)
    bad = pack(tmp_path / "b.pgolf", tiny_model(), None, tokenizer={**info, "vocab_size": 2048})
    with pytest.raises(ValueError, match="vocab 1024.*vocab 2048"):
        evaluate_artifact(bad, val_dir, sp1024, log=None)
    other = pack(tmp_path / "c.pgolf", tiny_model(), None, tokenizer={**info, "sha256": "0" * 64})
    with pytest.warns(EvalWarning, match="sha256"):
        evaluate_artifact(other, val_dir, sp1024, max_tokens=100, log=None)


def test_embedded_source_only_runs_with_trust(tmp_path, sp1024, val_dir):
    from .conftest import MODEL_PY

    src = MODEL_PY.read_text() + "\nARTIFACT_MARKER = 1\n"
    art = pack(tmp_path / "t.pgolf", tiny_model(), sp1024, code=src)
    with pytest.warns(EvalWarning, match="differs from the installed"):
        m, _ = model_from_artifact(art)
    assert type(m).__module__ == "pgolf_train.model"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trusted, _ = model_from_artifact(art, trust_code=True)
    assert type(trusted).__module__.startswith("pgolf_artifact_model_")
    assert getattr(__import__("sys").modules[type(trusted).__module__], "ARTIFACT_MARKER") == 1
    x = torch.randint(0, 1024, (1, 16))
    assert torch.equal(m.token_losses(x, x), trusted.token_losses(x, x))


def test_select_targets_takes_aliases_and_globs_and_names_a_target_that_matches_nothing():
    model = tiny_model()
    names = [n for n, _ in select_targets(model, ("attn", "mlp"))]
    assert len(names) == 6 * model.cfg.num_layers and names[0] == "blocks.0.attn.c_q"
    assert [n for n, _ in select_targets(model, ("blocks.0.*",))] == names[:6]
    with pytest.raises(ValueError, match=r"\['vv'\] match no linear layer"):
        select_targets(model, ("q", "vv"))  # one good target does not hide a misspelt one

