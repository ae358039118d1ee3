"""The trainer's fused kernels (pgolf_train/fused.py) against the model's reference path, on the CPU:
the row kernel through the Triton interpreter and as torch, the chunked head + loss with its
gradients, compiled inside the model, and a short training run with and without it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_eval.scorer import Scorer
from pgolf_train import fused
from pgolf_train.build import compile_model
from pgolf_train.config import ConfigError, load_config
from pgolf_train.model import GPT, GPTConfig
from pgolf_train.trainer import train

from .arch_helpers import assert_same_loss_and_grads, loss_and_grads
from .train_fixtures import logged_losses

FEW = settings(max_examples=10, deadline=None)


def reference_ce(x, w, t, c=30.0):
    """The model's head and loss: bf16/fp32 logits in x's dtype, then fp32 soft cap and CE."""
    return F.cross_entropy(c * torch.tanh(F.linear(x, w.to(x.dtype)).float() / c), t)


def rows_reference(logits, t, c, scale):
    """Loss per row and scale · d loss/d logits by autograd in float64."""
    z = logits.double().requires_grad_()
    loss = F.cross_entropy(c * torch.tanh(z / c), t, reduction="none")
    loss.sum().backward()
    return loss.detach(), z.grad * scale


INTERPRETED = """
import json, sys
import torch
import torch.nn.functional as F
from pgolf_train import fused, triton_env
assert triton_env.interpreter(), "Triton is not interpreting"
out = []
for n, V, seed, spread, dtype in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * spread).to(getattr(torch, dtype))
    t = torch.randint(0, V, (n,), generator=g)
    z = logits.double().requires_grad_()
    ref = F.cross_entropy(30 * torch.tanh(z / 30), t, reduction="none")
    ref.sum().backward()
    buf = logits.clone()
    loss = fused.softcap_ce_rows(buf, t, 30.0, 0.25)
    want = z.grad * 0.25
    # bf16: in units of one bf16 step at the reference value; fp32: against rtol 1e-4 + atol 1e-7
    unit = (want.abs().clamp_min(1e-30).log2().floor().exp2() / 128 + 1e-12 if dtype == "bfloat16"
            else 1e-4 * want.abs() + 1e-7)
    out.append([float((loss.double() - ref.detach()).abs().max()), float(((buf.double() - want).abs() / unit).max())])
print(json.dumps(out))
"""


def test_rows_kernel_interpreted_matches_autograd():
    """The Triton row kernel under the interpreter (a fresh process: Triton must be imported in that
    mode): one block up to 8,192 entries, two passes beyond, logits past the cap (spread 300), fp32
    and bf16 rows. Losses equal float64 autograd's; fp32 gradients to 1e-4, bf16 ones within one bf16
    step (the interpreter rounds its casts unlike the GPU, so not bitwise)."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    cases = [[1, 2, 0, 1.0, "float32"], [5, 7, 1, 30.0, "float32"], [9, 300, 2, 300.0, "float32"],
             [4, 4096, 3, 10.0, "float32"], [3, 9000, 4, 30.0, "float32"], [6, 4096, 5, 10.0, "bfloat16"],
             [2, 9000, 6, 30.0, "bfloat16"]]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(cases)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for case, (loss_err, ulps) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1]), strict=True):
        assert loss_err < 3e-5, (case, loss_err)
        assert ulps <= 1.01, (case, ulps)


@FEW
@given(n=st.integers(1, 40), V=st.sampled_from([2, 7, 300, 4096, 9000]), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1.0, 30.0, 300.0]))
def test_rows_torch_path_matches_autograd(n, V, seed, spread):
    """The row arithmetic as torch (CPU training, and the kernel's specification)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * spread
    t = torch.randint(0, V, (n,), generator=g)
    ref_loss, ref_grad = rows_reference(logits, t, 30.0, 0.25)
    buf = logits.clone()
    loss = fused.softcap_ce_rows(buf, t, 30.0, 0.25)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(buf.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_linear_softcap_ce_matches_the_model_head_and_loss(monkeypatch, dtype, chunk):
    """Loss and both gradients equal the reference (autograd through the model's head) for chunks
    that do and do not divide the rows; the gradient scales with the upstream gradient."""
    monkeypatch.setattr(fused, "CE_CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    N, D, V = 200, 32, 300
    x = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.7).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    ref = reference_ce(x, w, t)
    ref.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    out = fused.linear_softcap_ce(x, w, t, 30.0)
    (3 * out).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * gx.abs().max().item())
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad / 3, gx, **tol)
    tol_w = tol if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * gw.abs().max().item())
    torch.testing.assert_close(w.grad / 3, gw, **tol_w)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == dtype


def _cfg(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=300, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16, **kw)


@pytest.mark.parametrize("kw", [{}, {"embed_dim": 16}, {"tie_embeddings": False}, {"exit_layers": "0"}])
def test_fused_ce_inside_the_compiled_model_matches_eager_reference(monkeypatch, kw):
    """GPT.head_loss set by apply_fusions, compiled (fullgraph, the trainer's options): the training
    loss and every parameter's gradient equal the unfused eager model's; eval mode is untouched."""
    monkeypatch.setattr(fused, "CE_CHUNK", 24)
    torch.manual_seed(0)
    model = GPT(_cfg(**kw)).train()
    with torch.no_grad():  # zero-init projections would leave most gradients zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
    ref = model(x, y)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused.apply_fusions(model, "ce")
    assert model.head_loss is fused.linear_softcap_ce
    out = compile_model(model)(x, y)
    out.backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 16, 300)  # eval: logits, the reference head
    fused.apply_fusions(model, "")
    assert model.head_loss is None


def test_rope_tables_made_once_are_what_the_compiled_model_reads():
    """fused=rope: the same loss as recomputing the tables (they are the same numbers), the compiled
    graph reads the cached tables (spoiling them changes its output), a rescale drops them."""
    torch.manual_seed(0)
    model = GPT(_cfg()).train()
    with torch.no_grad():  # zero-init projections would hide what attention computes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    ref = model(x, y)
    fused.apply_fusions(model, "rope", seq_len=16, device=torch.device("cpu"))
    (key, (cos, sin)), = model.rope_cache.items()
    assert key == (16, torch.device("cpu")) and cos.shape == (16, 4)
    torch.testing.assert_close(compile_model(model)(x, y), ref, rtol=0, atol=0)
    torch._dynamo.reset()
    model.rope_cache[key] = (torch.ones_like(cos), torch.zeros_like(sin))  # no rotation at all
    assert not torch.allclose(compile_model(model)(x, y), ref)
    model.set_rope_scaling("ntk", 2.0)
    assert model.rope_cache == {}
    assert fused.compile_options("ce,epilogue") == {"max_autotune": True, "epilogue_fusion": True}
    assert fused.compile_options("ce,rope") == {}
    assert fused.compile_options("ce,rope,tune") == {"coordinate_descent_tuning": True}
    assert fused.compile_options("qkv") == {}


def test_qkv_one_matmul_matches_three_and_steps_aside_for_hooks():
    """fused=qkv: loss and every gradient equal the three projections' (fp32: one dot product per
    output either way), compiled too and under QAT; a forward hook on a projection (TTT's LoRA)
    sends the block back to the three calls, so the hook still runs; "" restores the reference."""
    from pgolf_codec.schemes import QuantSpec

    torch.manual_seed(0)
    model = GPT(_cfg()).train()
    with torch.no_grad():  # off the init: zero-init projections would hide what the blocks compute
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))

    for qat in (False, True):
        for blk in model.blocks:
            for lin in (blk.attn.c_q, blk.attn.c_k, blk.attn.c_v):
                lin.qat = QuantSpec.parse("int4:mse") if qat else None
        fused.apply_fusions(model, "")
        ref, ref_g = loss_and_grads(model, x, y)
        fused.apply_fusions(model, "qkv")
        assert all(b.attn.fuse_qkv for b in model.blocks)
        got, got_g = loss_and_grads(model, x, y)
        assert_same_loss_and_grads((got, got_g), (ref, ref_g))
        torch._dynamo.reset()
        torch.testing.assert_close(compile_model(model)(x, y).detach(), got, rtol=1e-5, atol=1e-5)
    calls = []
    h = model.blocks[0].attn.c_v.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)  # k is normed: v
    hooked = model(x, y)
    h.remove()
    assert calls == [1] and not torch.allclose(hooked, got)
    fused.apply_fusions(model, "")
    assert not any(b.attn.fuse_qkv for b in model.blocks)


def test_tune_compiles_the_same_model():
    """fused=tune only changes how inductor picks its kernels' block sizes: torch.compile takes the
    option and computes the compiled model's loss (on a GPU it times the candidates at the compile)."""
    torch.manual_seed(0)
    model = GPT(_cfg()).train()
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    torch._dynamo.reset()
    ref = compile_model(model)(x, y)
    torch._dynamo.reset()
    torch.testing.assert_close(compile_model(model, extra=fused.compile_options("tune"))(x, y), ref)


def test_fusion_and_backend_names_are_checked():
    assert fused.parse_fusions(" ce, ") == ("ce",) and fused.parse_fusions("") == ()
    with pytest.raises(ValueError, match="unknown fusion 'swiglu'"):
        fused.parse_fusions("ce,swiglu")
    with pytest.raises(ConfigError, match="fused"):
        load_config("tiny", ["fused=softmax"])
    with pytest.raises(ConfigError, match="sdpa_backend"):
        load_config("tiny", ["sdpa_backend=fa3"])
    with pytest.raises(ConfigError, match="efficient.*num_kv_heads"):
        load_config("tiny", ["sdpa_backend=efficient"])  # tiny has grouped-query attention
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        fused.sdpa_context("fa3")
    q = torch.randn(1, 2, 8, 4)
    with fused.sdpa_context("math"):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_tiny_training_with_fused_ce_follows_the_reference(tiny_data, sp1024, tmp_path, one_thread):
    """Same seed, same data, 12 steps: the fused run's losses track the reference's (fp32 on the CPU:
    differences are rounding), it logs the fusion, and the export scores with the reference head."""
    losses = {}
    for name, extra in (("ref", []), ("fused", ["fused=ce,rope", "sdpa_backend=math"])):
        cfg = load_config("tiny", ["iterations=12", "train_log_every=1", *extra])
        summary = train(cfg, tiny_data, sp1024, tmp_path / name, scorer=Scorer(), echo=False)
        losses[name] = logged_losses(tmp_path / name)
        assert np.isfinite(summary["val_bpb"])
    a, b = (np.array([losses[k][s] for s in range(1, 13)]) for k in ("ref", "fused"))
    assert np.abs(a - b).max() < 2e-3, (a, b)
    assert "fused kernels: ce,rope  attention: math" in (tmp_path / "fused" / "train.log").read_text()
