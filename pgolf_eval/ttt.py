"""Legal test-time training (TTT): score a chunk, then adapt on it, one left-to-right pass.

The field's four conditions hold by construction: the model stays causal and scores with a
normalized softmax over the vocabulary (``token_losses``); every chunk is scored under
``torch.inference_mode`` *before* any gradient step sees it; each document (or the carried stream)
is traversed once, in order. Chunks are the windows of the sliding planner with
``stride = chunk`` (or, with ``from_start``, windows that grow from each document's first chunk),
so each target is scored exactly once with up to ``seq_len`` of context.

Two variants: LoRA adapters on the model's ``CastedLinear`` layers, attached with forward hooks
(the model file is untouched), and full-weight fine-tuning. With per-document reset and LoRA,
many documents adapt in parallel, each with its own adapter slice of a batched bank; Adam is
element-wise and the loss is a sum of per-document means, so the documents stay independent.
With ``reset="carry"`` the adapted state flows from one document to the next, sequentially.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .evaluate import (Log, Progress, autocast_for, default_batch_tokens, dist_rank_world, gather_windows,
                       score_mask)
from .sliding import WindowPlan, document_segments, growing_windows, segment_windows

LORA_LR, FULL_LR = 3e-3, 1e-5  # Adam learning rates when TTTConfig.lr is None

# Short target names → the module-name suffixes they select in pgolf_train.model.GPT.
TARGET_ALIASES = {
    "q": ("attn.c_q",), "k": ("attn.c_k",), "v": ("attn.c_v",), "o": ("attn.proj",),
    "up": ("mlp.fc",), "down": ("mlp.proj",), "mlp": ("mlp.fc", "mlp.proj"),
    "attn": ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj"),
}


@dataclass(frozen=True)
class TTTConfig:
    """Test-time training settings; the defaults won the H200 sweeps (benchmarks/ttt_sweep.py).

    ``kind``: "lora" or "full"; ``rank``: LoRA rank; ``lr``: Adam learning rate (None: 3e-3 for
    LoRA, 1e-5 for full weights); ``epochs``: gradient steps per chunk; ``chunk``: targets scored
    (then trained on) per step; ``reset``: "doc" (fresh state per document, context within the
    document) or "carry"; ``targets``: LoRA targets, aliases of :data:`TARGET_ALIASES` or globs
    over module names. ``from_start``: chunk a document from its first token
    (:func:`~pgolf_eval.sliding.growing_windows`), so adaptation begins after its first chunk;
    False scores its first ``seq_len`` targets in one window, as sliding evaluation does, and adapts
    only from there (a third of FineWeb's targets sit in documents' first 1,024 tokens).

    On H200-300 artifacts (benchmarks/results/ttt_sweep_h200*.json): rank 8 on q,v at 1e-3 in chunks
    of 256, the first window scored whole, gave 1.5380 where every block matrix at 3e-3 in chunks of
    64 gave 1.5097; on the next artifact that setting's 1.5084 went to 1.4992 from the first token
    and 1.4976 at rank 16, for ~4x the evaluation time of the first setting.
    """

    kind: str = "lora"
    rank: int = 16
    lr: float | None = None
    epochs: int = 1
    chunk: int = 64
    reset: str = "doc"
    targets: tuple[str, ...] = ("attn", "mlp")
    seed: int = 0
    from_start: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "full"):
            raise ValueError(f"TTT kind must be 'lora' or 'full', got {self.kind!r}")
        if self.reset not in ("doc", "carry"):
            raise ValueError(f"TTT reset must be 'doc' or 'carry', got {self.reset!r}")
        for name, v, lo in (("rank", self.rank, 1), ("epochs", self.epochs, 0), ("chunk", self.chunk, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"TTT {name} must be an integer >= {lo}, got {v!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TTT lr must be a positive number, got {self.lr!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.kind == "lora" else FULL_LR)


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q, v,mlp"`` -> ``("q", "v", "mlp")``: the comma-separated target list of the CLI and configs."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def select_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers (``CastedLinear``/``nn.Linear``) named by ``targets``, in model order."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen, used = [], set()
    for name, m in linears:
        hits = [t for t in targets if (any(name == s or name.endswith("." + s) for s in TARGET_ALIASES[t])
                                       if t in TARGET_ALIASES else fnmatch.fnmatch(name, t))]
        used.update(hits)
        if hits:
            chosen.append((name, m))
    unused = [t for t in targets if t not in used]
    if unused or not chosen:  # a misspelt target would otherwise be dropped silently
        raise ValueError(f"TTT targets {unused or list(targets)} match no linear layer "
                         f"(have e.g. {[n for n, _ in linears[:6]]})")
    return chosen


class LoRABank:
    """Rank-``r`` adapters on ``modules``, one independent slice per lane: ``W x + B_i A_i x``.

    A: float32 ``(lanes, r, in)``, B: float32 ``(lanes, out, r)`` (zero, so a fresh adapter is the
    base model exactly). ``rows`` (int64 ``(b,)``) picks the lanes of the current batch rows.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Linear]], rank: int, lanes: int,
                 device: torch.device, seed: int) -> None:
        self.modules, self.rank, self.lanes, self.seed = modules, rank, lanes, seed
        self.A = [torch.zeros(lanes, rank, m.in_features, device=device, requires_grad=True) for _, m in modules]
        self.B = [torch.zeros(lanes, m.out_features, rank, device=device, requires_grad=True) for _, m in modules]
        self.rows = torch.arange(lanes, device=device)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(modules)]
        self.reset(range(lanes))

    def _hook(self, i: int):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]  # (b, T, in)
            a, b = self.A[i][self.rows].to(x.dtype), self.B[i][self.rows].to(x.dtype)
            return out + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)).to(out.dtype)
        return hook

    @torch.no_grad()
    def reset(self, keys: Sequence[int]) -> None:
        """Fresh adapters for lanes ``0..len(keys)-1``: B = 0 and A uniform in ±1/sqrt(in), drawn
        from a generator seeded by ``(seed, key)``. A document's key (its first token's position)
        fixes its adapter's start, so its score does not depend on which documents share its batch
        (16 documents of 1024 tokens per batch on a CPU by default, 128 on a GPU) or on the number
        of ranks."""
        gens = [torch.Generator(device="cpu").manual_seed(hash((self.seed, int(k))) & (2**63 - 1)) for k in keys]
        for a, (_, m) in zip(self.A, self.modules):
            bound = 1.0 / math.sqrt(m.in_features)  # kaiming-uniform-like scale for the down projection
            fresh = torch.stack([torch.rand(a.shape[1:], generator=g) for g in gens]).mul_(2 * bound).sub_(bound)
            a[:len(gens)].copy_(fresh)
        for b in self.B:
            b.zero_()

    def parameters(self) -> list[torch.Tensor]:
        return self.A + self.B

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _split_segments(segments: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous run of segments, balanced by token count (documents stay whole)."""
    if world == 1 or len(segments) == 0:
        return segments
    cum = np.cumsum(segments[:, 1] - segments[:, 0])
    mid = cum - (segments[:, 1] - segments[:, 0]) // 2
    bounds = np.searchsorted(mid, [int(cum[-1]) * r // world for r in range(world + 1)])
    bounds[-1] = len(segments)
    return segments[bounds[rank]:bounds[rank + 1]]


def _lanes(segments: np.ndarray, cfg: TTTConfig, seq_len: int, doc_isolated: bool) -> list[WindowPlan]:
    """Sequences of windows processed in order: one per document (reset) or one stream (carry)."""
    if len(segments) == 0:
        return []
    windows = growing_windows if cfg.from_start else segment_windows
    if cfg.reset == "doc" or doc_isolated:
        plans = [WindowPlan(*windows(int(b), int(e), seq_len, cfg.chunk)) for b, e in segments]
        if cfg.reset == "doc":
            return plans
        return [WindowPlan(*(np.concatenate([getattr(p, f) for p in plans]) for f in ("starts", "lengths", "score_from")))]
    return [WindowPlan(*windows(int(segments[0, 0]), int(segments[-1, 1]), seq_len, cfg.chunk))]


def run_ttt(model: torch.nn.Module, tokens: np.ndarray, cfg: TTTConfig, *, seq_len: int, device: torch.device,
            doc_isolated: bool = False, time_budget: float | None = None, bos_id: int = 1,
            batch_tokens: int | None = None, log: Log | None = None) -> tuple[float, int, int, int, dict[str, Any]]:
    """Score ``tokens`` with score-first TTT; returns ``(loss_sum_nats, tokens, lo, hi, info)``.

    This rank scores targets ``lo..hi-1``. ``time_budget`` (seconds from the start) bounds the
    whole pass: adaptation stops once the time spent plus a reserve for scoring the remaining
    chunks (their forwarded positions at the measured scoring cost, plus 10%) would pass it; the
    rest is scored without updates and ``info["budget_exceeded"]`` is set. The model's weights are
    restored before returning.
    """
    if cfg.chunk > seq_len:
        raise ValueError(f"TTT chunk {cfg.chunk} exceeds seq_len {seq_len}")
    rank, world = dist_rank_world()
    segments = _split_segments(document_segments(tokens, bos_id), rank, world)
    lanes = _lanes(segments, cfg, seq_len, doc_isolated)
    lo, hi = (int(segments[0, 0]), int(segments[-1, 1])) if len(segments) else (0, 0)
    batch_tokens = batch_tokens or default_batch_tokens(device)  # / seq_len = documents adapted at once
    group = max(1, batch_tokens // seq_len) if (cfg.kind == "lora" and cfg.reset == "doc") else 1
    lanes.sort(key=len, reverse=True)  # like-length documents share a batch

    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    snapshot = [p.detach().clone() for p in params] if cfg.kind == "full" else None
    bank = None
    if cfg.kind == "lora":
        bank = LoRABank(select_targets(model, cfg.targets), cfg.rank, group, device, cfg.seed)
        trainable = bank.parameters()
    else:
        trainable = [p for p in params if p.is_floating_point()]
        for p in trainable:
            p.requires_grad_(True)

    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = adapted = step = 0
    n_chunks = sum(len(l) for l in lanes)
    adapting, stopped_at, reserve = cfg.epochs > 0, None, 0.0
    positions = _step_positions(lanes, group)
    left = int(positions.sum())  # positions still to forward for scoring
    timer = _ScoreTimer(device)
    progress = Progress(f"ttt {cfg.kind} chunk={cfg.chunk}", sum(l.scored for l in lanes), log)
    model.eval()
    try:
        for g in range(0, len(lanes), group):
            members = lanes[g:g + group]
            if bank is not None:
                bank.reset([int(lane.starts[0]) for lane in members])
            elif cfg.reset == "doc":
                with torch.no_grad():
                    for p, s in zip(params, snapshot):
                        p.copy_(s)
            opt = torch.optim.Adam(trainable, lr=cfg.learning_rate)
            for k in range(len(members[0])):
                rows = [i for i, lane in enumerate(members) if len(lane) > k]
                starts = np.array([members[i].starts[k] for i in rows])
                lengths = np.array([members[i].lengths[k] for i in rows])
                score_from = np.array([members[i].score_from[k] for i in rows])
                width = int(lengths.max())
                x, y = (t.to(device, non_blocking=True) for t in gather_windows(tokens, starts, lengths, width))
                mask = score_mask(lengths, score_from, width).to(device)
                if bank is not None:
                    bank.rows = torch.as_tensor(rows, device=device)
                # 1. score: no gradient can flow from these losses into any update
                timed = adapting and time_budget is not None and step % 8 == 0  # a sample: it synchronizes
                with timer(timed, int(positions[step])), torch.inference_mode(), autocast_for(device):
                    losses = model.token_losses(x, y)
                    total += torch.where(mask, losses.float(), 0.0).sum(dtype=torch.float64)
                count += int((lengths - score_from).sum())
                left -= int(positions[step])
                step += 1
                # 2. adapt on the chunk just scored, where a later chunk can still benefit, while the
                # time left covers scoring what remains
                if adapting and time_budget is not None:
                    reserve, elapsed = 1.1 * timer.seconds_per_position * left, time.perf_counter() - t0
                    if elapsed + reserve > time_budget:
                        adapting, stopped_at = False, elapsed
                keep = [j for j, i in enumerate(rows) if cfg.reset == "carry" or len(members[i]) > k + 1]
                if adapting and keep and not (cfg.reset == "carry" and k + 1 == len(members[0])):
                    _adapt(model, opt, bank, x[keep], y[keep], mask[keep], [rows[j] for j in keep], cfg, device)
                    adapted += len(keep)
                progress.update(count, "  (time budget spent: scoring only)" if stopped_at is not None else "")
    finally:
        if bank is not None:
            bank.remove()
        if snapshot is not None:
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
    info = {"kind": cfg.kind, "rank": cfg.rank if cfg.kind == "lora" else None, "lr": cfg.learning_rate,
            "epochs": cfg.epochs, "chunk": cfg.chunk, "reset": cfg.reset, "targets": list(cfg.targets),
            "from_start": cfg.from_start,
            "adapted_modules": len(bank.modules) if bank is not None else None,
            "documents_in_parallel": group, "chunks": n_chunks, "adapted_chunks": adapted,
            "time_budget": time_budget, "budget_exceeded": stopped_at is not None,
            "stopped_adapting_at_s": stopped_at, "scoring_reserve_s": reserve if stopped_at is not None else None}
    return float(total.item()), count, lo, hi, info


def _step_positions(lanes: list[WindowPlan], group: int) -> np.ndarray:
    """Positions each step of :func:`run_ttt`'s loop forwards to score (documents in groups of
    ``group``, chunk ``k`` of each per step): its documents' windows, padded to the widest."""
    out = []
    for g in range(0, len(lanes), group):
        members = lanes[g:g + group]
        for k in range(len(members[0])):
            widths = [int(lane.lengths[k]) for lane in members if len(lane) > k]
            out.append(len(widths) * max(widths))
    return np.asarray(out, dtype=np.int64)


class _ScoreTimer:
    """Seconds per forwarded position of the scoring pass, from sampled steps (synchronized on a GPU,
    whose kernels run asynchronously)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.sync = self.device.type == "cuda"
        self.seconds = 0.0
        self.positions = 0

    @property
    def seconds_per_position(self) -> float:
        return self.seconds / self.positions if self.positions else 0.0

    @contextlib.contextmanager
    def __call__(self, timed: bool, positions: int):
        if not timed:
            yield
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t
        self.positions += positions


def _adapt(model: torch.nn.Module, opt: torch.optim.Optimizer, bank: LoRABank | None, x: torch.Tensor,
           y: torch.Tensor, mask: torch.Tensor, rows: list[int], cfg: TTTConfig, device: torch.device) -> None:
    """``cfg.epochs`` Adam steps on the scored positions of ``x``/``y`` (already scored)."""
    if bank is not None:
        bank.rows = torch.as_tensor(rows, device=device)
    weight = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # per-document mean: lanes independent
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        with autocast_for(device):
            losses = model.token_losses(x, y)
        (losses.float() * weight).sum().backward()
        opt.step()
