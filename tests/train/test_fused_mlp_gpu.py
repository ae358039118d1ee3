"""``fused=mlp`` on a real GPU: quack's GEMMs with the activation in their epilogues (CuTe DSL,
compiled for this GPU) against the model's MLP, alone at the ``h200`` shapes and inside the
compiled GPT. Needs CUDA and quack (on the lent H200: the wheels of ``benchmarks/fa4_probe.sh``,
``benchmarks/quack_step.sh``); without quack a test here fails with the reason, it does not skip.

Run on a GPU machine with ``python3 -m pytest tests/train/test_fused_mlp_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch

from pgolf_train import fused, fused_mlp
from pgolf_train.build import compile_model
from pgolf_train.model import GPT, MLP, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_gpu_quack_is_usable():
    assert fused_mlp.unavailable() is None, fused_mlp.unavailable()


@pytest.mark.parametrize("activation", ["leaky_relu2", "relu2"])
def test_gpu_fused_mlp_matches_the_model_mlp(activation):
    """32,768 tokens × 512 → 1,536 → 512 (h200's MLP), bf16 autocast as in training: output and the
    gradients of x, W1, W2 within bf16 rounding of the model's compiled ops (the epilogue applies
    the activation to the fp32 accumulator, the reference to h rounded to bf16)."""
    cfg = GPTConfig(vocab_size=4096, num_layers=1, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0,
                    activation=activation)
    torch.manual_seed(0)
    m = MLP(cfg).cuda()
    with torch.no_grad():
        m.proj.weight.normal_(0, 1536 ** -0.5)  # off its zero init
    x0 = torch.randn(32768, 512, device="cuda")
    dy = torch.randn(32768, 512, device="cuda")
    out = {}
    for on in (False, True):
        fused_mlp.bind(m, on)
        x = x0.clone().bfloat16().requires_grad_()
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.backward(dy.bfloat16())
        out[on] = (y.detach(), x.grad, m.fc.weight.grad.clone(), m.proj.weight.grad.clone())
    assert type(m) is fused_mlp.FusedMLP
    for name, got, ref in zip(("y", "dx", "dw1", "dw2"), out[True], out[False]):
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert _rel(got, ref) < 1e-2, (name, _rel(got, ref))


def test_gpu_compiled_gpt_with_fused_mlp_matches_without():
    """h200's block shapes at a small batch, compiled with every fusion of h200 plus mlp, against
    h200's own fusions: loss and every parameter's gradient."""
    cfg = GPTConfig(vocab_size=4096, num_layers=3, model_dim=512, num_heads=8, num_kv_heads=4, seq_len=1024,
                    mlp_mult=3.0, activation="leaky_relu2", xsa_layers="all")
    torch.manual_seed(0)
    model = GPT(cfg).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randint(0, 4096, (8, 1024), device="cuda")
    y = torch.randint(0, 4096, (8, 1024), device="cuda")
    out = {}
    for name in ("ce,rope,qkv,qk,xsa", "ce,rope,qkv,qk,xsa,mlp"):
        torch._dynamo.reset()
        fused.apply_fusions(model, name, 1024, torch.device("cuda"))
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compile_model(model)(x, y)
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref, got = out["ce,rope,qkv,qk,xsa"], out["ce,rope,qkv,qk,xsa,mlp"]
    torch.testing.assert_close(got[0], ref[0], rtol=2e-3, atol=2e-3)
    for n, g in ref[1].items():
        assert _rel(got[1][n], g) < 3e-2, (n, _rel(got[1][n], g))
    fused.apply_fusions(model, "")
    assert not any(isinstance(b.mlp, fused_mlp.FusedMLP) for b in model.blocks)
