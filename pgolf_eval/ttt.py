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

Phased TTT (``scope="phased"``, or ``"both"`` with per-document LoRA on top) carries one adapter
across documents: documents enter a few slots in stream order (continuous batching); once the
documents finished since the last update hold about ``phase_tokens`` targets, all scored, the
carried adapter takes Adam steps on them and every later chunk is scored with it. Short documents,
which per-document adaptation barely reaches, gain from what earlier documents taught. All ranks
follow one schedule of the whole stream and sum their gradients, so the carried state agrees and
the score does not depend on the number of ranks.

Timing: any warm-up (first CUDA calls, kernel loading) runs on synthetic tokens before the clock
starts; the scoring cost that the time budget plans with is sampled only after the first steps.

Early exit (a model with exit heads and ``exit_threshold`` set, ``pgolf eval --early-exit``): the
whole pass runs in eval mode, where the model applies the exit rule to every forward, so the
threshold is lifted around every adaptation forward (per-chunk steps, phase training, the warm-up's
training pass): adapters learn from the last layer's loss, and only scoring forwards exit and are
counted in ``exit_counts`` (the warm-up's synthetic scoring forwards are taken out again). An
exited token is scored by its exit head, whose state the adapted layers below it still shape.
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

from .breakdown import TargetLosses
from .batches import (Log, Progress, all_reduce_sums, autocast_for, default_batch_tokens, dist_rank_world,
                      gather_windows, score_mask)
from .sliding import WindowPlan, document_segments, growing_windows, segment_windows

LORA_LR, FULL_LR = 3e-3, 1e-5  # Adam learning rates when TTTConfig.lr is None
SCOPES = ("doc", "phased", "both")
WARMUP_STEPS = 2  # scoring-cost samples dropped after the synthetic warm-up (shapes still new)
MIN_SAMPLES = 3  # samples the budget needs before it may stop adaptation

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

    ``scope``: "doc" (adapters per document, as above), "phased" (one adapter carried over the
    stream, trained, once the documents finished since its last update hold ``phase_tokens``
    targets, on those documents: ``phase_epochs`` passes in steps of ``phase_batch`` windows of
    ``seq_len``, Adam at ``phase_lr``, default the per-document rate) or "both" (the carried
    adapter, with per-document LoRA on top; the default with LoRA reset per document, else "doc").
    On the H200-300 artifact of 8c84de3 (ttt_sweep_h200_stream.json) per-document LoRA scored 1.4968,
    phased 1.5290, both 1.4865 and both with updates every 8,192 targets 1.4853, better than
    sliding in every length bucket (-0.054 under 512 tokens, -0.035 for 512-2K, -0.046 for 2K-8K,
    -0.102 from 8K) and than 32,768 (paired -0.0012, interval [-0.0019, -0.0007]). ``parallel_docs``: documents in flight in the phased
    scopes (0: :func:`stream_slots` picks them from the stream's lengths); the pass takes at least
    as many steps as the longest document has chunks, whatever the count.
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
    scope: str | None = None
    phase_tokens: int = 8192
    phase_epochs: int = 1
    phase_lr: float | None = None
    phase_batch: int = 16
    parallel_docs: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "full"):
            raise ValueError(f"TTT kind must be 'lora' or 'full', got {self.kind!r}")
        if self.reset not in ("doc", "carry"):
            raise ValueError(f"TTT reset must be 'doc' or 'carry', got {self.reset!r}")
        if self.scope is None:  # the measured default where it applies: LoRA reset per document
            object.__setattr__(self, "scope", "both" if self.kind == "lora" and self.reset == "doc" else "doc")
        if self.scope not in SCOPES:
            raise ValueError(f"TTT scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.scope != "doc" and self.reset != "doc":
            raise ValueError("TTT reset='carry' is the sequential per-chunk carry; phased scopes carry by phase")
        if self.scope == "both" and self.kind != "lora":
            raise ValueError("TTT scope 'both' puts per-document LoRA on the carried adapter: kind must be 'lora'")
        for name, v, lo in (("rank", self.rank, 1), ("epochs", self.epochs, 0), ("chunk", self.chunk, 1),
                            ("phase_tokens", self.phase_tokens, 1), ("phase_epochs", self.phase_epochs, 0),
                            ("phase_batch", self.phase_batch, 1), ("parallel_docs", self.parallel_docs, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TTT {name} must be an integer >= {lo}, got {v!r}")
        for name, v in (("lr", self.lr), ("phase_lr", self.phase_lr)):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"TTT {name} must be a positive number, got {v!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.kind == "lora" else FULL_LR)

    @property
    def phase_learning_rate(self) -> float:
        return self.phase_lr if self.phase_lr is not None else self.learning_rate


ADAPTED_WARN = 0.95  # a TTT result that adapted less of the stream than this is flagged


def adaptation_note(info: dict[str, Any]) -> tuple[str, bool]:
    """``("TTT adapted 37% of the stream: time budget ...", warn)`` for a TTT ``info`` dict; ``warn``
    when less than :data:`ADAPTED_WARN` of the stream was adapted."""
    frac = float(info.get("adapted_fraction") or 0.0)
    text = f"TTT adapted {frac:.0%} of the stream"
    if info.get("budget_exceeded"):
        text += (f": time budget (adaptation stopped at {info['stopped_adapting_at_s']:.1f} s of "
                 f"{info['time_budget']:g} s, keeping {info['scoring_reserve_s'] or 0:.1f} s to score the rest)")
    elif frac == 0.0:
        text += ": no adaptation steps were asked for (epochs = 0)"
    return text, frac < ADAPTED_WARN


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q, v,mlp"`` -> ``("q", "v", "mlp")``: the comma-separated target list of the CLI and configs."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def select_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers (``CastedLinear``/``nn.Linear``) named by ``targets``, in model order.

    LoRA adapts a layer through a hook on its forward, so a selected layer whose forward never runs
    (an MoE expert, whose weights the MoE module stacks into one batched matmul; an untied
    ``lm_head``, applied as a weight) would adapt nothing: that is a ValueError naming them, found
    with one forward of two tokens under counting hooks (on the meta device, where no forward runs:
    the layers inside a module of class ``MoE``)."""
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
    silent = _never_called(model, chosen)
    if silent:
        raise ValueError(f"TTT targets {list(targets)} select {len(silent)} linear layer(s) whose forward never runs, "
                         f"so LoRA hooks on them would adapt nothing: {silent[:8]}{' ...' if len(silent) > 8 else ''} "
                         "(an MoE multiplies its experts' weights directly, an untied lm_head is applied as a weight); "
                         "choose other targets")
    return chosen


def _never_called(model: torch.nn.Module, chosen: list[tuple[str, torch.nn.Module]]) -> list[str]:
    """The names in ``chosen`` whose forward a two-token forward of ``model`` does not call (on the
    meta device, where nothing runs: those inside a module of class name ``MoE``). The probe leaves
    no trace: no gradient, ``exit_counts`` restored."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta" or not hasattr(model, "logits"):
        moe = [n + "." for n, m in model.named_modules() if type(m).__name__ == "MoE"]
        return [name for name, _ in chosen if any(name.startswith(p) for p in moe)]
    fired: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: fired.add(name)) for name, m in chosen]
    counts = getattr(model, "exit_counts", None)
    saved = counts.clone() if isinstance(counts, torch.Tensor) else None
    try:
        with torch.inference_mode():
            model.logits(torch.zeros(1, 2, dtype=torch.long, device=param.device))
    finally:
        for h in handles:
            h.remove()
        if saved is not None:
            counts.copy_(saved)
    return [name for name, _ in chosen if name not in fired]


@contextlib.contextmanager
def exits_off(model: torch.nn.Module):
    """The block's forwards without the early-exit rule (``exit_threshold`` None), restored after:
    adaptation trains on the last layer's loss, and is not counted in ``exit_counts``."""
    tau = getattr(model, "exit_threshold", None)
    if tau is None:
        yield
        return
    model.exit_threshold = None
    try:
        yield
    finally:
        model.exit_threshold = tau


class LoRABank:
    """Rank-``r`` adapters on ``modules``, one independent slice per lane: ``W x + B_i A_i x``.

    All adapters of a lane live in one row of ``flat``, float32 ``(lanes, P)``: per module, A
    ``(r, in)`` then B ``(out, r)`` (zero, so a fresh adapter is the base model exactly). ``rows``
    (int64 ``(b,)``) picks the lanes of the current batch rows; ``rows = None`` applies lane 0 to
    every row (the carried adapter of phased TTT). A forward gathers the batch's lanes once (one
    gather, one scatter-add in the backward, one optimizer update over ``flat``), not per module.
    """

    def __init__(self, modules: list[tuple[str, torch.nn.Linear]], rank: int, lanes: int,
                 device: torch.device, seed: int) -> None:
        self.modules, self.rank, self.lanes, self.seed = modules, rank, lanes, seed
        self.slices, off = [], 0  # per module: (A offset, B offset, in, out)
        for _, m in modules:
            self.slices.append((off, off + rank * m.in_features, m.in_features, m.out_features))
            off += rank * (m.in_features + m.out_features)
        self.flat = torch.zeros(lanes, off, device=device, requires_grad=True)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self.rows = torch.arange(lanes, device=device)
        self.active = True
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(modules)]
        self.reset(range(lanes))

    @property
    def rows(self) -> torch.Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: torch.Tensor | None) -> None:
        self._rows, self._cache = rows, None

    def _selected(self, dtype: torch.dtype) -> torch.Tensor:
        """The current rows' lanes in ``dtype``: ``(b, P)``, or ``(P,)`` with ``rows = None``; made once per
        forward (the key changes with every in-place update of ``flat`` and with the grad mode)."""
        key = (self.flat._version, self.flat.requires_grad, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(), dtype)
        if self._cache is None or self._cache[0] != key:
            sel = self.flat[0] if self._rows is None else self.flat[self._rows]
            self._cache = (key, sel.to(dtype))
        return self._cache[1]

    def _hook(self, i: int):
        a0, b0, fan_in, fan_out = self.slices[i]
        r = self.rank

        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]  # (b, T, in)
            if not self.active:
                return out
            sel = self._selected(x.dtype)
            if self._rows is None:
                a, b = sel[a0:b0].view(r, fan_in), sel[b0:b0 + fan_out * r].view(fan_out, r)
                return out + ((x @ a.t()) @ b.t()).to(out.dtype)
            a = sel[:, a0:b0].view(-1, r, fan_in)
            b = sel[:, b0:b0 + fan_out * r].view(-1, fan_out, r)
            return out + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)).to(out.dtype)
        return hook

    @torch.no_grad()
    def reset(self, keys: Sequence[int], lanes: Sequence[int] | None = None) -> None:
        """Fresh adapters for ``lanes`` (default ``0..len(keys)-1``): B = 0 and A uniform in ±1/sqrt(in), drawn
        from a generator seeded by ``(seed, key)``. A document's key (its first token's position)
        fixes its adapter's start, so its score does not depend on which documents share its batch
        (16 documents of 1024 tokens per batch on a CPU by default, 128 on a GPU) or on the number
        of ranks."""
        gens = [torch.Generator(device="cpu").manual_seed(hash((self.seed, int(k))) & (2**63 - 1)) for k in keys]
        fresh = torch.zeros(len(gens), self.flat.shape[1])
        for a0, b0, fan_in, _ in self.slices:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform-like scale for the down projection
            for j, g in enumerate(gens):
                fresh[j, a0:b0] = torch.rand(self.rank, fan_in, generator=g).mul_(2 * bound).sub_(bound).flatten()
        idx = torch.as_tensor(list(range(len(keys))) if lanes is None else list(lanes), dtype=torch.long)
        self.flat[idx.to(self.flat.device)] = fresh.to(self.flat.device)
        self._cache = None

    def parameters(self) -> list[torch.Tensor]:
        return [self.flat]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def requires_grad_(self, flag: bool) -> None:
        self.flat.requires_grad_(flag)
        self._cache = None


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


# A schedule is a list of steps; a step is an int64 array of rows (slot, lane, k): the slot (adapter
# lane of the bank) that scores chunk k of lane (document) `lane` at that step. k == 0 is the document
# entering its slot, where its adapter starts fresh.

def _grouped_schedule(lanes: list[WindowPlan], group: int) -> list[np.ndarray]:
    """Per-document scope: lanes (sorted longest first) in groups of ``group`` that start together,
    so like-length documents share a batch and their windows share a width."""
    steps = []
    for g in range(0, len(lanes), group):
        members = lanes[g:g + group]
        for k in range(len(members[0])):
            steps.append(np.array([(i, g + i, k) for i, lane in enumerate(members) if len(lane) > k], np.int64))
    return steps


def _stream_schedule(lengths: Sequence[int], slots: int) -> list[np.ndarray]:
    """Phased scopes: documents enter ``slots`` slots in stream order (continuous batching); a slot
    whose document ends takes the next one at the next step. ``lengths``: chunks per document."""
    queue = iter(range(len(lengths)))
    busy = {s: [lane, 0] for s, lane in zip(range(slots), queue)}
    steps = []
    while busy:
        steps.append(np.array([(s, lane, k) for s, (lane, k) in busy.items()], np.int64))
        for s in list(busy):
            busy[s][1] += 1
            if busy[s][1] == lengths[busy[s][0]]:
                nxt = next(queue, None)
                if nxt is None:
                    del busy[s]
                else:
                    busy[s] = [nxt, 0]
    return steps


def stream_slots(cfg: TTTConfig, chunks: Sequence[int], cap: int) -> int:
    """Documents in flight in the phased scopes: ``cfg.parallel_docs``, or (0) twice the fewest that
    keep the pass no longer than the longest document (``2 * total chunks / longest``), at most ``cap``.
    Fewer slots score more documents after the carried adapter has learned from earlier ones."""
    if cfg.parallel_docs:
        return cfg.parallel_docs
    if len(chunks) == 0:
        return 1
    return int(max(1, min(cap, math.ceil(2 * sum(chunks) / max(chunks)))))


def _phase_plan(steps: list[np.ndarray], segments: np.ndarray, phase_tokens: int) -> dict[int, np.ndarray]:
    """Step index -> the documents (segments, stream order) the carried adapter trains on after it:
    those finished since the previous training, once they hold ``phase_tokens`` targets. Every
    document in it was scored in full at or before that step."""
    plan, pending, acc = {}, [], 0
    n_chunks = np.zeros(len(segments), np.int64)
    for st in steps:
        np.maximum.at(n_chunks, st[:, 1], st[:, 2] + 1)
    done_at: dict[int, list[int]] = {}
    for s, st in enumerate(steps):
        for lane, k in st[:, 1:]:
            if k + 1 == n_chunks[lane]:
                done_at.setdefault(s, []).append(int(lane))
    for s in sorted(done_at):
        for lane in done_at[s]:
            pending.append(lane)
            acc += int(segments[lane, 1] - segments[lane, 0])
        if acc >= phase_tokens and s + 1 < len(steps):  # after the last step, nothing is left to help
            plan[s] = segments[np.sort(pending)]
            pending, acc = [], 0
    return plan


def run_ttt(model: torch.nn.Module, tokens: np.ndarray, cfg: TTTConfig, *, seq_len: int, device: torch.device,
            doc_isolated: bool = False, time_budget: float | None = None, bos_id: int = 1,
            batch_tokens: int | None = None, log: Log | None = None, target_losses: TargetLosses | None = None,
            warmup: bool | None = None, tilt: Any = None,
            tilt_proposals: np.ndarray | None = None) -> tuple[float, int, dict[str, Any]]:
    """Score ``tokens`` with score-first TTT; returns ``(loss_sum_nats, tokens, info)`` of this rank.

    Scope "doc": this rank scores a contiguous run of documents, like-length ones batched together.
    Phased scopes: all ranks follow one schedule of the whole stream (documents in stream order
    through :func:`stream_slots` slots, slot ``s`` on rank ``s % world``), so the result does not
    depend on the number of ranks; the carried adapter trains after the steps :func:`_phase_plan`
    names, every rank at once. ``target_losses`` records which targets this rank scored.
    ``time_budget`` (seconds from the start) bounds the whole pass: adaptation stops once the time
    spent plus a reserve for scoring what remains (its forwarded positions at the sampled scoring
    cost, plus 10%) would pass it; the rest is scored without updates and ``info["budget_exceeded"]``
    is set. ``info["adapted_fraction"]`` is the share of scored targets processed while adaptation
    was on. ``warmup`` (default: with a time budget or on a GPU) first runs the scoring and adapting
    passes on synthetic tokens, outside the clock. The model's weights are restored before returning.
    ``tilt`` (a :class:`pgolf_eval.ngram.NgramTilt`): the scores (not the adaptation, which trains on
    the model's own loss) are tilted toward the causal n-gram's confident proposals
    (``tilt_proposals``, :func:`pgolf_eval.ngram.proposals` of ``tokens``, when the caller has them).
    """
    if cfg.chunk > seq_len:
        raise ValueError(f"TTT chunk {cfg.chunk} exceeds seq_len {seq_len}")
    device = torch.device(device)
    rank, world = dist_rank_world()
    hat, tilted = tilt_proposals, None
    if tilt is not None:
        from .ngram import proposals, tilt_scorer

        hat = proposals(tokens, tilt, bos_id) if hat is None else hat
        tilted = tilt_scorer(model, tilt.boost)
    segments = document_segments(tokens, bos_id)
    batch_tokens = batch_tokens or default_batch_tokens(device)  # / seq_len = documents adapted at once
    per_doc, carries = cfg.scope != "phased", cfg.scope != "doc"
    parallel = cfg.reset == "doc" and (cfg.kind == "lora" or not per_doc)
    group = max(1, batch_tokens // seq_len) if parallel else 1
    if carries:  # one schedule of the whole stream; this rank takes every world-th slot
        lanes = _lanes(segments, cfg, seq_len, doc_isolated)
        chunks = [len(lane) for lane in lanes]
        slots = stream_slots(cfg, chunks, group * world)
        steps = _stream_schedule(chunks, slots)
        train_after = _phase_plan(steps, segments, cfg.phase_tokens)
        steps = [st[st[:, 0] % world == rank] for st in steps]
        for st in steps:
            st[:, 0] //= world
        lanes_per_rank = -(-slots // world)
    else:
        lanes = sorted(_lanes(_split_segments(segments, rank, world), cfg, seq_len, doc_isolated),
                       key=len, reverse=True)
        steps, train_after, slots = _grouped_schedule(lanes, group), {}, group
        lanes_per_rank = group

    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    snapshot = [p.detach().clone() for p in params] if cfg.kind == "full" else None
    bank = carried = None
    if cfg.kind == "lora":
        modules = select_targets(model, cfg.targets)
        if carries:
            carried = LoRABank(modules, cfg.rank, 1, device, cfg.seed)
            carried.reset([-1])
            carried.rows = None
            carried.requires_grad_(False)  # trained only after the planned steps (_phase_training)
        if per_doc:
            bank = LoRABank(modules, cfg.rank, lanes_per_rank, device, cfg.seed)
    full = [p for p in params if p.is_floating_point()] if cfg.kind == "full" else []
    for p in full:
        p.requires_grad_(True)
    doc_params = bank.parameters() if bank is not None else (full if per_doc else [])
    phase_params = carried.parameters() if carried is not None else ([] if per_doc else full)
    phase_opt = torch.optim.Adam(phase_params, lr=cfg.phase_learning_rate) if phase_params else None
    lane_opt = _LaneAdam(bank, cfg.learning_rate) if bank is not None else None

    doc_adapting = per_doc and cfg.epochs > 0
    phase_adapting = phase_opt is not None and cfg.phase_epochs > 0 and bool(train_after)
    warm_s = None
    if warmup is None:  # where timing matters: a budget to plan, or a GPU's first-call costs
        warmup = time_budget is not None or device.type == "cuda"
    if warmup:
        with contextlib.nullcontext() if bank is not None else _phase_training(None, carried):
            warm_s = _warmup(model, bank, doc_params or phase_params, cfg.chunk, seq_len, lanes_per_rank, device,
                             train=doc_adapting or phase_adapting)
        if carried is not None:
            carried.reset([-1])

    positions = _step_positions(steps, lanes)
    budget = _Budget(time_budget, device, int(positions.sum()))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = adapted = adapted_tokens = phases_trained = 0
    n_chunks = sum(len(st) for st in steps)
    stopped_at, reserve, opt = None, 0.0, None
    phase_ok = phase_adapting  # this rank's budget still covers carried-adapter updates
    mine = {int(lane) for st in steps for lane in st[:, 1]}  # the lanes this rank scores
    progress = Progress(f"ttt {cfg.kind} {cfg.scope} chunk={cfg.chunk}", sum(lanes[i].scored for i in mine), log)
    model.eval()
    try:
        for step, st in enumerate(steps):
            if len(st):
                slot, lane_idx, ks = st[:, 0], st[:, 1], st[:, 2]
                members = [lanes[i] for i in lane_idx]
                entering = np.flatnonzero(ks == 0)
                if len(entering) and bank is not None:  # a document enters its slot: a fresh adapter
                    bank.reset([int(members[j].starts[0]) for j in entering], slot[entering].tolist())
                    lane_opt.reset(slot[entering])
                elif len(entering) and per_doc and (opt is None or cfg.reset == "doc"):  # full weights, one document
                    with torch.no_grad():
                        for p, s in zip(params, snapshot):
                            p.copy_(s)
                    opt = torch.optim.Adam(doc_params, lr=cfg.learning_rate) if doc_adapting else None
                starts = np.array([m.starts[k] for m, k in zip(members, ks)])
                lengths = np.array([m.lengths[k] for m, k in zip(members, ks)])
                score_from = np.array([m.score_from[k] for m, k in zip(members, ks)])
                width = int(lengths.max())
                x, y = (t.to(device, non_blocking=True) for t in gather_windows(tokens, starts, lengths, width))
                mask = score_mask(lengths, score_from, width).to(device)
                if bank is not None:
                    bank.rows = torch.as_tensor(slot, device=device)
                # 1. score: no gradient can flow from these losses into any update
                with budget.timed(step, int(positions[step]), doc_adapting or phase_adapting), \
                        torch.inference_mode(), autocast_for(device):
                    if tilted is None:
                        losses = model.token_losses(x, y)
                    else:  # the proposals for these targets, gathered as the targets are
                        losses = tilted(x, y, gather_windows(hat, starts, lengths, width)[1].to(device))
                    total += torch.where(mask, losses.float(), 0.0).sum(dtype=torch.float64)
                    if target_losses is not None:
                        target_losses.add(losses, mask, starts)
                n = int((lengths - score_from).sum())
                count += n
                budget.left -= int(positions[step])
                # 2. adapt on the chunk just scored, where a later chunk can still benefit, while the
                # time left covers scoring what remains (once it does not, this rank adapts no more:
                # its next phase vote is no)
                if (doc_adapting or phase_ok) and not budget.allows():
                    doc_adapting = phase_ok = False
                    if stopped_at is None:
                        stopped_at, reserve = budget.elapsed(), budget.reserve()
                adapted_tokens += n if (doc_adapting or (phase_adapting and phase_ok)) else 0
                last = step + 1 == len(steps)
                keep = [j for j, (m, k) in enumerate(zip(members, ks))
                        if (cfg.reset == "carry" and not last) or len(m) > k + 1]
                if doc_adapting and keep:
                    _adapt(model, lane_opt or opt, bank, x[keep], y[keep], mask[keep], slot[keep], cfg, device)
                    adapted += len(keep)
                progress.update(count, "  (time budget spent: scoring only)" if stopped_at is not None else "")
            # 3. documents scored in full so far teach the carried adapter, on every rank at once
            if phase_adapting and step in train_after:
                cost = budget.train_estimate(_phase_positions(train_after[step], seq_len, cfg) // world)
                if all_reduce_sums([float(phase_ok and budget.allows(cost))], device)[0] < world:  # the ranks agree
                    phase_adapting = False
                    if stopped_at is None:
                        stopped_at, reserve = budget.elapsed(), budget.reserve()
                else:
                    with budget.timed_training(), _phase_training(bank, carried):
                        budget.trained += _train_phase(model, phase_opt, tokens, train_after[step], seq_len, cfg,
                                                       device, rank, world)
                    phases_trained += 1
    finally:
        for b in (bank, carried):
            if b is not None:
                b.remove()
        if snapshot is not None:
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
    n_all, adapted_all, chunks_all, adapted_chunks_all = all_reduce_sums(
        [float(count), float(adapted_tokens), float(n_chunks), float(adapted)], device)
    info = {"kind": cfg.kind, "rank": cfg.rank if cfg.kind == "lora" else None, "lr": cfg.learning_rate,
            "epochs": cfg.epochs, "chunk": cfg.chunk, "reset": cfg.reset, "targets": list(cfg.targets),
            "from_start": cfg.from_start, "scope": cfg.scope,
            "adapted_modules": len(bank.modules if bank is not None else carried.modules)
            if cfg.kind == "lora" else None,
            "documents_in_parallel": slots, "steps": len(steps),
            "chunks": int(chunks_all), "adapted_chunks": int(adapted_chunks_all),
            "adapted_fraction": adapted_all / n_all if n_all else 0.0,
            "time_budget": time_budget, "budget_exceeded": stopped_at is not None,
            "stopped_adapting_at_s": stopped_at, "scoring_reserve_s": reserve if stopped_at is not None else None,
            "seconds_per_position": budget.rate(), "cost_samples": len(budget.samples),
            "warmup_s": warm_s, "warmup": "synthetic tokens, before the timer" if warm_s is not None else None}
    if carries:
        info.update(phases=len(train_after) + 1, phases_trained=phases_trained, phase_tokens=cfg.phase_tokens,
                    phase_epochs=cfg.phase_epochs, phase_lr=cfg.phase_learning_rate, phase_batch=cfg.phase_batch)
    return float(total.item()), count, info


@contextlib.contextmanager
def _phase_training(bank: LoRABank | None, carried: LoRABank | None):
    """While the carried adapter trains on a phase: it takes gradients, the per-document bank is off."""
    if bank is not None:
        bank.active = False
    if carried is not None:
        carried.requires_grad_(True)
    try:
        yield
    finally:
        if bank is not None:
            bank.active = True
        if carried is not None:
            carried.requires_grad_(False)


def _phase_windows(phase: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)``: the phase's documents in non-overlapping windows of ``seq_len``."""
    parts = [segment_windows(int(b), int(e), seq_len, seq_len) for b, e in phase]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _phase_positions(phase: np.ndarray, seq_len: int, cfg: TTTConfig) -> int:
    """Positions a phase's training forwards (and backpropagates), over all ranks."""
    return int(_phase_windows(phase, seq_len)[1].sum()) * cfg.phase_epochs


def _train_phase(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: np.ndarray, phase: np.ndarray,
                 seq_len: int, cfg: TTTConfig, device: torch.device, rank: int, world: int) -> int:
    """``cfg.phase_epochs`` passes of Adam steps on a scored phase, ``cfg.phase_batch`` windows a step
    (each document's own context), the same steps on every rank: each rank differentiates its share
    of a step's windows, the gradients are summed over ranks. Returns the positions this rank forwarded."""
    starts, lengths = _phase_windows(phase, seq_len)
    params = [p for group in opt.param_groups for p in group["params"]]
    forwarded = 0
    for _ in range(cfg.phase_epochs):
        for s in range(0, len(starts), cfg.phase_batch):
            idx = np.arange(s, min(s + cfg.phase_batch, len(starts)))
            share = idx[rank::world]
            n = int(lengths[idx].sum())  # the step's mean is over all ranks' targets
            opt.zero_grad(set_to_none=True)
            if len(share):
                width = int(lengths[share].max())
                x, y = (t.to(device, non_blocking=True) for t in
                        gather_windows(tokens, starts[share], lengths[share], width))
                mask = score_mask(lengths[share], np.zeros(len(share), np.int64), width).to(device)
                with autocast_for(device), exits_off(model):
                    losses = model.token_losses(x, y)
                (torch.where(mask, losses.float(), 0.0).sum() / n).backward()
                forwarded += len(share) * width
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
            opt.step()
    return forwarded


def _step_positions(steps: list[np.ndarray], lanes: list[WindowPlan]) -> np.ndarray:
    """Positions each step of a schedule forwards to score: its rows' windows, padded to the widest."""
    out = [len(st) * max(int(lanes[lane].lengths[k]) for lane, k in st[:, 1:]) if len(st) else 0 for st in steps]
    return np.asarray(out, dtype=np.int64)


def _vocab_size(model: torch.nn.Module) -> int:
    return next(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))


def _warmup(model: torch.nn.Module, bank: LoRABank | None, trainable: list[torch.Tensor], chunk: int,
            seq_len: int, rows: int, device: torch.device, train: bool) -> float:
    """Seconds spent running the scoring pass (at the first and the full window width) and, with
    ``train``, one adapting pass on synthetic tokens: first-call costs (CUDA context and kernel
    loading, allocator growth) fall here, before the clock and never on validation tokens.
    Weights and adapters are left as they were (no optimizer step; gradients cleared), and so is
    ``exit_counts``."""
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    vocab = _vocab_size(model)
    if bank is not None:
        bank.rows = torch.arange(rows, device=device)
    counts = getattr(model, "exit_counts", None)
    saved = counts.clone() if isinstance(counts, torch.Tensor) else None
    for width in sorted({chunk, seq_len}):
        x, y = (torch.randint(0, vocab, (rows, width), generator=gen).to(device) for _ in range(2))
        with torch.inference_mode(), autocast_for(device):
            model.token_losses(x, y)
        if train:
            with autocast_for(device), exits_off(model):
                model.token_losses(x, y).float().mean().backward()
            for p in trainable:
                p.grad = None
    if saved is not None:  # synthetic tokens: not part of the evaluation's exit tally
        counts.copy_(saved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


class _Budget:
    """The time budget of a TTT pass: elapsed time, and a reserve for scoring what is left.

    Scoring steps are timed (synchronized on a GPU, whose kernels run asynchronously): the first
    ``WARMUP_STEPS + MIN_SAMPLES`` steps, then every 8th. The cost per forwarded position is the
    median of the samples after the first ``WARMUP_STEPS`` (new shapes, lazy initialisation), so
    one slow call cannot switch adaptation off; no decision is taken on fewer than ``MIN_SAMPLES``.
    Phase training is timed whole; its first estimate is 3x the scoring cost (forward + backward).
    """

    def __init__(self, budget: float | None, device: torch.device, positions: int) -> None:
        self.budget, self.sync = budget, device.type == "cuda"
        self.device = device
        self.left = positions  # positions still to forward for scoring
        self.samples: list[float] = []
        self.train_seconds, self.trained = 0.0, 0
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> float | None:
        usable = self.samples[WARMUP_STEPS:]
        return float(np.median(usable)) if len(usable) >= MIN_SAMPLES else None

    def reserve(self) -> float:
        rate = self.rate()
        return 1.1 * rate * self.left if rate is not None else 0.0

    def train_estimate(self, positions: int) -> float:
        if self.trained:
            return self.train_seconds / self.trained * positions
        rate = self.rate()
        return 3.0 * rate * positions if rate is not None else 0.0

    def allows(self, extra_s: float = 0.0) -> bool:
        """Whether adapting may go on: the time spent, the scoring reserve and ``extra_s`` fit."""
        if self.budget is None:
            return True
        return self.elapsed() + self.reserve() + extra_s <= self.budget

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self, step: int, positions: int, adapting: bool):
        n = WARMUP_STEPS + MIN_SAMPLES
        if self.budget is None or not adapting or not positions or (step >= n and step % 8):
            yield
            return
        self._sync()
        t = time.perf_counter()
        yield
        self._sync()
        self.samples.append((time.perf_counter() - t) / positions)

    @contextlib.contextmanager
    def timed_training(self):
        self._sync()
        t = time.perf_counter()
        yield
        self._sync()
        self.train_seconds += time.perf_counter() - t


class _LaneAdam:
    """Adam (torch's defaults: betas 0.9/0.999, eps 1e-8) over a :class:`LoRABank` with one step count
    per lane: a step moves only the lanes of the rows just trained (``bank.rows``), and a lane given
    to a new document starts from fresh moments. (``torch.optim.Adam`` keeps one count per tensor,
    which lanes that enter at different steps cannot share.)"""

    def __init__(self, bank: LoRABank, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.bank, self.lr, self.betas, self.eps = bank, lr, betas, eps
        self.m = torch.zeros_like(bank.flat)
        self.v = torch.zeros_like(bank.flat)
        self.t = torch.zeros(bank.lanes, 1, device=bank.flat.device)

    def reset(self, lanes: np.ndarray) -> None:
        idx = torch.as_tensor(lanes, dtype=torch.long, device=self.t.device)
        for state in (self.t, self.m, self.v):
            state[idx] = 0.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.bank.flat.grad = None

    @torch.no_grad()
    def step(self) -> None:
        flat, rows, (b1, b2) = self.bank.flat, self.bank.rows, self.betas
        t = self.t[rows] + 1.0
        g = flat.grad[rows]
        m = self.m[rows].mul_(b1).add_(g, alpha=1.0 - b1)
        v = self.v[rows].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        self.t[rows], self.m[rows], self.v[rows] = t, m, v
        denom = (v.sqrt() / (1.0 - b2 ** t).sqrt()).add_(self.eps)
        flat[rows] = flat[rows] - self.lr / (1.0 - b1 ** t) * m / denom
        self.bank.rows = rows  # drops the gathered lanes, now stale


def _adapt(model: torch.nn.Module, opt: Any, bank: LoRABank | None, x: torch.Tensor,
           y: torch.Tensor, mask: torch.Tensor, rows: np.ndarray, cfg: TTTConfig, device: torch.device) -> None:
    """``cfg.epochs`` Adam steps on the scored positions of ``x``/``y`` (already scored); ``rows``:
    the bank lanes of the batch rows."""
    if bank is not None:
        bank.rows = torch.as_tensor(rows, device=device)
    weight = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # per-document mean: lanes independent
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        with autocast_for(device), exits_off(model):
            losses = model.token_losses(x, y)
        (losses.float() * weight).sum().backward()
        opt.step()
