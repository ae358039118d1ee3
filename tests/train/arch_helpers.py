"""Shared by the architecture, technique and fused-kernel tests: a loss with its gradients, a
compiled-vs-eager training check, and a tiny run trained, exported and scored by `pgolf eval`
against a direct computation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch


def randomized(cfg, seed: int = 0):
    """A GPT of ``cfg`` with every weight perturbed (the zero-init projections too), so every path carries signal."""
    from pgolf_train.model import GPT

    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def batch(cfg, B: int = 2, T: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and next-token targets, long ``(B, T)`` each."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def loss_and_grads(m: torch.nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``m(x, y)`` and a copy of each parameter's gradient (those that got one), by name."""
    m.zero_grad(set_to_none=True)
    loss = m(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(got: tuple[torch.Tensor, dict[str, torch.Tensor]],
                               ref: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """Two ``loss_and_grads`` results agree to float32 rounding: the loss, which parameters got a
    gradient, and each gradient."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert got[1].keys() == ref[1].keys()
    for n, g in ref[1].items():
        torch.testing.assert_close(got[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def assert_compiled_matches_eager(m: torch.nn.Module, x: torch.Tensor,
                                  y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Forward and backward of ``m(x, y)`` captured whole (fullgraph: a break raises) with the
    aot_eager backend (the graph inductor would get, AOT autograd's forward/backward split included:
    inductor's C++ codegen costs 30-90 s per model on 2 cores) equal eager; returns the compiled
    gradients by parameter name and the compiled model."""
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = m(x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    return grads, compiled


def train_export_and_eval(tiny_data, sp1024, out, sets: list[str], capsys) -> tuple[dict, dict, float]:
    """A 3-step `pgolf train` run of the tiny config with ``sets``, then `pgolf eval` of its artifact
    (the CLI, JSON) and a direct bpb of the decoded model: (summary, eval JSON, direct bpb)."""
    from pgolf.cli import main as pgolf
    from pgolf_eval.evaluate import load_val_tokens, per_target_bytes
    from pgolf_eval.loader import model_from_artifact
    from pgolf_eval.scorer import Scorer
    from pgolf_train.config import load_config
    from pgolf_train.tokenizer import byte_tables
    from pgolf_train.trainer import train

    n_val = 1024
    cfg = load_config("tiny", ["iterations=3", f"val_max_tokens={n_val}", "train_batch_tokens=512", *sets])
    summary = train(cfg, tiny_data, sp1024, out, scorer=Scorer(), echo=False)
    art = out / "model.pgolf"
    capsys.readouterr()
    assert pgolf(["eval", str(art), "--data", str(tiny_data), "--tokenizer", str(sp1024),
                  "--max-tokens", str(n_val), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    # direct: non-overlapping windows of the training context over the same prefix, one forward each
    model, artifact = model_from_artifact(art)
    assert artifact.metadata["model_config"] == cfg.model_config().to_dict()
    tokens = load_val_tokens(tiny_data, 1024)[:n_val]
    W, nats = cfg.train_seq_len, 0.0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, W):
            e = min(s + W, len(tokens) - 1)
            seg = torch.as_tensor(tokens[s:e + 1].astype(np.int64))[None]
            nats += model.token_losses(seg[:, :-1], seg[:, 1:]).double().sum().item()
    nbytes = int(per_target_bytes(tokens, byte_tables(sp1024, 1024)).sum())
    assert ev["tokens"] == len(tokens) - 1 and ev["bytes"] == nbytes
    return summary, ev, nats / math.log(2) / nbytes


def check_trained_and_scored(summary: dict, ev: dict, direct: float) -> None:
    """The run finished and fits; `pgolf eval` equals the trainer's post-quantization score and the direct bpb."""
    assert summary["steps"] == 3 and summary["fits"]
    assert math.isfinite(summary["val_bpb"]) and abs(summary["val_bpb"] - summary["val_bpb_prequant"]) < 0.05
    assert ev["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
    assert ev["val_bpb"] == pytest.approx(direct, rel=1e-5)
