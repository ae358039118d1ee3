"""What every scoring pass shares: batch sizes by device, window batches (inputs, targets, the mask
of scored positions), bf16 autocast, the rank split with its exact float64 sums, progress lines.

``evaluate`` (plain and sliding windows) and ``ttt`` (score-first adaptation) both build on it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np
import torch

DEFAULT_BATCH_TOKENS = 1 << 17  # forward positions per batch on a GPU: ~128 windows of 1024
# On a CPU, 8x fewer: LoRA TTT of an 18.6M-parameter, 4096-vocab model (forward and backward of
# 128 documents at once, float32) grew past 24 GB at 1 << 17 and was killed by the OOM killer.
CPU_BATCH_TOKENS = 1 << 14
PAD_ID = 0  # fills batch rows past a window's end; causal attention keeps it out of real positions
Log = Callable[[str], None]


def default_batch_tokens(device: str | torch.device) -> int:
    """Forward positions per batch when the caller gives none: by device type."""
    return DEFAULT_BATCH_TOKENS if torch.device(device).type == "cuda" else CPU_BATCH_TOKENS


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum float64 values over ranks (identity without a process group).

    Loss sums, token and byte counts all travel as float64: counts are exact up to 2**53.
    """
    if dist_rank_world()[1] == 1:
        return values
    dev = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return t.tolist()


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Rate-limited progress lines: done/total, tokens/s and ETA (rank 0 only)."""

    def __init__(self, label: str, total: int, log: Log | None, every_s: float = 10.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.log = log if dist_rank_world()[0] == 0 else None
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if self.log is None or (now - self.last < self.every_s and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.log(f"{self.label}: {done:,}/{self.total:,} tokens  {rate:,.0f} tok/s  "
                 f"elapsed {now - self.t0:.0f}s  eta {eta:.0f}s{note}")


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the challenge's evaluation precision); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def gather_windows(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of windows, int64 ``(B, width)`` each, right-padded with ``PAD_ID``."""
    offs = np.arange(width + 1, dtype=np.int64)[None, :]
    seq = tokens[np.minimum(starts[:, None] + offs, len(tokens) - 1)].astype(np.int64)
    # a row's inputs are its first `length` tokens and its targets the `length` after the first:
    # nothing past the window's last target reaches the model, not even as padding
    x = np.where(offs[:, :-1] < lengths[:, None], seq[:, :-1], PAD_ID)
    y = np.where(offs[:, :-1] < lengths[:, None], seq[:, 1:], PAD_ID)
    return torch.from_numpy(x), torch.from_numpy(y)


def score_mask(lengths: np.ndarray, score_from: np.ndarray, width: int) -> torch.Tensor:
    """bool ``(B, width)``: the positions each window scores."""
    p = np.arange(width)[None, :]
    return torch.from_numpy((p >= score_from[:, None]) & (p < lengths[:, None]))
