"""The CuTe DSL fusions on a real GPU: ``fused=mlp`` (quack's GEMMs with the activation in their
epilogues) against the model's MLP, and ``fused=fa4`` (FlashAttention 4) against SDPA's cuDNN
attention, each alone at the ``h200`` shapes and inside the compiled GPT. Needs CUDA, quack and
flash-attn-4 (on the lent H200: the wheels of ``benchmarks/fa4_probe.sh``, run by
``benchmarks/quack_step.sh``); without them a test here fails with the reason, it does not skip.

Run on a GPU machine with ``python3 -m pytest tests/train/test_cute_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf_train import fa4_attn, fused, fused_mlp
from pgolf_train.model import MLP, GPTConfig

from .test_fused_gpu import assert_compiled_fusions_match

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_gpu_quack_and_fa4_are_usable():
    assert fused_mlp.unavailable() is None, fused_mlp.unavailable()
    assert fa4_attn.unavailable() is None, fa4_attn.unavailable()


@pytest.mark.parametrize("layout", ["contiguous", "views"])
def test_gpu_fa4_matches_cudnn_attention(layout):
    """Causal GQA attention at h200's shapes (B=16, T=1024, 8 heads over 4, D=64) in bf16: output and
    gradients against SDPA (cuDNN) in bf16, both measured against float32 math attention: FA4 no
    farther from it than 1.5× cuDNN's error (and within 2e-2 relative). ``views``: FA4's inputs as
    the step hands them over, uncopied: q, k, v slices of one [B, T, (8 + 4 + 4)·64] projection
    output and d out a transposed view of a [B, H, T, D] tensor (xsa's backward)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(16, 1024, 8, 64, generator=g).cuda()
    k, v = (torch.randn(16, 1024, 4, 64, generator=g).cuda() for _ in range(2))
    do = torch.randn(16, 1024, 8, 64, generator=g).cuda()

    def leaves(dtype):
        if layout == "contiguous":
            return [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        qkv = torch.cat([t.flatten(2) for t in (q, k, v)], -1).to(dtype).requires_grad_()  # a new leaf
        return [qkv, *(t.view(16, 1024, -1, 64) for t in qkv.split([512, 256, 256], -1))]

    def run(f, dtype):
        inp = leaves(dtype)
        if len(inp) == 4:  # the projection's output and its three views
            root, inp = inp[0], inp[1:]
            assert not inp[2].is_contiguous()
            out = f(*inp)
            out.backward(do.to(dtype).transpose(1, 2).contiguous().transpose(1, 2))
            return [out.detach().float(), *(t.float() for t in root.grad.split([512, 256, 256], -1))]
        out = f(*inp)
        out.backward(do.to(dtype))
        return [out.detach().float()] + [t.grad.float().flatten(2) for t in inp]

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (a, b, c)), is_causal=True,
                                              enable_gqa=True).transpose(1, 2)

    with fused.sdpa_context("math"):
        ref = run(sdpa, torch.float32)
    with fused.sdpa_context("cudnn"):
        cudnn = run(sdpa, torch.bfloat16)
    got = run(lambda a, b, c: fa4_attn.fa4_attention(a, b, c, None), torch.bfloat16)
    for name, a, c, r in zip(("out", "dq", "dk", "dv"), got, cudnn, ref):
        err, base = _rel(a, r), _rel(c, r)
        assert err < 2e-2 and err <= 1.5 * base + 1e-4, (name, err, base)


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


@pytest.mark.parametrize("extra", ["mlp", "fa4", "mlp,fa4"])
def test_gpu_compiled_gpt_with_cute_fusions_matches_without(extra):
    """h200's shapes and activation, compiled with h200's fusions plus ``extra`` against h200's own;
    the empty spec unbinds them again."""
    model = assert_compiled_fusions_match("ce,rope,qkv,qk,xsa", f"ce,rope,qkv,qk,xsa,{extra}", mlp_mult=3.0,
                                          activation="leaky_relu2")
    fused.apply_fusions(model, "")
    assert not any(isinstance(b.mlp, fused_mlp.FusedMLP) or getattr(b.attn, "fused_fa4", False) for b in model.blocks)
