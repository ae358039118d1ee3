"""The trainer's fused kernels on a real GPU (compiled Triton, CUDA numerics, bf16 autocast):
the row kernel against float64 autograd, the chunked head + loss at the `h200` shapes against the
model's head and loss, the compiled GPT with it against the compiled GPT without, and every
pinned attention backend against the math one.

Run on a GPU machine with ``python3 -m pytest tests/train/test_fused_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf_train import fused
from pgolf_train.build import compile_model
from pgolf_train.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("V", [4096, 1024, 9000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rows_kernel_matches_autograd(V, dtype):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(512, V, generator=g) * 20).to(dtype).cuda()
    t = torch.randint(0, V, (512,), generator=g).cuda()
    z = logits.double().requires_grad_()
    ref = F.cross_entropy(30 * torch.tanh(z / 30), t, reduction="none")
    ref.sum().backward()
    buf = logits.clone()
    loss = fused.softcap_ce_rows(buf, t, 30.0, 0.5)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=2e-5)
    want = z.grad * 0.5
    if dtype == torch.bfloat16:  # round-to-nearest on the GPU: the fp32 gradient rounded, give or take one step
        assert ((buf.double() - want).abs() <= want.abs() / 128 + 1e-12).all()
    else:
        torch.testing.assert_close(buf.double(), want, rtol=1e-4, atol=1e-7)


def test_gpu_linear_softcap_ce_at_h200_shapes():
    """131,072 × 512 bf16 features, the 4,096 × 512 tied embedding: loss and gradients against the
    model's head + loss (bf16 logits, fp32 cap and CE) under autocast, as in training."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(131072, 512, generator=g)).cuda().bfloat16().requires_grad_()
    w = (torch.randn(4096, 512, generator=g) * 0.05).cuda().requires_grad_()
    t = torch.randint(0, 4096, (131072,), generator=g).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy(30 * torch.tanh(F.linear(x, w.to(x.dtype)).float() / 30), t)
    ref.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused.linear_softcap_ce(x, w, t, 30.0)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    rel_x = ((x.grad.float() - gx.float()).norm() / gx.float().norm()).item()
    rel_w = ((w.grad - gw).norm() / gw.norm()).item()
    assert rel_x < 1e-2 and rel_w < 1e-2, (rel_x, rel_w)


@pytest.mark.parametrize("fusions", ["ce,rope", "ce,rope,qkv"])
def test_gpu_compiled_gpt_with_fusions_matches_without(fusions):
    """h200's block shapes at a small batch, compiled with the trainer's options, bf16 autocast."""
    cfg = GPTConfig(vocab_size=4096, num_layers=3, model_dim=512, num_heads=8, num_kv_heads=4, seq_len=1024)
    torch.manual_seed(0)
    model = GPT(cfg).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randint(0, 4096, (8, 1024), device="cuda")
    y = torch.randint(0, 4096, (8, 1024), device="cuda")
    out = {}
    for name in ("", fusions):
        torch._dynamo.reset()
        fused.apply_fusions(model, name, 1024, torch.device("cuda"))
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compile_model(model)(x, y)
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out[fusions][0], out[""][0], rtol=2e-3, atol=2e-3)
    for n, ref in out[""][1].items():
        got = out[fusions][1][n]
        rel = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel < 3e-2, (n, rel)


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_gpu_pinned_attention_backend_matches_math(backend):
    """What the trainer's sdpa_backend pins: causal GQA attention at h200's head shape in bf16, forward
    and gradients, against the math backend in float32. A backend this GPU or torch build cannot run
    for these inputs fails here with torch's reason."""
    g = torch.Generator().manual_seed(1)
    kv = 8 if backend == "efficient" else 4  # that kernel takes no grouped-query attention (the config says so)
    q = torch.randn(4, 8, 1024, 64, generator=g).cuda()
    k, v = (torch.randn(4, kv, 1024, 64, generator=g).cuda() for _ in range(2))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    with fused.sdpa_context("math"):
        ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    ref.square().sum().backward()
    inp = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    with fused.sdpa_context(backend):
        y = F.scaled_dot_product_attention(*inp, is_causal=True, enable_gqa=True)
    y.float().square().sum().backward()
    assert (y.float() - ref).abs().max().item() < 3e-2
    for a, b in zip(inp, ref_in):
        rel = ((a.grad.float() - b.grad).norm() / b.grad.norm()).item()
        assert rel < 2e-2, rel
