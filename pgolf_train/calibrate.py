"""Calibration for GPTQ: per-layer input Hessians ``H = Σ xᵀx / n`` of a trained model.

Every ``CastedLinear`` gets a forward hook that accumulates the Gram matrix of its inputs in
float32 (a module reused by depth recurrence accumulates every use). With tied embeddings the
token embedding is also the output head, applied through ``F.linear`` rather than a module
call; a torch-function mode catches that call so ``tok_emb.weight`` gets the Hessian of the
final hidden states (its rows are quantized as output-head rows).

Calibration sequences come from training shards, or from the model itself (batched
autoregressive sampling with a temperature from BOS) when no training data may be used after
training. Both honour a wall-clock limit: collection stops at the first batch boundary past it
(and sampling stops early, keeping the prefix generated so far), and the result says how many
tokens were actually used.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pgolf_train.model import GPT, CastedLinear
from pgolf_train.shards import BOS_ID, list_shards, read_shard

__all__ = ["CalibrationResult", "collect_hessians", "shard_batches", "generate_batches", "calibrate"]


@dataclass
class CalibrationResult:
    """``hessians``: state-dict weight name → float32 ``[in_features, in_features]`` tensor
    (mean of xᵀx over all input vectors seen, on the model's device). ``tokens``: tokens fed
    through the model; ``seconds``: wall time including sampling; ``source``: "shards" or
    "self"; ``stopped_early``: the time limit cut collection short."""

    hessians: dict[str, torch.Tensor]
    tokens: int
    seconds: float
    source: str
    stopped_early: bool


def _log(msg: str) -> None:
    print(f"[calibrate] {msg}", file=sys.stderr, flush=True)


class _HeadCapture(TorchFunctionMode):
    """Accumulates the inputs of ``F.linear`` calls whose weight is the tied embedding."""

    def __init__(self, weight: torch.Tensor, acc: dict) -> None:
        super().__init__()
        self.weight, self.acc = weight, acc

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.weight:
            _accumulate(self.acc, args[0])
        return func(*args, **kwargs)


def _accumulate(acc: dict, x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).float()  # fp32 accumulation whatever the forward dtype
    if acc["H"] is None:
        acc["H"] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    acc["H"].addmm_(x.t(), x)
    acc["n"] += x.shape[0]


@torch.no_grad()
def collect_hessians(model: GPT, batches: Iterable[torch.Tensor], *, time_limit: float | None = None,
                     max_tokens: int | None = None, source: str = "shards") -> CalibrationResult:
    """Run ``batches`` (long ``[B, T]`` token tensors) through ``model`` and return the input
    Hessian of every ``CastedLinear`` weight (and of a tied ``tok_emb.weight``).

    Stops after ``max_tokens`` tokens or once ``time_limit`` seconds have passed (checked
    between batches; the time spent producing the batches counts). The model runs in float32
    without autocast so the tied-head capture sees the embedding tensor itself.
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    accs: dict[str, dict] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, CastedLinear):
            acc = accs.setdefault(f"{name}.weight", {"H": None, "n": 0})
            handles.append(mod.register_forward_hook(lambda m, inp, out, acc=acc: _accumulate(acc, inp[0])))
    tied = getattr(model, "lm_head", None) is None and hasattr(model, "tok_emb")
    head_acc = accs.setdefault("tok_emb.weight", {"H": None, "n": 0}) if tied else None
    was_training = model.training
    model.eval()
    tokens = 0
    stopped = False
    try:
        it = iter(batches)
        while True:
            if time_limit is not None and time.perf_counter() - t0 >= time_limit:
                stopped = True
                break
            if max_tokens is not None and tokens >= max_tokens:
                break
            try:
                idx = next(it)
            except StopIteration:
                break
            idx = idx.to(device=device, dtype=torch.long)
            if tied:
                with _HeadCapture(model.tok_emb.weight, head_acc):
                    model.logits(idx)
            else:
                model.logits(idx)
            tokens += idx.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    hessians = {name: acc["H"] / acc["n"] for name, acc in accs.items() if acc["n"] > 0}
    seconds = time.perf_counter() - t0
    _log(f"{source}: {tokens:,} tokens, {len(hessians)} Hessians in {seconds:.1f}s"
         + (" (time limit reached)" if stopped else ""))
    return CalibrationResult(hessians, tokens, seconds, source, stopped)


def shard_batches(data_dir: str | os.PathLike, *, seq_len: int, batch_size: int, split: str = "train",
                  vocab_size: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive ``[batch_size, seq_len]`` windows of the ``split`` shards in ``data_dir``
    (long tensors, CPU). The tail shorter than a full batch is dropped."""
    shards = list_shards(data_dir, split)
    if not shards:
        raise FileNotFoundError(f"no {split} shards in {data_dir}")
    need = seq_len * batch_size
    buf = np.empty(0, dtype=np.uint16)
    for path in shards:
        buf = np.concatenate([buf, read_shard(path, vocab_size=vocab_size)])
        while len(buf) >= need:
            yield torch.from_numpy(buf[:need].astype(np.int64)).view(batch_size, seq_len)
            buf = buf[need:]


@torch.no_grad()
def generate_batches(model: GPT, *, seq_len: int, batch_size: int, temperature: float = 1.0,
                     seed: int = 0, deadline: float | None = None) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len]`` batches sampled from ``model`` itself, each row
    starting at BOS, with softmax temperature ``temperature`` (> 0).

    The model has no KV cache, so step t re-runs the prefix; cost ~ seq_len²/2 token-forwards
    per batch. ``deadline`` (a ``time.perf_counter()`` value): when passed mid-sequence the
    batch is cut to the prefix generated so far (if at least 2 tokens) and generation stops.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        while True:
            idx = torch.full((batch_size, 1), BOS_ID, dtype=torch.long, device=device)
            cut = False
            while idx.shape[1] < seq_len:
                if deadline is not None and time.perf_counter() >= deadline:
                    cut = True
                    break
                logits = model.logits(idx)[:, -1, :].float() / temperature
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                idx = torch.cat([idx, nxt], dim=1)
            if idx.shape[1] >= 2:
                yield idx
            if cut:
                return
    finally:
        model.train(was_training)


def calibrate(model: GPT, *, source: str = "shards", data_dir: str | os.PathLike | None = None,
              tokens: int = 262_144, seconds: float | None = None, seq_len: int | None = None,
              batch_size: int = 16, temperature: float = 0.8, seed: int = 0) -> CalibrationResult:
    """Hessians from ``tokens`` calibration tokens of ``source`` ("shards": ``data_dir``'s
    train shards; "self": sampled from the model), within ``seconds`` of wall time if given.
    ``seq_len`` defaults to the model's training context."""
    seq_len = seq_len or model.cfg.seq_len
    if tokens <= 0:
        raise ValueError(f"calibration tokens must be > 0, got {tokens}")
    start = time.perf_counter()
    if source == "shards":
        if data_dir is None:
            raise ValueError("calibration from shards needs data_dir")
        batches: Iterable[torch.Tensor] = shard_batches(data_dir, seq_len=seq_len, batch_size=batch_size,
                                                        vocab_size=model.cfg.vocab_size)
    elif source == "self":
        deadline = None if seconds is None else start + seconds
        batches = generate_batches(model, seq_len=seq_len, batch_size=batch_size, temperature=temperature,
                                   seed=seed, deadline=deadline)
    else:
        raise ValueError(f"unknown calibration source {source!r}; expected 'shards' or 'self'")
    return collect_hessians(model, batches, time_limit=seconds, max_tokens=tokens, source=source)
