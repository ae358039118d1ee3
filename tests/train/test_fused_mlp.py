"""``fused=mlp`` (pgolf_train/fused_mlp.py) on the CPU: the switch binds and unbinds, the module off
CUDA is the model's MLP to the bit (so eval and the CPU tests keep the reference), the trainer
refuses the fusion where quack cannot run, saying why. The kernels themselves are GPU-only
(CuTe DSL): tests/train/test_cute_gpu.py."""
from __future__ import annotations

import pytest
import torch

from pgolf_eval.scorer import Scorer
from pgolf_train import fused, fused_mlp
from pgolf_train.config import ConfigError, load_config
from pgolf_train.model import GPT, MLP, GPTConfig
from pgolf_train.trainer import train


def _model(**kw) -> GPT:
    cfg = GPTConfig(vocab_size=300, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16,
                    mlp_mult=3.0, **kw)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    with torch.no_grad():  # off the zero-init projections
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("activation", ["leaky_relu2", "relu2"])
def test_mlp_fusion_binds_and_off_cuda_is_the_model_mlp(activation):
    model = _model(activation=activation)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x, y)
    ref.backward()
    ref_g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused.apply_fusions(model, "mlp")
    assert all(type(b.mlp) is fused_mlp.FusedMLP for b in model.blocks)
    assert model.state_dict().keys() == state.keys()
    got = model(x, y)
    got.backward()
    assert torch.equal(got, ref)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, ref_g[n]), n
    fused.apply_fusions(model, "")
    assert all(type(b.mlp) is MLP for b in model.blocks)


@pytest.mark.parametrize("quack_loads", [True, False])
def test_bind_loads_quack_before_any_compile(monkeypatch, quack_loads):
    """The bug the H100 found (2026-12-07): quack imported and LeakyReLU² registered inside the
    compiled forward, a side effect dynamo replays only after the graph ran, so quack's kernels
    raised KeyError 'leaky_relu_sq'. ``bind`` must load them eagerly where CUDA is, and still bind
    (refusing is the trainer's job) where quack cannot load."""
    calls = []

    def load():
        calls.append(1)
        if not quack_loads:
            raise ImportError("no quack here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fused_mlp, "_mlp_func", load)
    model = _model()
    fused_mlp.bind(model, False)
    assert calls == []
    fused_mlp.bind(model, True)
    assert calls == [1] and all(type(b.mlp) is fused_mlp.FusedMLP for b in model.blocks)


def test_quack_activation_names_follow_the_model():
    assert fused_mlp.QUACK_ACT[True] == "leaky_relu_sq" and fused_mlp.QUACK_ACT[False] == "relu_sq"
    assert fused_mlp.unavailable("cpu") is not None


def test_trainer_refuses_mlp_where_quack_cannot_run(tiny_data, sp1024, tmp_path):
    """On this CPU machine: a clear ConfigError naming the fusion and the reason, before any file is written."""
    cfg = load_config("tiny", ["iterations=2", "fused=ce,mlp"])
    with pytest.raises(ConfigError, match="fused: 'mlp' cannot run here: "):
        train(cfg, tiny_data, sp1024, tmp_path / "run", scorer=Scorer(), echo=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert load_config("tiny", ["fused=mlp"]).fused == "mlp"
