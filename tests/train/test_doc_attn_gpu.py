"""Document attention as flash varlen (pgolf_train/doc_attn.py) on a real GPU: the op (FlashAttention's
variable-length kernel, bf16) against SDPA's math kernel with the model's boolean document mask, and
the compiled GPT with ``fused=...,varlen`` against the compiled GPT with the mask, at h200's block
shapes under bf16 autocast, one graph for batches of different document counts.

Run on a GPU machine with ``python3 -m pytest tests/train/test_doc_attn_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf_train import doc_attn, fused
from pgolf_train.build import compile_model
from pgolf_train.model import GPT, GPTConfig, doc_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BOS = 1


def _docs(B: int, T: int, mean_len: int, seed: int) -> torch.Tensor:
    """Token ids with a BOS at document starts ~``mean_len`` apart, plus the edge cases: a BOS at a
    row start, two BOS in a row, a BOS as a row's last token."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, 4096, (B, T), generator=g)
    idx[torch.rand(B, T, generator=g) < 1 / mean_len] = BOS
    idx[0, 0] = idx[1, 7] = idx[1, 8] = idx[2, T - 1] = BOS
    return idx


@pytest.mark.parametrize("heads, mean_len", [((8, 4), 300), ((8, 8), 50), ((8, 2), 2000)])
def test_gpu_varlen_matches_math_with_the_document_mask(heads, mean_len):
    H, KV = heads
    B, T, D = 8, 1024, 64
    idx = _docs(B, T, mean_len, seed=H * KV + mean_len).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B * T, n, D, device="cuda", generator=g).bfloat16().requires_grad_() for n in (H, KV, KV))
    do = torch.randn(B * T, H, D, device="cuda", generator=g).bfloat16()
    got = doc_attn.varlen_attention(q, k, v, doc_attn.segments(idx, BOS), T, None)
    qb, kb, vb = (t.detach().float().view(B, T, -1, D).transpose(1, 2).requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=doc_mask(idx, BOS), enable_gqa=True)
    ref_flat = ref.transpose(1, 2).reshape(B * T, H, D)
    assert (got.float() - ref_flat).abs().max().item() < 2e-2  # bf16 output rounding
    gg = torch.autograd.grad(got, (q, k, v), do)
    gr = torch.autograd.grad(ref_flat, (qb, kb, vb), do.float())
    for a, b in zip(gg, gr):
        b = b.transpose(1, 2).reshape(a.shape)
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 1e-2, rel


def test_gpu_compiled_gpt_with_varlen_matches_the_mask():
    """h200's blocks (8 heads over 4 kv heads, exclusive attention everywhere, the fused qk/xsa
    kernels), compiled with the trainer's options under bf16 autocast: varlen against the boolean
    mask (SDPA's own choice of kernel), and a second batch with another document count through the
    same compiled graph."""
    from torch._dynamo.utils import counters

    cfg = GPTConfig(vocab_size=4096, num_layers=3, model_dim=512, num_heads=8, num_kv_heads=4, seq_len=1024,
                    xsa_layers="all", doc_attention=True)
    torch.manual_seed(0)
    model = GPT(cfg).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batches = [(_docs(8, 1024, n, seed=n).cuda(), torch.randint(0, 4096, (8, 1024), device="cuda")) for n in (400, 90)]
    out: dict[str, list] = {}
    for name in ("ce,rope,qkv,qk,xsa", "ce,rope,qkv,qk,xsa,varlen"):
        torch._dynamo.reset()
        counters.clear()
        fused.apply_fusions(model, name, 1024, torch.device("cuda"))
        with fused.dynamo_context(name):
            compiled = compile_model(model)
            out[name] = []
            for x, y in batches:
                model.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = compiled(x, y)
                loss.backward()
                out[name].append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if "varlen" in name:
            assert counters["stats"]["unique_graphs"] == 1
    for (lr, gr), (lv, gv) in zip(out["ce,rope,qkv,qk,xsa"], out["ce,rope,qkv,qk,xsa,varlen"]):
        torch.testing.assert_close(lv, lr, rtol=2e-3, atol=2e-3)
        for n, ref in gr.items():
            rel = ((gv[n] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            assert rel < 3e-2, (n, rel)
