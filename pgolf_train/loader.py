"""The challenge's training data stream: shards read in order, one concatenated stream that wraps.

Every micro-step takes ``world_size * (local_tokens + 1)`` consecutive tokens from the stream
and rank ``r`` keeps the ``r``-th contiguous span; inputs are ``span[:-1]``, targets ``span[1:]``.
A step of ``grad_accum`` micro-steps on ``world_size`` ranks therefore consumes exactly the same
tokens, in the same spans, whether it runs as 1 rank × 8 micro-steps or 8 ranks × 1 micro-step,
so the global batch (and the gradient sum) is identical across world sizes.

The stream's position (shard index, offset, tokens taken) is a small dict, saved in checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pgolf_train.shards import list_shards, read_shard


class TokenStream:
    """Reads shards sequentially and wraps around forever (no sampling, no workers)."""

    def __init__(self, files: list[Path], vocab_size: int | None = None) -> None:
        if not files:
            raise FileNotFoundError("no training shards given")
        self.files = [Path(f) for f in files]
        self.vocab_size = vocab_size
        self.file_idx = 0
        self.pos = 0
        self.taken = 0  # tokens handed out since the start (for logs and checks)
        self.tokens = self._load(0)

    def _load(self, idx: int) -> np.ndarray:
        tokens = read_shard(self.files[idx], vocab_size=self.vocab_size)
        if tokens.size == 0 and len(self.files) == 1:
            raise ValueError(f"{self.files[idx]}: the only training shard is empty")
        return tokens

    def _advance_file(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = self._load(self.file_idx)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` tokens of the stream, uint16 of shape ``(n,)``."""
        chunks: list[np.ndarray] = []
        remaining = n
        empty_in_a_row = 0
        while remaining > 0:
            avail = self.tokens.size - self.pos
            if avail <= 0:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.files):
                    raise ValueError("every training shard is empty")
                self._advance_file()
                continue
            empty_in_a_row = 0
            k = min(remaining, avail)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
        self.taken += n
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def state_dict(self) -> dict[str, int]:
        return {"file_idx": self.file_idx, "pos": self.pos, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        idx = int(state["file_idx"])
        if not 0 <= idx < len(self.files):
            raise ValueError(f"checkpointed shard index {idx} but only {len(self.files)} training shards exist")
        if idx != self.file_idx:
            self.file_idx = idx
            self.tokens = self._load(idx)
        pos = int(state["pos"])
        if not 0 <= pos <= self.tokens.size:
            raise ValueError(f"checkpointed offset {pos} outside shard {self.files[idx]} ({self.tokens.size} tokens)")
        self.pos = pos
        self.taken = int(state["taken"])


class DistributedTokenLoader:
    """Per-rank (x, y) batches from the shared token stream, copied to ``device`` without blocking.

    ``next_batch`` returns ``x, y`` of shape ``(local_tokens // seq_len, seq_len)`` int64 where
    ``local_tokens = global_tokens // (world_size * grad_accum)``.
    """

    def __init__(self, data_dir: str | os.PathLike, rank: int, world_size: int, device: torch.device,
                 vocab_size: int | None = None) -> None:
        files = list_shards(data_dir, "train")
        if not files:
            raise FileNotFoundError(f"no fineweb_train_*.bin shards in {data_dir}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.stream = TokenStream(files, vocab_size)
        self._pin = self.device.type == "cuda"

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum)
        if local_tokens % seq_len:
            raise ValueError(f"{local_tokens} tokens per rank per micro-step is not a multiple of seq_len {seq_len}")
        span = local_tokens + 1  # the extra token lets targets be inputs shifted by one
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        if self._pin:
            # pinned host memory makes the copy truly asynchronous: the GPU keeps running
            local = local.pin_memory()
        local = local.to(self.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)
