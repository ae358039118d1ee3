"""Tiny real-data shards for the trainer tests: FineWeb documents tokenized with sp1024."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf_train.shards import BOS_ID, write_shard


def make_tiny_shards(out: Path, docs_jsonl: Path, tokenizer: Path, n_train_docs: int = 170) -> Path:
    """Two train shards and one val shard (documents after ``n_train_docs``), BOS before each doc."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [json.loads(line)["text"] for line in docs_jsonl.read_text(encoding="utf-8").splitlines() if line]

    def encode(texts: list[str]) -> np.ndarray:
        return np.concatenate([np.array([BOS_ID, *sp.encode(t)], dtype=np.uint16) for t in texts])

    out.mkdir(parents=True, exist_ok=True)
    train = encode(docs[:n_train_docs])
    half = len(train) // 2
    write_shard(out / "fineweb_train_000000.bin", train[:half])
    write_shard(out / "fineweb_train_000001.bin", train[half:])
    write_shard(out / "fineweb_val_000000.bin", encode(docs[n_train_docs:]))
    return out


def exit_quietly() -> None:
    """End a spawned worker process once its work and its process group are done.

    DDP over gloo in spawned processes sometimes aborts during interpreter teardown ("terminate
    called without an active exception", after every result is written). That teardown is not
    what these tests check, so a worker that succeeded skips it; a worker that raised never
    gets here, and `mp.spawn` still reports its error.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def read_log(run: Path) -> list[dict]:
    """The JSON records of a run's `train.jsonl`."""
    return [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]


def logged_losses(run: Path) -> dict[int, float]:
    """step -> logged training loss of a run."""
    return {r["step"]: r["loss"] for r in read_log(run) if "loss" in r}


def train_command(argv: list[str]) -> int:
    """`pgolf train ARGV...` in this process (the command lives in pgolf.training, which hands the
    trainer the evaluator)."""
    from pgolf.cli import main

    return main(["train", *argv])


def fit_on_shard(model, data_dir: Path, steps: int, seq_len: int = 64, batch_size: int = 8) -> None:
    """``steps`` Adam steps (lr 1e-2) of ``model`` on random windows of the train shard: a tiny
    trained model whose weights are no longer the init (the caller seeds torch)."""
    import torch

    from pgolf_train.shards import read_shard

    toks = torch.from_numpy(read_shard(Path(data_dir) / "fineweb_train_000000.bin").astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, len(toks) - seq_len - 1, (batch_size,))
        batch = torch.stack([toks[j:j + seq_len + 1] for j in i])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
