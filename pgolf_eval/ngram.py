"""A causal token n-gram that proposes the next token, and the scoring-time tilt toward it.

At each position ``t`` of the validation stream the longest context ``tokens[t-k:t]`` (``k <=
order``) that occurred earlier in the stream proposes the token that most often followed it; its
confidence is that token's share of what followed. Where the confidence reaches ``threshold`` the
model's distribution is tilted toward the proposal ``h``, ``p'(v) ∝ p(v)·e^(β·[v = h])``, which
needs no pass over the vocabulary:

    −log p'(y) = −log p(y) − β·[y = h] + log(1 + p(h)·(e^β − 1)).

It is score-first legal: the proposal at ``t`` reads only tokens before ``t`` (the tables learn
``tokens[t]`` after the proposal for ``t`` is made), in stream order, whatever order the windows
are scored in; no weight changes. The tables have a fixed size (``2**table_bits`` slots each,
direct-mapped: a colliding context replaces the one there), so memory does not grow with the
stream and a long stream only forgets. The defaults are the 1.0565 stack's (order 16, confidence
0.8, boost 2.625; benchmarks/README.md), not tuned on pgolf's validation documents.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from pgolf_codec.jit import njit
from pgolf_train.shards import BOS_ID


@dataclass(frozen=True)
class NgramTilt:
    """``order``: longest context in tokens; ``threshold``: least confidence in (0, 1] that tilts;
    ``boost``: β, in nats added to the proposal's logit; ``min_count``: how often the proposing
    context must have been seen (1: once is enough, as the records' rule reads; a context seen once
    has confidence 1); ``scope``: "stream" (contexts seen anywhere earlier in the stream) or "doc"
    (only earlier in the same document, documents starting at BOS); ``table_bits``: log2 of the
    slots per table."""

    order: int = 16
    threshold: float = 0.8
    boost: float = 2.625
    min_count: int = 1
    scope: str = "stream"
    table_bits: int = 22

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 64:
            raise ValueError(f"n-gram order must be in [1, 64], got {self.order}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"n-gram threshold must be in (0, 1], got {self.threshold}")
        if not (math.isfinite(self.boost) and self.boost > 0.0):
            raise ValueError(f"n-gram boost must be a positive number, got {self.boost}")
        if not 1 <= self.min_count <= 1 << 20:
            raise ValueError(f"n-gram min_count must be in [1, 2**20], got {self.min_count}")
        if self.scope not in ("stream", "doc"):
            raise ValueError(f"n-gram scope must be 'stream' or 'doc', got {self.scope!r}")
        if not 10 <= self.table_bits <= 26:
            raise ValueError(f"n-gram table_bits must be in [10, 26], got {self.table_bits}")


@njit(nogil=True)
def _propose(tokens, docs, starts, order, table_bits, out_tok, out_conf, out_seen):  # pragma: no cover - numba
    size = 1 << table_bits
    mask = np.uint64(size - 1)
    ctx_key = np.full(size, -1, np.int64)
    ctx_total = np.zeros(size, np.int32)
    ctx_best = np.full(size, -1, np.int32)
    ctx_best_n = np.zeros(size, np.int32)
    pair_key = np.full(size, -1, np.int64)
    pair_n = np.zeros(size, np.int32)
    keys = np.zeros(order, np.int64)
    mix = np.uint64(0x9E3779B97F4A7C15)
    key_mask = np.uint64(0x7FFFFFFFFFFFFFFF)  # keys stay non-negative: -1 marks an empty slot
    for t in range(len(tokens)):
        # the contexts tokens[t-k:t], k = 1..order, hashed nearest token first; with the document's
        # number in the hash, a context matches only within its document
        h = np.uint64(docs[t]) * mix
        kmax = min(order, t - starts[t])  # and no context reaches back past its document's start
        for k in range(1, kmax + 1):
            h = (h ^ np.uint64(tokens[t - k] + 1)) * mix
            keys[k - 1] = np.int64((h ^ np.uint64(k)) & key_mask)
        # 1. propose from the longest context seen before t
        out_tok[t] = -1
        out_conf[t] = 0.0
        out_seen[t] = 0
        for k in range(kmax, 0, -1):
            key = keys[k - 1]
            s = np.int64(np.uint64(key) & mask)
            if ctx_key[s] == key and ctx_total[s] > 0:
                out_tok[t] = ctx_best[s]
                out_conf[t] = ctx_best_n[s] / ctx_total[s]
                out_seen[t] = ctx_total[s]
                break
        # 2. then learn tokens[t] as what followed each context
        nxt = tokens[t]
        for k in range(1, kmax + 1):
            key = keys[k - 1]
            s = np.int64(np.uint64(key) & mask)
            if ctx_key[s] != key:
                ctx_key[s] = key
                ctx_total[s] = 0
                ctx_best[s] = -1
                ctx_best_n[s] = 0
            ctx_total[s] += 1
            pk = np.int64(((np.uint64(key) ^ np.uint64(nxt + 1)) * mix) & key_mask)
            ps = np.int64(np.uint64(pk) & mask)
            if pair_key[ps] != pk:
                pair_key[ps] = pk
                pair_n[ps] = 0
            pair_n[ps] += 1
            # a context evicted and seen again starts from 0, its pairs' counts may not have been
            # evicted: no count above the context's own total
            n = min(pair_n[ps], ctx_total[s])
            if n > ctx_best_n[s]:
                ctx_best_n[s] = n
                ctx_best[s] = nxt


def propose(tokens: np.ndarray, cfg: NgramTilt = NgramTilt(),
            bos_id: int = BOS_ID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every position ``t`` of ``tokens`` (shape ``(N,)``), from ``tokens[:t]`` alone: the proposed
    token (int64, -1 where no context was seen), its confidence (float32 in [0, 1]) and how often its
    context was seen (int32)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError(f"need a 1-D token stream, got shape {tokens.shape}")
    out_tok = np.empty(len(tokens), np.int32)
    out_conf = np.empty(len(tokens), np.float32)
    out_seen = np.empty(len(tokens), np.int32)
    docs = np.zeros(len(tokens), np.int64)
    starts = np.zeros(len(tokens), np.int64)
    if cfg.scope == "doc":
        bos = tokens == bos_id
        docs = np.cumsum(bos)
        starts = np.maximum.accumulate(np.where(bos, np.arange(len(tokens)), 0))
    _propose(tokens, docs, starts, cfg.order, cfg.table_bits, out_tok, out_conf, out_seen)
    return out_tok.astype(np.int64), out_conf, out_seen


def proposals(tokens: np.ndarray, cfg: NgramTilt = NgramTilt(), bos_id: int = BOS_ID) -> np.ndarray:
    """int64 ``(N,)``: the proposal for each position where its confidence reaches the threshold and its
    context was seen ``min_count`` times, else -1.

    Aligned with the stream (entry ``t`` is for target ``tokens[t]``), so the windows of a plan
    gather it as they gather their targets."""
    tok, conf, seen = propose(tokens, cfg, bos_id)
    return np.where((conf >= cfg.threshold) & (seen >= cfg.min_count), tok, -1)


def tilt_summary(cfg: NgramTilt, tokens: np.ndarray, hat: np.ndarray) -> dict:
    """The settings, and what the proposals ``hat`` (of :func:`proposals`) touch among the stream's
    targets ``tokens[1:]``: how many, their share, and how often the proposal is the target."""
    hat, targets = hat[1:], np.asarray(tokens)[1:]
    on = hat >= 0
    return {**asdict(cfg), "targets_tilted": int(on.sum()), "tilted_share": float(on.mean()),
            "proposal_right": float((hat[on] == targets[on]).mean()) if on.any() else None}


def tilt_losses(logits: Tensor, targets: Tensor, hat: Tensor, boost: float) -> Tensor:
    """Per-token −log p'(target) in nats (float32, the shape of ``targets``): the cross-entropy of
    ``logits`` (``(..., V)``) with the tilt toward ``hat`` (-1: none) by ``boost`` nats."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, targets.clamp(0, logits.size(-1) - 1).unsqueeze(-1)).squeeze(-1)
    on = hat >= 0
    log_p_hat = logits.gather(-1, hat.clamp(0, logits.size(-1) - 1).unsqueeze(-1)).squeeze(-1) - lse
    adjust = torch.log1p(torch.exp(log_p_hat) * math.expm1(boost)) - boost * (targets == hat).float()
    return nll + torch.where(on, adjust, torch.zeros_like(adjust))


def tilt_scorer(model: torch.nn.Module, boost: float):
    """``scorer(idx, targets, hat)`` for :func:`pgolf_eval.evaluate.score_plan`: the model's logits,
    the tilted per-token losses."""
    def scorer(idx: Tensor, targets: Tensor, hat: Tensor) -> Tensor:
        return tilt_losses(model.logits(idx), targets, hat, boost)
    return scorer
