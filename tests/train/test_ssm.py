"""SSM mixer layers (`ssm_layers`): the chunked scan against the plain recurrence, shapes and
gradients, causality, the optimizer split, config validation, compile, artifact and `pgolf eval`."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from pgolf_train.model import GPT, GPTConfig, _ssd_chunks
from pgolf_train.muon import Muon, split_params

from .arch_helpers import (assert_compiled_matches_eager, batch, check_trained_and_scored, randomized,
                           train_export_and_eval)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16,
            ssm_state=8, ssm_head_dim=8, ssm_chunk=5)
SSM_PARAMS = {"in_proj.weight", "bc_proj.weight", "conv", "dt_bias", "A_log", "D", "out_proj.weight"}


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**TINY, "ssm_layers": "1,3", **kw})


# --- the chunked scan ---------------------------------------------------------------------------

def sequential_scan(x, dt, A, B, C):
    """The reference: h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t B_tᵀ, y_t = h_t C_t, h_0 = 0, one step at
    a time in float64. x: [b, T, H, P]; dt: [b, T, H]; A: [H]; B, C: [b, T, N]."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, T, H, P = x.shape
    h = torch.zeros(b, H, P, B.size(-1), dtype=torch.float64)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # [b, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append((h * C[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, 1)


def scan_inputs(b, T, H, P, N, dtype=torch.float64, seed=0, dt_max=2.0, a_max=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * dt_max + 1e-3  # > 0
    A = -(torch.rand(H, generator=g, dtype=dtype) * a_max + 0.05)  # < 0
    B = torch.randn(b, T, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, N, generator=g, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 13, 16, 64])  # T = 13: most do not divide it
def test_chunked_scan_equals_sequential_recurrence_float64(chunk):
    args = scan_inputs(2, 13, 3, 4, 5)
    ref = sequential_scan(*args)
    y = _ssd_chunks(*args, chunk)
    assert y.dtype == torch.float64 and y.shape == (2, 13, 3, 4)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 6, 32])
def test_chunked_scan_float32(chunk):
    """float32 (and bf16) inputs compute in float32: within float32 rounding of the float64 recurrence."""
    args = scan_inputs(2, 30, 2, 4, 8, dtype=torch.float32, seed=3)
    ref = sequential_scan(*args)
    y = _ssd_chunks(*args, chunk)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    x, dt, A, B, C = args
    yb = _ssd_chunks(x.bfloat16(), dt, A, B, C, chunk)  # a bf16 x is promoted, not scanned in bf16
    assert yb.dtype == torch.float32
    torch.testing.assert_close(yb.double(), sequential_scan(x.bfloat16(), dt, A, B, C), rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())


@given(b=st.integers(1, 2), T=st.integers(1, 20), H=st.integers(1, 3), P=st.integers(1, 4), N=st.integers(1, 5),
       chunk=st.integers(1, 24), seed=st.integers(0, 2**16), dt_max=st.sampled_from([0.01, 1.0, 5.0]),
       a_max=st.sampled_from([0.1, 2.0, 10.0]))
def test_chunked_scan_property(b, T, H, P, N, chunk, seed, dt_max, a_max):
    args = scan_inputs(b, T, H, P, N, seed=seed, dt_max=dt_max, a_max=a_max)
    ref = sequential_scan(*args)
    y = _ssd_chunks(*args, chunk)
    assert y.shape == (b, T, H, P) and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_scan_is_exactly_causal(dtype):
    """Inputs at steps > t leave y[:t+1] bit for bit the same. (The carry between chunks once took
    the log decay through chunk c-1 as g_c - a_c: exact in reals, but its rounding let chunk c's
    own later steps into the state entering it, ~1e-6 in float32.)"""
    x, dt, A, B, C = scan_inputs(1, 19, 2, 4, 8, dtype=dtype, seed=7)
    for chunk in (1, 4, 5):
        y = _ssd_chunks(x, dt, A, B, C, chunk)
        for t in range(18):
            g = torch.Generator().manual_seed(t)
            later = [u.clone() for u in (x, dt, B, C)]
            for u in later:
                u[:, t + 1:] = torch.rand(u[:, t + 1:].shape, generator=g, dtype=dtype) * 3
            y2 = _ssd_chunks(later[0], later[1], A, later[2], later[3], chunk)
            assert torch.equal(y2[:, :t + 1], y[:, :t + 1]), (chunk, t)
            assert not torch.equal(y2[:, t + 1], y[:, t + 1])


def test_chunked_scan_gradients_match_the_recurrence():
    """The backward through the masked exp/cumsum is finite and equals the recurrence's."""
    args = [t.requires_grad_() for t in scan_inputs(1, 9, 2, 3, 4, seed=5)]
    w = torch.randn(1, 9, 2, 3, dtype=torch.float64)
    g_chunk = torch.autograd.grad((_ssd_chunks(*args, 4) * w).sum(), args)
    g_ref = torch.autograd.grad((sequential_scan(*args) * w).sum(), args)
    for a, r in zip(g_chunk, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=0, atol=1e-11)


# --- the SSM block in the model -----------------------------------------------------------------

def test_ssm_layers_pick_the_mixer_and_shapes():
    cfg = tiny(ssm_expand=2.0)
    m = GPT(cfg)
    for i, b in enumerate(m.blocks):
        assert hasattr(b, "ssm") == (i in (1, 3)) and hasattr(b, "attn") == (i not in (1, 3))
    s = m.blocks[1].ssm
    d, di, N, H = 32, 64, 8, 8  # inner width 2·32, heads 64 / 8
    assert (s.di, s.H, s.N, s.P, s.chunk) == (di, H, N, 8, 5)
    shapes = {n: tuple(p.shape) for n, p in s.named_parameters()}
    assert shapes == {"in_proj.weight": (2 * di, d), "bc_proj.weight": (2 * N + H, d), "conv": (di + 2 * N, 4),
                      "dt_bias": (H,), "A_log": (H,), "D": (H,), "out_proj.weight": (d, di)}
    assert torch.all(s.out_proj.weight == 0)  # starts as the identity block, as attention does
    dt = F.softplus(s.dt_bias)
    assert torch.all((dt > 1e-3 - 1e-7) & (dt < 1e-1 + 1e-7))
    assert torch.all((s.A_log.exp() >= 1 - 1e-6) & (s.A_log.exp() <= 16 + 1e-5))
    attn_only = GPT(dataclasses.replace(cfg, ssm_layers=""))
    per_ssm = sum(p.numel() for p in s.parameters())
    per_attn = sum(p.numel() for p in attn_only.blocks[1].attn.parameters())
    assert m.num_params() == attn_only.num_params() + 2 * (per_ssm - per_attn)
    x, _ = batch(cfg)
    out = s(torch.randn(2, 12, d), None, None, None)
    assert out.shape == (2, 12, d)
    logits = m(x)
    assert logits.shape == (2, 12, 64) and logits.dtype == torch.float32
    everywhere = GPT(tiny(ssm_layers="all"))
    assert all(hasattr(b, "ssm") and not hasattr(b, "attn") for b in everywhere.blocks)


@pytest.mark.parametrize("kw", [{}, {"ssm_layers": "all", "ssm_expand": 2.0, "ssm_conv": 1},
                                {"ssm_layers": "0", "ssm_conv": 3, "ssm_chunk": 64}])
def test_every_parameter_gets_a_gradient(kw):
    cfg = tiny(**kw)
    torch.manual_seed(0)
    m = GPT(cfg)  # the real init
    x, y = batch(cfg, B=2, T=12)
    m(x, y).backward()
    ssm = next(b.ssm for b in m.blocks if hasattr(b, "ssm"))
    # Zero-init out_proj: at step 0 the SSM's output is 0, so nothing upstream of out_proj (in_proj,
    # bc_proj, conv, dt, A, D) can move the loss and their gradients are exactly zero; out_proj's is not.
    assert ssm.out_proj.weight.grad.abs().sum() > 0
    assert torch.all(ssm.in_proj.weight.grad == 0) and torch.all(ssm.A_log.grad == 0)
    # One real optimizer step moves the zero-init projections off zero; then every parameter,
    # every new SSM parameter included, gets a finite nonzero gradient.
    torch.optim.Adam(m.parameters(), lr=1e-2).step()
    m.zero_grad()
    m(x, y).backward()
    names = set()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} gets no gradient"
        if ".ssm." in n:
            names.add(n.split(".ssm.")[1])
    assert names == SSM_PARAMS


def changed_prefix(model, x: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of x and of x with tokens t+1.. replaced by random ones."""
    g = torch.Generator().manual_seed(seed)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, model.cfg.vocab_size, x2[:, t + 1:].shape, generator=g)
    x2[:, t + 1] = (x[:, t + 1] + 1) % model.cfg.vocab_size  # surely changed
    return model(x), model(x2)


@pytest.mark.parametrize("kw", [{}, {"ssm_layers": "all", "ssm_chunk": 4}, {"ssm_chunk": 1, "ssm_conv": 6}])
def test_causal(kw):
    cfg = tiny(**kw)
    m = randomized(cfg).eval()
    x, _ = batch(cfg, B=1, T=19)
    with torch.no_grad():
        for t in (0, 3, 4, 9, 17):
            base, out = changed_prefix(m, x, t, seed=t)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1]), t  # exactly: no rounding leak either
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


def test_chunk_length_does_not_change_the_model():
    cfg = tiny(ssm_layers="all")
    m = randomized(cfg).eval()
    x, _ = batch(cfg, B=2, T=23)
    with torch.no_grad():
        ref = m(x)
        for chunk in (1, 3, 7, 23, 64):
            for b in m.blocks:
                b.ssm.chunk = chunk
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_ssm_under_bf16_autocast():
    cfg = tiny()
    m = randomized(cfg)
    x, y = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert m.blocks[1].ssm.A_log.grad.dtype == torch.float32 and torch.isfinite(m.blocks[1].ssm.A_log.grad).all()
    assert abs(loss.item() - m(x, y).item()) < 0.15


def test_optimizer_split():
    m = GPT(tiny())
    groups = split_params(m)
    names = {id(p): n for n, p in m.named_parameters()}
    by_group = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    assert sum(len(ps) for ps in groups.values()) == len(names)  # each in exactly one group
    for i in (1, 3):
        pre = f"blocks.{i}.ssm."
        assert {pre + "in_proj.weight", pre + "bc_proj.weight", pre + "out_proj.weight"} <= by_group["matrix"]
        assert {pre + "conv", pre + "A_log", pre + "D", pre + "dt_bias"} <= by_group["scalar"]
    Muon(groups["matrix"])  # Muon accepts the matrix group (2-D only)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["1,,2", "x", "-1", "4", "1,4", "0;1", "1.5", ",1", "all,1"])
def test_malformed_ssm_layers_name_the_field(text):
    with pytest.raises(ValueError, match="ssm_layers"):
        tiny(ssm_layers=text)


def test_ssm_layer_lists():
    assert tiny(ssm_layers=" 3 , 1,1").layer_set("ssm_layers", 4) == [1, 3]
    assert tiny(ssm_layers="all").layer_set("ssm_layers", 4) == [0, 1, 2, 3]
    assert tiny(ssm_layers="").layer_set("ssm_layers", 4) == []


@given(st.text(alphabet="0123456789,- xal", max_size=8))
def test_any_ssm_layers_text_is_valid_or_a_named_error(text):
    try:
        cfg = tiny(ssm_layers=text)
    except ValueError as e:
        assert "ssm_layers" in str(e)
        return
    idx = cfg.layer_set("ssm_layers", 4)
    assert all(0 <= i < 4 for i in idx)
    with torch.device("meta"):
        m = GPT(cfg)
    assert [i for i, b in enumerate(m.blocks) if hasattr(b, "ssm")] == idx


@pytest.mark.parametrize("bad", [{"ssm_head_dim": 7}, {"ssm_head_dim": 64}, {"ssm_expand": 0.0},
                                 {"ssm_expand": 1.5, "ssm_head_dim": 32}])
def test_ssm_head_dim_must_divide_the_inner_width(bad):
    with pytest.raises(ValueError, match="ssm_head_dim"):
        tiny(**bad)
    tiny(ssm_layers="", **bad)  # without SSM layers the knobs are inert


def test_config_roundtrip():
    cfg = tiny(ssm_layers="0,2", ssm_state=4, ssm_head_dim=16, ssm_expand=1.5, ssm_conv=3, ssm_chunk=7)
    d = cfg.to_dict()
    assert isinstance(d["ssm_expand"], float) and GPTConfig.from_dict(d) == cfg
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == cfg


# --- compile ------------------------------------------------------------------------------------

def test_compile_fullgraph_training_matches_eager():
    """Dynamo captures forward and backward whole (fullgraph: a break raises). The aot_eager backend
    is the graph inductor would get (AOT autograd's forward/backward split included); inductor's own
    C++ codegen works here too but costs ~90 s on 2 cores for this model, past the suite's budget."""
    cfg = tiny(ssm_chunk=4)
    m = randomized(cfg).train()
    x, y = batch(cfg, T=10)  # 10 positions: chunk 4 pads
    grads, _ = assert_compiled_matches_eager(m, x, y)
    assert grads["blocks.1.ssm.A_log"].abs().sum() > 0


# --- artifact and `pgolf eval` ------------------------------------------------------------------

def test_ssm_hybrid_trains_exports_and_evaluates(tiny_data, sp1024, tmp_path, capsys):
    sets = ['ssm_layers="1"', "ssm_state=16", "ssm_head_dim=16", "ssm_chunk=16"]
    summary, ev, direct = train_export_and_eval(tiny_data, sp1024, tmp_path / "run", sets, capsys)
    check_trained_and_scored(summary, ev, direct)
    from pgolf_codec.container import read_artifact

    tensors = read_artifact(tmp_path / "run" / "model.pgolf").tensors
    assert {f"blocks.1.ssm.{n}" for n in SSM_PARAMS} <= set(tensors)
    assert not any(k.startswith("blocks.1.attn.") for k in tensors)
