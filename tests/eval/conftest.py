"""Fixtures for the evaluator: tiny GPTs, artifacts packed with the real codec, real val shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf_codec.container import write_artifact
from pgolf_train.model import GPT, GPTConfig
from pgolf_train.shards import write_shard
from pgolf_train.tokenizer import tokenizer_info

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PY = Path(__import__("pgolf_train.model", fromlist=["x"]).__file__)


def tiny_config(vocab: int = 1024, seq_len: int = 16) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=seq_len)


def tiny_model(vocab: int = 1024, seq_len: int = 16, seed: int = 0) -> GPT:
    """A tiny GPT whose every weight is random, so outputs depend on the whole context."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab, seq_len))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def pack(path: Path, model: GPT, tok: Path | None, *, code: str | None = None, **meta) -> Path:
    """Write ``model`` as an fp32 artifact (exact weights) with the metadata the evaluator reads."""
    metadata = {"model_config": model.cfg.to_dict(), "model_code": "model.py", **meta}
    if tok is not None:
        metadata.setdefault("tokenizer", tokenizer_info(tok))
    src = MODEL_PY.read_text() if code is None else code
    write_artifact(path, model.state_dict(), "*=fp32", metadata=metadata, code={"model.py": src}, coder="raw")
    return path


@pytest.fixture(scope="session")
def val_tokens(sp1024: Path, fineweb_docs: Path) -> np.ndarray:
    """~1,500 real FineWeb tokens: BOS + each document, as the challenge's shards hold them."""
    sp = spm.SentencePieceProcessor(model_file=str(sp1024))
    out: list[int] = []
    with open(fineweb_docs) as f:
        for line in f:
            out += [1] + sp.encode(json.loads(line)["text"])[:300]
            if len(out) > 1500:
                break
    return np.array(out[:1500], dtype=np.uint16)


@pytest.fixture()
def val_dir(tmp_path: Path, val_tokens: np.ndarray) -> Path:
    """Two val shards (the evaluator must concatenate them)."""
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "fineweb_val_000000.bin", val_tokens[:700])
    write_shard(d / "fineweb_val_000001.bin", val_tokens[700:])
    return d


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory, sp1024: Path) -> Path:
    return pack(tmp_path_factory.mktemp("art") / "tiny.pgolf", tiny_model(), sp1024)
