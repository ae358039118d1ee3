"""The attention block's fused kernels (pgolf_train/fused_attn.py) against the model's ops, on the CPU:
the Triton kernels through the interpreter, the torch path as a property, and whole models (eager
and compiled) with ``fused=qk,xsa`` against the reference forward."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_train import fused, fused_attn, triton_env
from pgolf_train.build import compile_model
from pgolf_train.model import GPT, CausalSelfAttention, GPTConfig

from .arch_helpers import assert_same_loss_and_grads, loss_and_grads

INTERPRETED = """
import json, sys
import torch
from pgolf_train import fused, fused_attn as fa, triton_env
assert triton_env.interpreter(), "Triton is not interpreting"
out = []
for kind, B, T, H, KV, D, half, gain, dtype, seed in json.loads(sys.argv[1]):
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    if kind == "qk":  # x a strided view (a split of a wider projection), d out non-contiguous
        wide = (torch.randn(B, T, H * D + 8) * 3).to(dt)
        x = wide[..., 3:3 + H * D].view(B, T, H, D).detach().requires_grad_()
        cos, sin = torch.randn(T, half).cos(), torch.randn(T, half).sin()
        g = (torch.rand(H) + 0.5).requires_grad_() if gain else None
        args = (x, cos, sin, g)
        ref = fa._qk_reference(*args).transpose(1, 2)
        got = fa.qk_norm_rope(*args)
        wrt = [x] + ([g] if gain else [])
    else:  # v the transposed view of a [B, T, KV, D] projection, some of its rows zero (norm < eps)
        y = torch.randn(B, H, T, D).to(dt).requires_grad_()
        v0 = torch.randn(B, T, KV, D)
        v0[:, ::3] = 0
        v0 = v0.to(dt).requires_grad_()
        v = v0.transpose(1, 2)
        ref, got = fa._xsa_reference(y, v), fa.xsa(y, v)
        wrt = [y, v0]
    do = torch.randn(got.shape[::-1]).to(dt).permute(3, 2, 1, 0)  # reversed strides: nothing contiguous
    gr = torch.autograd.grad(ref, wrt, do)
    gg = torch.autograd.grad(got, wrt, do)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    out.append([float((got.double() - ref.double()).abs().max()), [rel(a, b) for a, b in zip(gg, gr)],
                list(got.shape) == list(ref.shape)])
print(json.dumps(out))
"""


def test_kernels_interpreted_match_the_model_ops():
    """qk: heads of 16 and 64, full and partial rotation, with and without the gain, a row count
    off the block size; xsa: groups of 1, 2 and 4, zero values. float32: forward and gradients
    equal the reference to rounding; bf16 within a few steps (the interpreter truncates its casts,
    the GPU rounds them: tests/train/test_fused_gpu.py checks those bits)."""
    pytest.importorskip("triton")
    cases = [["qk", 2, 5, 3, 3, 16, 8, True, "float32", 0], ["qk", 1, 7, 2, 2, 16, 4, False, "float32", 1],
             ["qk", 1, 3, 4, 4, 64, 32, True, "float32", 2], ["qk", 2, 5, 3, 3, 16, 6, True, "bfloat16", 3],
             ["xsa", 2, 5, 4, 2, 16, 0, False, "float32", 4], ["xsa", 1, 7, 4, 1, 16, 0, False, "float32", 5],
             ["xsa", 1, 4, 3, 3, 64, 0, False, "float32", 6], ["xsa", 2, 5, 4, 2, 16, 0, False, "bfloat16", 7]]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(cases)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for case, (fwd, grads, same_shape) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1]), strict=True):
        assert same_shape, case
        if case[8] == "float32":
            assert fwd < 1e-5 and max(grads) < 1e-5, (case, fwd, grads)
        else:
            assert fwd < 0.2 and max(grads) < 0.03, (case, fwd, grads)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 9), kv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 3]),
       D=st.sampled_from([8, 16]), seed=st.integers(0, 2**16))
def test_torch_path_matches_the_model_ops(B, T, kv, G, D, seed):
    """Without Triton on the device (CPU training): the ops are the model's, autograd included.
    Triton is switched off here: another test module may have imported it interpreted, which
    would send CPU tensors through the kernels (equal to a few ulp, not bit for bit)."""
    with mock.patch.object(triton_env, "use_triton", lambda t: False):
        _check_torch_path(B, T, kv, G, D, seed)


def _check_torch_path(B, T, kv, G, D, seed):
    torch.manual_seed(seed)
    H, half = kv * G, D // 2
    x = torch.randn(B, T, H, D, requires_grad=True)
    g = (torch.rand(H) + 0.5).requires_grad_()
    cos, sin = torch.randn(T, half).cos(), torch.randn(T, half).sin()
    y, v = torch.randn(B, H, T, D, requires_grad=True), torch.randn(B, kv, T, D, requires_grad=True)
    for ref, got, wrt in ((fused_attn._qk_reference(x, cos, sin, g).transpose(1, 2),
                           fused_attn.qk_norm_rope(x, cos, sin, g), (x, g)),
                          (fused_attn._qk_reference(x, cos, sin, None).transpose(1, 2),
                           fused_attn.qk_norm_rope(x, cos, sin), (x,)),
                          (fused_attn._xsa_reference(y, v), fused_attn.xsa(y, v), (y, v))):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        do = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(got, wrt, do), torch.autograd.grad(ref, wrt, do), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _cfg(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 300, "num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2,
                        "seq_len": 16, "xsa_layers": "all", **kw})


@pytest.mark.parametrize("kw", [{}, {"attn_out_gate": True, "doc_attention": True}, {"rope_dims": 8}])
def test_model_with_qk_xsa_matches_the_reference(kw):
    """A GPT with every block exclusive: loss and every gradient with fused=qk,xsa (and with qkv
    on top) equal the reference path's, eager and compiled; a deep copy runs its own weights;
    "" unbinds the fused forward."""
    torch.manual_seed(0)
    model = GPT(_cfg(**kw)).train()
    with torch.no_grad():  # off the init: zero-init projections would hide what the blocks compute
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    x[:, 5] = model.cfg.bos_id

    fused.apply_fusions(model, "")
    ref, ref_g = loss_and_grads(model, x, y)
    for names in ("qk,xsa", "qk,xsa,qkv", "qk", "xsa"):
        fused.apply_fusions(model, names)
        assert all(isinstance(b.attn, fused_attn.FusedAttention) for b in model.blocks)
        got, got_g = loss_and_grads(model, x, y)
        assert_same_loss_and_grads((got, got_g), (ref, ref_g))
    torch._dynamo.reset()
    torch.testing.assert_close(compile_model(model)(x, y).detach(), ref, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert isinstance(twin.blocks[0].attn, fused_attn.FusedAttention) and twin.blocks[0].attn.fused_xsa
    assert not torch.allclose(twin(x, y), model(x, y))
    fused.apply_fusions(model, "")
    assert all(type(b.attn) is CausalSelfAttention for b in model.blocks)
    torch.testing.assert_close(model(x, y).detach(), ref, rtol=0, atol=0)


def test_fusion_names_are_known():
    assert fused.parse_fusions("qk, xsa") == ("qk", "xsa")
    with pytest.raises(ValueError, match="unknown fusion 'rotary'"):
        fused.parse_fusions("qk,rotary")


def test_other_fusions_do_not_import_the_attention_kernels():
    """A generated train_gpt.py carries fused_attn only for qk or xsa (pgolf/bundle.py): with it
    absent, ce,rope (h200's before qk and xsa) and "" still apply; qk then fails on the import."""
    code = ("import sys\nsys.modules['pgolf_train.fused_attn'] = None\n"
            "from pgolf_train import fused\nfrom pgolf_train.model import GPT, GPTConfig\n"
            "m = GPT(GPTConfig(vocab_size=300, num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, seq_len=16))\n"
            "fused.apply_fusions(m, 'ce,rope', 16)\nfused.apply_fusions(m, '')\n"
            "try:\n    fused.apply_fusions(m, 'qk')\nexcept ImportError:\n    print('refused')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr[-2000:]
