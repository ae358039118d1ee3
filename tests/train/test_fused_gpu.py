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

from pgolf_train import fused, fused_attn
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


def assert_compiled_fusions_match(ref: str, fusions: str, **cfg_kw) -> GPT:
    """h200's block shapes (exclusive attention in every block, ``cfg_kw`` on top) at a small batch,
    compiled with the trainer's options under bf16 autocast, with fusions ``ref`` and ``fusions``:
    the loss within 2e-3 and every parameter's gradient within 3e-2 relative. Returns the model."""
    cfg = GPTConfig(vocab_size=4096, num_layers=3, model_dim=512, num_heads=8, num_kv_heads=4, seq_len=1024,
                    xsa_layers="all", **cfg_kw)
    torch.manual_seed(0)
    model = GPT(cfg).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randint(0, 4096, (8, 1024), device="cuda")
    y = torch.randint(0, 4096, (8, 1024), device="cuda")
    out = {}
    for name in (ref, fusions):
        torch._dynamo.reset()
        fused.apply_fusions(model, name, 1024, torch.device("cuda"))
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compile_model(model)(x, y)
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out[fusions][0], out[ref][0], rtol=2e-3, atol=2e-3)
    for n, want in out[ref][1].items():
        got = out[fusions][1][n]
        rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert rel < 3e-2, (n, rel)
    return model


@pytest.mark.parametrize("fusions", ["ce,rope", "ce,rope,qkv", "ce,rope,qk,xsa", "ce,rope,qkv,qk,xsa"])
def test_gpu_compiled_gpt_with_fusions_matches_without(fusions):
    assert_compiled_fusions_match("", fusions)


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rope_half", [32, 8])
def test_gpu_qk_kernel_at_h200_shapes(rope_half):
    """q and k as the split views of one [16, 1024, 1024] bf16 qkv projection (8 query heads, 4 KV
    heads of 64; full and partial rotation), q with its gain: forward and gradients at least as close
    to the float64 ops as the eager bf16 path is, the forward within bf16 tolerance of it."""
    g = torch.Generator().manual_seed(rope_half)
    B, T, H, KV, D = 16, 1024, 8, 4, 64
    qkv = (torch.randn(B, T, (H + 2 * KV) * D, generator=g) * 2).cuda().bfloat16()
    ang = torch.rand(T, rope_half, generator=g) * 6.3
    cos, sin = ang.cos().cuda(), ang.sin().cuda()  # float32, as the model passes them
    gain = (torch.rand(H, generator=g) + 1).cuda()
    for h, off, gn in ((H, 0, gain), (KV, H * D, None)):
        base = qkv.detach().requires_grad_()
        x = base[..., off:off + h * D].view(B, T, h, D)
        gg = gn.clone().requires_grad_() if gn is not None else None
        wrt = [base] + ([gg] if gg is not None else [])
        do = torch.randn(B, h, T, D, generator=g).cuda().bfloat16()
        got = fused_attn.qk_norm_rope(x, cos, sin, gg)
        got_g = torch.autograd.grad(got, wrt, do)
        ref = fused_attn._qk_reference(x, cos, sin, gg).transpose(1, 2)
        ref_g = torch.autograd.grad(ref, wrt, do)
        wrt64 = [t.detach().double().requires_grad_() for t in wrt]
        x64 = wrt64[0][..., off:off + h * D].view(B, T, h, D)
        exact = fused_attn._qk_reference(x64, cos.double(), sin.double(), wrt64[1] if gn is not None else None)
        exact_g = torch.autograd.grad(exact.transpose(1, 2), wrt64, do.double())
        exact = exact.transpose(1, 2)
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert _rel(got, exact) <= 1.05 * _rel(ref, exact) + 1e-6, (_rel(got, exact), _rel(ref, exact))
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=1e-2)  # bf16 steps apart at most
        for a, b, c in zip(got_g, ref_g, exact_g, strict=True):
            assert _rel(a, c) <= 1.05 * _rel(b, c) + 1e-6, (_rel(a, c), _rel(b, c))


def test_gpu_xsa_kernel_at_h200_shapes():
    """The attention output [16, 8, 1024, 64] bf16 and v the transposed view of its projection
    [16, 1024, 4, 64] (every third token's value zero): forward and gradients at least as close to
    the float64 ops as the eager bf16 path is, the output laid out [B, T, H, D]."""
    g = torch.Generator().manual_seed(7)
    B, T, H, KV, D = 16, 1024, 8, 4, 64
    y = torch.randn(B, H, T, D, generator=g).cuda().bfloat16().requires_grad_()
    v0 = torch.randn(B, T, KV, D, generator=g)
    v0[:, ::3] = 0
    v0 = v0.cuda().bfloat16().requires_grad_()
    do = torch.randn(B, H, T, D, generator=g).cuda().bfloat16()
    got = fused_attn.xsa(y, v0.transpose(1, 2))
    assert got.transpose(1, 2).is_contiguous()
    got_g = torch.autograd.grad(got, (y, v0), do)
    ref = fused_attn._xsa_reference(y, v0.transpose(1, 2))
    ref_g = torch.autograd.grad(ref, (y, v0), do)
    y64, v64 = y.detach().double().requires_grad_(), v0.detach().double().requires_grad_()
    exact = fused_attn._xsa_reference(y64, v64.transpose(1, 2))
    exact_g = torch.autograd.grad(exact, (y64, v64), do.double())
    assert _rel(got, exact) <= 1.05 * _rel(ref, exact) + 1e-6
    for a, b, c in zip(got_g, ref_g, exact_g, strict=True):
        assert _rel(a, c) <= 1.05 * _rel(b, c) + 1e-6, (_rel(a, c), _rel(b, c))
