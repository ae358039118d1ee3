"""``fused=fa4`` (pgolf_train/fa4_attn.py) on the CPU: the ops' CPU path is causal attention with
grouped-query heads, forward and backward, against SDPA in float64; the model with the fusion bound
computes the reference's loss and gradients; the config and the trainer refuse it where it cannot
run. The kernels are GPU-only (CuTe DSL): tests/train/test_cute_gpu.py holds their GPU tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf_eval.scorer import Scorer
from pgolf_train import fa4_attn, fused
from pgolf_train.config import ConfigError, load_config
from pgolf_train.model import GPT, GPTConfig
from pgolf_train.trainer import train

from .arch_helpers import loss_and_grads


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (6, 1)])
def test_fa4_op_cpu_path_matches_sdpa(H, KV):
    g = torch.Generator().manual_seed(H * 10 + KV)
    q = torch.randn(2, 9, H, 8, generator=g)
    k, v = torch.randn(2, 9, KV, 8, generator=g), torch.randn(2, 9, KV, 8, generator=g)
    inp = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fa4_attn.fa4_attention(*inp, None)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref_in), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    do = torch.randn_like(q)
    out.backward(do)
    ref.backward(do.double())
    for a, b in zip(inp, ref_in):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)
    lse = fa4_attn._fa4_op(q, k, v, 8 ** -0.5)[1]
    assert lse.shape == (2, H, 9) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="H a multiple of KV"):
        fa4_attn.fa4_attention(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), None)


def test_model_with_fa4_bound_matches_the_reference():
    cfg = GPTConfig(vocab_size=300, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16,
                    xsa_layers="all")
    torch.manual_seed(0)
    model = GPT(cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    ref, ref_g = loss_and_grads(model, x, y)
    fused.apply_fusions(model, "qkv,fa4")
    assert all(b.attn.fused_fa4 for b in model.blocks)
    got, got_g = loss_and_grads(model, x, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for n, g in ref_g.items():
        torch.testing.assert_close(got_g[n], g, rtol=1e-4, atol=1e-6)
    fused.apply_fusions(model, "")
    assert not any(getattr(b.attn, "fused_fa4", False) for b in model.blocks)


def test_fa4_is_refused_where_it_cannot_run(tiny_data, sp1024, tmp_path):
    with pytest.raises(ConfigError, match="'fa4' is causal attention over whole rows"):
        load_config("tiny", ["fused=fa4", "doc_attention=true"])
    assert fa4_attn.unavailable("cpu") is not None
    cfg = load_config("tiny", ["iterations=2", "fused=fa4"])
    with pytest.raises(ConfigError, match="fused: 'fa4' cannot run here: "):
        train(cfg, tiny_data, sp1024, tmp_path / "run", scorer=Scorer(), echo=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_fa4_outputs_are_contiguous_whatever_the_inputs_layout():
    """The kernels now take strided inputs as they are, so the ops must not let an output's layout
    follow an input's: the fake implementations say contiguous, and torch.compile indexes the real
    outputs by that. q here is a permuted dense tensor (the layout without fused qk), k and v views
    of one buffer; eager and compiled agree, forward and backward."""
    torch.manual_seed(0)
    B, T = 2, 16
    q = torch.randn(B, 4, T, 8).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, T, 32, requires_grad=True)
    k, v = (t.view(B, T, 2, 8) for t in kv.split(16, -1))
    out, lse = fa4_attn._fa4_op(q, k, v, 8 ** -0.5)
    assert out.is_contiguous() and lse.is_contiguous()
    assert all(g.is_contiguous() for g in fa4_attn._fa4_bwd_op(out.transpose(1, 2).contiguous().transpose(1, 2),
                                                               q, k, v, out, lse, 8 ** -0.5))

    def f(a, b, c):
        return (fa4_attn.fa4_attention(a, b, c, None) * torch.arange(8.0)).sum(-1).transpose(1, 2).reshape(B, -1)

    def run(fn):
        y = fn(q, *(t.view(B, T, 2, 8) for t in kv.split(16, -1)))
        return [y.detach(), *torch.autograd.grad(y.square().sum(), (q, kv))]

    for a, b in zip(run(f), run(torch.compile(f, fullgraph=True, dynamic=False))):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
