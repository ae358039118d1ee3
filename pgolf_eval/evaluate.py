"""Exact validation bits per byte: plain, sliding-window, document-isolated and TTT evaluation.

bpb is the challenge's definition: per-token cross-entropy in nats, summed in float64, divided by
ln 2 and by the UTF-8 bytes of the scored targets (byte tables of the tokenizer, or a per-token
byte sidecar). Under ``torchrun`` the windows (or, for TTT, the documents) are split across ranks
and the sums are combined exactly with one all_reduce.

Early exit (``early_exit=tau``, ``pgolf eval --early-exit TAU``): a model with exit heads scores
each token with the first exit whose top probability reaches ``tau`` (else its last layer); the
result's ``early_exit`` entry says where the positions left (:func:`early_exit_summary`).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pgolf_train.shards import BOS_ID, list_shards, read_shard
from pgolf_train.tokenizer import ByteTables, token_bytes

from .batches import (CPU_BATCH_TOKENS, DEFAULT_BATCH_TOKENS, PAD_ID, Log, Progress,  # noqa: F401 (re-exported)
                      all_reduce_sums, autocast_for, default_batch_tokens, dist_rank_world, gather_windows,
                      score_mask, stderr_log)
from .breakdown import TargetLosses, summarize
from .sliding import WindowPlan, document_segments, plan_windows

@dataclass
class EvalResult:
    """One evaluation. ``val_loss`` is mean nats per scored token; ``bytes`` the targets' UTF-8 bytes."""

    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float
    mode: str  # "plain", "sliding" or "ttt"
    seq_len: int = 0
    stride: int = 0
    coverage: str = "full"  # "full": every target scored; "truncate": whole windows only (challenge)
    doc_isolated: bool = False
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    # per-document-length buckets and the 95% bootstrap interval (pgolf_eval.breakdown.summarize)
    docs: dict[str, Any] | None = None
    # per document, in stream order: length, scored tokens, bytes, loss (nats); for paired comparisons
    per_doc: dict[str, list] | None = None
    # with an exit threshold: where the forwarded positions left the model (early_exit_summary)
    early_exit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens / self.seconds if self.seconds > 0 else None
        return d


def _batches(plan: WindowPlan, batch_tokens: int) -> list[np.ndarray]:
    """Window indices per batch: windows of like length together, at most ``batch_tokens`` each."""
    order = np.argsort(-plan.lengths, kind="stable")
    out, i = [], 0
    while i < len(order):
        width = int(plan.lengths[order[i]])
        n = max(1, batch_tokens // width)
        out.append(order[i:i + n])
        i += n
    return out


@torch.inference_mode()
def score_plan(model: torch.nn.Module, tokens: np.ndarray, plan: WindowPlan, *, device: torch.device,
               batch_tokens: int | None = None, scorer: Callable | None = None,
               log: Log | None = None, label: str = "eval",
               target_losses: TargetLosses | None = None, aux: np.ndarray | None = None) -> tuple[float, int]:
    """Sum of the scored targets' losses (nats, float64) and their count, for this process's plan.

    ``scorer(idx, targets) -> float32 (B, T)`` defaults to ``model.token_losses``; ``batch_tokens``
    to :func:`default_batch_tokens` of ``device``; ``target_losses`` also records each target's loss.
    ``aux`` (int, the stream's shape): gathered per window as the targets are, and passed as a third
    argument, ``scorer(idx, targets, aux_windows)`` (the n-gram tilt's proposals).
    """
    scorer = scorer or model.token_losses
    batch_tokens = batch_tokens or default_batch_tokens(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count, done = 0, 0
    progress = Progress(label, plan.scored, log)
    for idx in _batches(plan, batch_tokens):
        lengths, score_from = plan.lengths[idx], plan.score_from[idx]
        width = int(lengths.max())
        x, y = gather_windows(tokens, plan.starts[idx], lengths, width)
        mask = score_mask(lengths, score_from, width).to(device, non_blocking=True)
        more = () if aux is None else (gather_windows(aux, plan.starts[idx], lengths, width)[1].to(device),)
        with autocast_for(device):
            losses = scorer(x.to(device, non_blocking=True), y.to(device, non_blocking=True), *more)
        # float64 accumulation on the device: no host sync per batch
        total += torch.where(mask, losses.float(), 0.0).sum(dtype=torch.float64)
        if target_losses is not None:
            target_losses.add(losses, mask, plan.starts[idx])
        n = int((lengths - score_from).sum())
        count += n
        done += n
        progress.update(done)
    return float(total.item()), count


def check_early_exit(model: torch.nn.Module, tau: Any) -> float:
    """``tau`` as a float, once it is a number in (0, 1] and ``model`` has exit heads; else a ValueError."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"early exit threshold must be a number in (0, 1], got {tau!r}")
    if not getattr(model, "exits", None) or not hasattr(model, "exit_counts"):
        cfg = getattr(model, "cfg", None)
        raise ValueError(f"early exit (--early-exit) needs a model with exit heads; this model has none "
                         f"(exit_layers={getattr(cfg, 'exit_layers', '')!r})")
    return float(tau)


def early_exit_summary(model: torch.nn.Module, tau: float, device: torch.device) -> dict[str, Any]:
    """Where the positions the model forwarded left it, from ``model.exit_counts`` summed over ranks.

    ``exits``: per exit head (virtual layer ``layer``, after which it reads the state) the positions
    that exited there and their share; ``final``: those that reached the last layer. With L virtual
    layers, ``layers_skipped_frac`` = sum_k count_k * (L - 1 - layer_k) / (positions * L): the share
    of layer evaluations above the exits. The counts cover every position of every scoring
    forward: the context of sliding windows and the padding of a batch's shorter windows included,
    not only the scored targets. And the layers above an exit are not free: the exited positions'
    frozen states still feed those layers' keys and values for later positions, which a real
    depth-skipping decoder has to compute (a K/V projection per skipped layer), so
    ``layers_skipped_frac`` bounds the compute saved, it does not measure it.
    """
    counts = [int(round(c)) for c in all_reduce_sums([float(c) for c in model.exit_counts.tolist()], device)]
    total, n_layers = sum(counts), len(model.layer_plan)
    share = (lambda c: c / total) if total else (lambda c: 0.0)
    skipped = sum(c * (n_layers - 1 - layer) for c, layer in zip(counts, model.exits))
    return {"threshold": tau, "virtual_layers": n_layers, "positions": total,
            "exits": [{"layer": int(layer), "positions": c, "share": share(c)} for c, layer in zip(counts, model.exits)],
            "final": {"layer": n_layers - 1, "positions": counts[-1], "share": share(counts[-1])},
            "layers_skipped_frac": skipped / (total * n_layers) if total else 0.0,
            "note": "counts: every forwarded position (context and batch padding included); the layers above an exit "
                      "still owe the frozen state's keys/values, so layers_skipped_frac bounds the compute saved"}


def per_target_bytes(tokens: np.ndarray, byte_source: ByteTables | np.ndarray) -> np.ndarray:
    """int64 ``(N - 1,)``: the UTF-8 bytes of each target (target j is ``tokens[j + 1]``).

    ``byte_source`` is the tokenizer's :class:`ByteTables` or a per-token byte sidecar aligned with
    ``tokens`` (uint16, same length), which then decides.
    """
    if isinstance(byte_source, ByteTables):
        return token_bytes(tokens[1:], byte_source, tokens[:-1]).astype(np.int64)
    side = np.asarray(byte_source)
    if side.shape != (len(tokens),):
        raise ValueError(f"byte sidecar has shape {side.shape}, tokens have ({len(tokens)},)")
    return side[1:].astype(np.int64)


def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, tables: ByteTables | np.ndarray, *,
                    seq_len: int, stride: int | None = None, batch_tokens: int | None = None,
                    device: str | torch.device = "cpu", doc_isolated: bool = False, ttt: Any = None,
                    time_budget: float | None = None, truncate: bool = False, bos_id: int = BOS_ID,
                    compile: bool = False, early_exit: float | None = None, tilt: Any = None,
                    log: Log | None = stderr_log) -> EvalResult:
    """Evaluate ``model`` on the token stream ``tokens`` (shape ``(N,)``; targets ``tokens[1:]``).

    ``stride`` None or ``seq_len`` scores non-overlapping windows; a smaller stride slides.
    ``doc_isolated`` restarts the context at every BOS. ``ttt`` (a :class:`pgolf_eval.ttt.TTTConfig`)
    runs legal score-first test-time training on a copy of the adapted parameters; the pass ends
    within ``time_budget`` seconds (adaptation stops while the rest can still be scored in time).
    ``tables`` may be a per-token byte sidecar instead.
    ``batch_tokens``: forward positions per batch (TTT: documents adapted at once × seq_len);
    None picks :func:`default_batch_tokens` for the device.
    ``early_exit``: an exit threshold in (0, 1] for a model with exit heads (None: the model's own
    ``exit_threshold``, normally None, off); set for the pass (the model's own restored after),
    with ``exit_counts`` reset first, and reported in ``EvalResult.early_exit``. With TTT it applies
    to the scoring forwards only: adaptation steps train on the last layer's loss (see
    :mod:`pgolf_eval.ttt`).
    ``tilt`` (a :class:`pgolf_eval.ngram.NgramTilt`): every target's distribution tilted toward the
    causal n-gram's confident proposal, with TTT too (``extra["tilt"]`` says how many targets it
    touched and how often it was right).
    Under an initialized process group each rank must pass the same arguments; the result is global.
    """
    device = torch.device(device)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"need a 1-D stream of at least 2 tokens, got shape {tokens.shape}")
    stride = seq_len if stride is None else stride
    rank, world = dist_rank_world()
    n_targets = len(tokens) - 1
    t0 = time.perf_counter()
    model.eval()
    tau = early_exit if early_exit is not None else getattr(model, "exit_threshold", None)
    if tau is not None:
        tau = check_early_exit(model, tau)
    extra: dict[str, Any] = {}
    losses = TargetLosses(n_targets, device)
    hat = None  # the n-gram's proposal per position (-1: none), the same on every rank
    if tilt is not None:
        from .ngram import proposals, tilt_summary

        hat = proposals(tokens, tilt, bos_id)
        extra["tilt"] = tilt_summary(tilt, tokens, hat)
    with _exit_threshold(model, tau):
        if ttt is not None:
            from .ttt import run_ttt  # local: TTT pulls in the optimizer machinery only when used

            if truncate:
                raise ValueError("--truncate applies to plain/sliding evaluation, not TTT")
            loss_sum, count, extra["ttt"] = run_ttt(
                model, tokens, ttt, seq_len=seq_len, device=device, doc_isolated=doc_isolated,
                time_budget=time_budget, bos_id=bos_id, batch_tokens=batch_tokens, log=log, target_losses=losses,
                tilt=tilt, tilt_proposals=hat)
            mode, stride = "ttt", ttt.chunk
            doc_isolated = doc_isolated or ttt.reset == "doc"  # per-document state keeps context in the document
        else:
            segments = document_segments(tokens, bos_id) if doc_isolated else None
            plan = plan_windows(n_targets, seq_len, stride, segments=segments, truncate=truncate)
            mine = plan.shard(rank, world)
            scorer = torch.compile(model.token_losses) if compile else None
            if tilt is not None:
                from .ngram import tilt_scorer

                scorer = tilt_scorer(model, tilt.boost)
                scorer = torch.compile(scorer) if compile else scorer
            loss_sum, count = score_plan(model, tokens, mine, device=device, batch_tokens=batch_tokens,
                                         scorer=scorer, log=log, label=f"eval seq_len={seq_len} stride={stride}",
                                         target_losses=losses, aux=hat)
            mode = "plain" if stride == seq_len else "sliding"
            extra["forward_tokens"] = plan.input_tokens
    # the bytes of exactly the targets scored (on any rank), with each document's share
    per_doc = _per_document(tokens, tables, losses, bos_id, device)
    loss_sum, count = all_reduce_sums([loss_sum, float(count)], device)
    count, n_bytes = int(count), int(sum(per_doc["bytes"]))
    if count == 0 or n_bytes == 0:
        raise ValueError(f"nothing to score: {count} tokens, {n_bytes} bytes (stream of {len(tokens)} tokens, "
                         f"seq_len {seq_len}{', truncated' if truncate else ''})")
    seconds = time.perf_counter() - t0
    return EvalResult(val_loss=loss_sum / count, val_bpb=loss_sum / math.log(2) / n_bytes, tokens=count,
                      bytes=n_bytes, seconds=seconds, mode=mode, seq_len=seq_len, stride=stride,
                      coverage="truncate" if truncate else "full", doc_isolated=doc_isolated,
                      world_size=world, extra=extra, docs=summarize(per_doc), per_doc=per_doc,
                      early_exit=early_exit_summary(model, tau, device) if tau is not None else None)


@contextlib.contextmanager
def _exit_threshold(model: torch.nn.Module, tau: float | None):
    """``model.exit_threshold = tau`` with fresh ``exit_counts`` for the block, the model's own after
    (nothing is touched for ``tau`` None)."""
    if tau is None:
        yield
        return
    own = model.exit_threshold
    model.exit_threshold = tau
    model.exit_counts.zero_()
    try:
        yield
    finally:
        model.exit_threshold = own


def _per_document(tokens: np.ndarray, tables: ByteTables | np.ndarray, losses: TargetLosses, bos_id: int,
                  device: torch.device) -> dict[str, list]:
    """Each document's length, scored tokens, bytes and loss, summed over ranks."""
    segments = document_segments(tokens, bos_id)
    part = losses.per_doc(segments, per_target_bytes(tokens, tables))
    sums = np.asarray(all_reduce_sums(part.ravel().tolist(), device)).reshape(part.shape)
    return {"length": (segments[:, 1] - segments[:, 0]).tolist(), "tokens": sums[1].round().astype(int).tolist(),
            "bytes": sums[2].round().astype(int).tolist(), "loss": sums[0].tolist()}


def load_val_tokens(data_dir: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """The concatenated ``fineweb_val_*.bin`` shards (uint16), every token checked below ``vocab_size``."""
    paths = list_shards(data_dir, "val")
    if not paths:
        raise FileNotFoundError(f"no fineweb_val_*.bin shards in {data_dir}")
    parts = [read_shard(p, vocab_size=vocab_size) for p in paths]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def load_val_stream(data_dir: str | os.PathLike, tokenizer: str | os.PathLike, vocab_size: int,
                    max_tokens: int | None = None) -> tuple[np.ndarray, ByteTables | np.ndarray]:
    """The val tokens (a prefix of ``max_tokens`` if given) and their byte source: the data's
    per-token byte sidecar, cut to the same prefix, when it has one, else the tokenizer's tables."""
    from pgolf_train.tokenizer import byte_tables, load_byte_sidecar

    tokens = load_val_tokens(data_dir, vocab_size)
    sidecar = load_byte_sidecar(data_dir)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if sidecar is not None:
        return tokens, sidecar[:len(tokens)]
    return tokens, byte_tables(tokenizer, vocab_size)


def evaluate_artifact(path: str | os.PathLike, data_dir: str | os.PathLike, tokenizer: str | os.PathLike,
                      *, device: str = "cpu", trust_code: bool = False, rope_scaling: str | None = None,
                      rope_factor: float | None = None, max_tokens: int | None = None,
                      seq_len: int | None = None, ttt: Any = None, early_exit: float | None = None,
                      **kw: Any) -> EvalResult:
    """Load an artifact alone and evaluate it on ``data_dir``'s val shards.

    The tokenizer must match the artifact's vocabulary (a hash mismatch is a warning); bytes come
    from a byte sidecar when ``data_dir`` has one, else from the tokenizer's tables. ``seq_len``
    defaults to the model's training context; ``rope_scaling`` (``ntk``/``yarn``) with
    ``rope_factor`` (default eval / training context) evaluates longer contexts. ``ttt`` is a
    :class:`pgolf_eval.ttt.TTTConfig` or its kind (``"lora"``/``"full"``). ``max_tokens``
    evaluates a prefix of the stream (quick checks). ``early_exit``: the exit threshold (refused,
    before any data is read, for a model without exit heads). Other keywords go to
    :func:`evaluate_tokens`.
    """
    from .loader import apply_rope_scaling, check_tokenizer, model_from_artifact
    from .ttt import TTTConfig

    model, art = model_from_artifact(path, device=device, trust_code=trust_code)
    if early_exit is not None:
        try:
            check_early_exit(model, early_exit)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    vocab = check_tokenizer(art.metadata, tokenizer, model_vocab=int(model.cfg.vocab_size))
    seq_len = int(seq_len or model.cfg.seq_len)
    if rope_scaling and rope_scaling != "none":
        rope_factor = apply_rope_scaling(model, rope_scaling, rope_factor, seq_len)
    tokens, byte_source = load_val_stream(data_dir, tokenizer, vocab, max_tokens)
    if isinstance(ttt, str):  # a kind alone: default settings, the chunk no longer than the context
        ttt = TTTConfig(kind=ttt, chunk=min(TTTConfig.chunk, seq_len))
    result = evaluate_tokens(model, tokens, byte_source, device=device, seq_len=seq_len, ttt=ttt,
                             early_exit=early_exit, **kw)
    result.extra.update(artifact=str(Path(path)), artifact_bytes=int(art.info.total_bytes),
                        byte_source="tables" if isinstance(byte_source, ByteTables) else "sidecar",
                        rope_scaling=rope_scaling if rope_scaling and rope_scaling != "none" else None,
                        rope_factor=rope_factor if rope_scaling and rope_scaling != "none" else None)
    return result
