"""TTT on a real GPU: the timing path (warm-up, synchronized cost samples, the budget) and CUDA numerics.

CPU runs cannot exercise these (the budget planner once read a first-call CUDA cost 35x too high and
switched adaptation off at once); run on a GPU machine with ``python3 -m pytest tests/eval/test_ttt_gpu.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf_eval.evaluate import evaluate_tokens
from pgolf_eval.ttt import TTTConfig
from pgolf_train.model import GPT, GPTConfig

from .test_evaluate import byte_tables_flat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _stream(n_docs: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[1], rng.integers(2, 1024, int(n))]) for n in rng.integers(40, 2500, n_docs)]
    return np.concatenate(docs).astype(np.uint16)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1024, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2,
                         seq_len=512)).cuda().eval()


@pytest.mark.parametrize("scope", ["doc", "both"])
def test_gpu_budget_that_covers_the_pass_adapts_everything(scope):
    model, toks = _model(), _stream()
    cfg = TTTConfig(chunk=64, rank=8, scope=scope, phase_tokens=16384)
    free = evaluate_tokens(model, toks, byte_tables_flat(1024), seq_len=512, device="cuda", ttt=cfg, log=None)
    t = free.extra["ttt"]
    budget = 3 * free.seconds + 5.0
    res = evaluate_tokens(model, toks, byte_tables_flat(1024), seq_len=512, device="cuda", ttt=cfg,
                          time_budget=budget, log=None)
    r = res.extra["ttt"]
    assert t["warmup_s"] is not None and r["warmup_s"] is not None  # on a GPU always, before the clock
    assert not r["budget_exceeded"] and r["adapted_fraction"] == 1.0, r
    assert r["cost_samples"] >= 3 and r["seconds_per_position"] > 0
    assert res.val_bpb == pytest.approx(free.val_bpb, abs=2e-3)  # bf16 kernels may differ run to run
    assert res.seconds < budget


def test_gpu_tiny_budget_scores_everything_and_reports_it():
    model, toks = _model(), _stream()
    sliding = evaluate_tokens(model, toks, byte_tables_flat(1024), seq_len=512, stride=64, doc_isolated=True,
                              device="cuda", log=None)
    res = evaluate_tokens(model, toks, byte_tables_flat(1024), seq_len=512, device="cuda", ttt=TTTConfig(rank=8),
                          time_budget=1e-3, log=None)
    r = res.extra["ttt"]
    assert r["budget_exceeded"] and r["adapted_fraction"] < 0.1
    assert res.tokens == sliding.tokens and res.bytes == sliding.bytes
