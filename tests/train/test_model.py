"""The GPT model: baseline size, every switch, causality, compile, config validation, RoPE scaling."""
from __future__ import annotations

import ast
import lzma
import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pgolf_train.model as model_mod
from pgolf_train.model import GPT, CastedEmbedding, CastedLinear, GPTConfig, apply_rope

from .arch_helpers import batch, randomized

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16)


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**TINY, **kw})


def block_params(cfg: GPTConfig) -> int:
    d, hd = cfg.model_dim, cfg.model_dim // cfg.num_heads
    hidden = int(cfg.mlp_mult * d)
    return 2 * d * d + 2 * cfg.num_kv_heads * hd * d + 2 * hidden * d + 4 * d + cfg.num_heads


def test_baseline_is_the_challenge_model() -> None:
    cfg = GPTConfig()
    m = GPT(cfg)
    assert m.num_params() == 17_059_912
    assert m.num_params() == 9 * block_params(cfg) + 4 * 512 + 1024 * 512
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["blocks.0.attn.c_k.weight"] == (256, 512) and shapes["blocks.8.mlp.fc.weight"] == (1024, 512)
    assert shapes["skip_weights"] == (4, 512) and "lm_head.weight" not in shapes
    b = m.blocks[3]
    assert torch.all(b.attn.proj.weight == 0) and torch.all(b.mlp.proj.weight == 0)
    assert torch.equal(b.resid_mix, torch.stack((torch.ones(512), torch.zeros(512))))
    assert torch.all(b.attn.q_gain == 1.5) and torch.all(m.skip_weights == 1)
    assert abs(m.tok_emb.weight.std().item() - 0.005) < 2e-4
    assert all(m.qat is None for m in m.modules() if isinstance(m, (CastedLinear, CastedEmbedding)))


# name -> (overrides, expected parameter count as a function of the tiny baseline's pieces)
V, D, L = TINY["vocab_size"], TINY["model_dim"], TINY["num_layers"]
SWITCHES = {
    "baseline": ({}, lambda blk: L * blk + 2 * D + V * D),
    "mlp3": ({"mlp_mult": 3}, lambda blk: L * (blk + 2 * D * D) + 2 * D + V * D),
    "mlp_frac": ({"mlp_mult": 2.5}, lambda blk: L * (blk + D * D) + 2 * D + V * D),
    "leaky": ({"activation": "leaky_relu2"}, lambda blk: L * blk + 2 * D + V * D),
    "mha": ({"num_kv_heads": 4}, lambda blk: L * (blk + 2 * 16 * D) + 2 * D + V * D),
    "factorized": ({"embed_dim": 8}, lambda blk: L * blk + 2 * D + V * 8 + 8 * D),
    "untied": ({"tie_embeddings": False}, lambda blk: L * blk + 2 * D + 2 * V * D),
    "untied_factorized": ({"tie_embeddings": False, "embed_dim": 8}, lambda blk: L * blk + 2 * D + 2 * V * 8 + 8 * D),
    # 2 physical blocks looped 3 times = 6 virtual layers (3 skip weights)
    "recur_all": ({"num_layers": 2, "loop_end": 2, "loop_times": 3}, lambda blk: 2 * blk + 3 * D + V * D),
    # blocks 1,2 repeated twice: plan [0,1,2,1,2,3] = 6 virtual layers
    "recur_span": ({"loop_start": 1, "loop_end": 3, "loop_times": 2}, lambda blk: L * blk + 3 * D + V * D),
    "parallel": ({"parallel_residual": True}, lambda blk: L * blk + 2 * D + V * D),
    "partial_rope": ({"rope_dims": 4}, lambda blk: L * blk + 2 * D + V * D),
    "ntk": ({"rope_scaling": "ntk", "rope_factor": 4.0}, lambda blk: L * blk + 2 * D + V * D),
    "yarn": ({"rope_scaling": "yarn", "rope_factor": 4.0}, lambda blk: L * blk + 2 * D + V * D),
    "odd_layers": ({"num_layers": 5}, lambda blk: 5 * blk + 2 * D + V * D),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_builds_trains_and_counts(name: str) -> None:
    overrides, expected = SWITCHES[name]
    cfg = tiny(**overrides)
    m = randomized(cfg)
    assert m.num_params() == expected(block_params(tiny()))
    x, y = batch(cfg)
    loss = m(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} gets no gradient"
    logits = m(x)
    assert logits.shape == (2, 12, V) and logits.dtype == torch.float32
    assert logits.abs().max() <= cfg.logit_softcap


def test_recurrence_plans_and_saves_parameters() -> None:
    assert tiny(loop_start=1, loop_end=3, loop_times=2).layer_plan() == [0, 1, 2, 1, 2, 3]
    full = GPTConfig()
    recur = GPTConfig(num_layers=3, loop_end=3, loop_times=3)
    assert recur.layer_plan() == [0, 1, 2] * 3
    with torch.device("meta"):  # shapes only: no memory, no init cost
        n_full, n_recur, n_fact = (GPT(c).num_params() for c in (full, recur, GPTConfig(embed_dim=128)))
    assert n_recur == n_full - 6 * block_params(full)
    assert n_full - n_fact == 1024 * 512 - (1024 * 128 + 128 * 512)


def test_recurrence_reuses_blocks() -> None:
    """A looped block's weights are the same tensors at every pass: its gradient accumulates them."""
    cfg = tiny(num_layers=1, loop_end=1, loop_times=3)
    m = randomized(cfg)
    x, _ = batch(cfg)
    hits = []
    m.blocks[0].register_forward_hook(lambda mod, inp, out: hits.append(1))
    m(x)
    assert len(hits) == 3 and len(m.blocks) == 1


def test_token_losses_match_forward() -> None:
    for cfg in (tiny(), tiny(tie_embeddings=False, embed_dim=8)):
        m = randomized(cfg)
        x, y = batch(cfg)
        per_token = m.token_losses(x, y)
        assert per_token.shape == y.shape and per_token.dtype == torch.float32
        torch.testing.assert_close(per_token.mean(), m(x, y), rtol=1e-6, atol=1e-6)
        # and they are the real cross-entropies of the returned logits
        logp = torch.log_softmax(m(x), dim=-1)
        torch.testing.assert_close(per_token, -logp.gather(-1, y[..., None])[..., 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"parallel_residual": True}, {"num_layers": 2, "loop_end": 2, "loop_times": 2},
                                       {"rope_dims": 4, "rope_scaling": "yarn", "rope_factor": 2.0}])
def test_causal(overrides: dict) -> None:
    cfg = tiny(**overrides)
    m = randomized(cfg)
    x, _ = batch(cfg, B=1, T=12)
    base = m(x)
    for t in (0, 5, 11):
        x2 = x.clone()
        x2[0, t] = (x2[0, t] + 1) % cfg.vocab_size
        out = m(x2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_autocast_bf16() -> None:
    cfg = tiny(embed_dim=8, rope_dims=4)
    m = randomized(cfg)
    x, y = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, y)
        logits = m(x)
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    loss.backward()
    assert m.blocks[0].attn.c_q.weight.grad.dtype == torch.float32
    assert abs(loss.item() - m(x, y).item()) < 0.1


def test_compile_fullgraph() -> None:
    """Dynamo captures forward and backward as one graph each (fullgraph: any break raises). The
    aot_eager backend traces exactly what inductor would receive, minus the minute of C++ codegen."""
    cfg = tiny(num_layers=3, parallel_residual=True)
    m = randomized(cfg)
    x, y = batch(cfg)
    compiled = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, m(x, y), rtol=1e-4, atol=1e-4)
    assert m.blocks[0].attn.c_q.weight.grad is not None


def test_rope_scaling_is_identity_at_factor_one() -> None:
    cfg = tiny(rope_dims=4)
    m = randomized(cfg)
    x, _ = batch(cfg)
    base = m(x)
    for kind in ("none", "ntk", "yarn"):
        m.set_rope_scaling(kind, 1.0)
        assert m.softmax_scale is None
        torch.testing.assert_close(m(x), base, rtol=0, atol=1e-5)
    m.set_rope_scaling("yarn", 4.0)
    assert not torch.allclose(m(x), base, atol=1e-3)
    with pytest.raises(ValueError, match="rope_scaling"):
        m.set_rope_scaling("linear", 2.0)
    with pytest.raises(ValueError, match="rope_factor"):
        m.set_rope_scaling("ntk", 0.5)


def _angles(m: GPT) -> torch.Tensor:
    cos, sin = m.rope(2, torch.device("cpu"))
    return torch.atan2(sin[1], cos[1]).double()  # position 1: the per-pair frequency itself


def test_rope_scaling_frequencies() -> None:
    cfg = tiny(seq_len=64)  # head_dim 8: frequencies 1, 0.1, 0.01, 0.001
    m = GPT(cfg)
    plain = _angles(m)
    torch.testing.assert_close(plain, 10000.0 ** (-torch.arange(0, 8, 2).double() / 8), rtol=1e-6, atol=0)
    m.set_rope_scaling("ntk", 4.0)
    ntk = _angles(m)  # NTK: the highest frequency stays, the lowest is slowed by exactly the factor
    assert ntk[0] == plain[0]
    torch.testing.assert_close(ntk[-1], plain[-1] / 4, rtol=1e-5, atol=0)
    m.set_rope_scaling("yarn", 4.0)
    yarn = _angles(m)
    # 64 positions: frequency 1 turns ~10 times (ramp 0.3), 0.001 never (fully interpolated)
    keep = (64 * plain / (2 * math.pi) - 1) / 31
    torch.testing.assert_close(yarn, plain * (keep.clamp(0, 1) + (1 - keep.clamp(0, 1)) / 4), rtol=1e-5, atol=0)
    torch.testing.assert_close(yarn[-1], plain[-1] / 4, rtol=1e-5, atol=0)
    assert m.softmax_scale == pytest.approx((0.1 * math.log(4) + 1) ** 2 / math.sqrt(8))


def test_partial_rope_leaves_tail_untouched() -> None:
    x = torch.randn(1, 2, 5, 8)
    ang = torch.rand(5, 2)
    out = apply_rope(x, ang.cos(), ang.sin())
    assert torch.equal(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations preserve length
    assert not torch.allclose(out[..., :4], x[..., :4])


def test_qat_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """With qat set, every CastedLinear and the embedding run through fake_quant_ste (also the tied head)."""
    calls = []

    def fake_quant_ste(w: torch.Tensor, spec: float) -> torch.Tensor:
        calls.append(tuple(w.shape))
        q = torch.round(w / spec) * spec
        return w + (q - w).detach()

    monkeypatch.setattr(model_mod, "fake_quant_ste", fake_quant_ste)
    cfg = tiny(num_layers=1, embed_dim=8)
    m = randomized(cfg)
    x, y = batch(cfg)
    ref = m(x, y)
    hooked = [mod for mod in m.modules() if isinstance(mod, (CastedLinear, CastedEmbedding))]
    for mod in hooked:
        mod.qat = 0.25
    loss = m(x, y)
    assert loss.item() != pytest.approx(ref.item())
    # embedding in and out, embed_proj in and out, 6 block matrices
    assert sorted(calls) == sorted([(V, 8)] * 2 + [(D, 8)] * 2 + [tuple(mod.weight.shape) for mod in hooked[2:]])
    loss.backward()
    assert all(mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0 for mod in hooked)


def test_qat_without_codec_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod, "fake_quant_ste", None)
    m = GPT(tiny())
    m.blocks[0].attn.c_q.qat = "int6"
    with pytest.raises(RuntimeError, match="fake_quant_ste"):
        m(batch(tiny())[0])


def test_config_roundtrip() -> None:
    cfg = tiny(embed_dim=8, loop_start=1, loop_end=2, loop_times=2, activation="leaky_relu2", mlp_mult=3)
    d = cfg.to_dict()
    assert isinstance(d["mlp_mult"], float) and GPTConfig.from_dict(d) == cfg
    assert GPTConfig.from_dict({}) == GPTConfig()


@pytest.mark.parametrize("bad, match", [
    ({"n_layer": 3, "dropout": 0.1}, "unknown GPTConfig keys: dropout, n_layer"),
    ({"num_layers": "9"}, "num_layers must be int"),
    ({"num_layers": True}, "num_layers must be int"),
    ({"num_layers": 9.0}, "num_layers must be int"),
    ({"tie_embeddings": 1}, "tie_embeddings must be bool"),
    ({"rope_base": float("nan")}, "rope_base must be float"),
    ({"logit_softcap": 0.0}, "logit_softcap"),
    ({"num_layers": 0}, "num_layers"),
    ({"activation": "gelu"}, "activation='gelu' is not in"),
    ({"rope_scaling": "__import__('os')"}, "rope_scaling=.* is not in"),
    ({"num_heads": 6}, "num_heads=6 must divide model_dim=512"),
    ({"num_kv_heads": 3}, "num_kv_heads=3 must divide num_heads=8"),
    ({"rope_dims": 5}, "rope_dims"),
    ({"rope_dims": 128}, "rope_dims"),
    ({"mlp_mult": 0.001}, "empty MLP"),
    ({"loop_end": 10}, "loop_end"),
    ({"loop_times": 3}, "loop_times > 1 needs"),
    ({"model_dim": 16384, "num_heads": 128, "num_kv_heads": 128, "num_layers": 256}, "parameters"),
    ({"vocab_size": 1 << 40}, "vocab_size"),
])
def test_config_rejects(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTConfig.from_dict(bad)


FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]
JUNK = st.one_of(st.integers(0, 64), st.integers(-2, 2**40), st.floats(allow_nan=True), st.booleans(), st.none(),
                 st.sampled_from(["relu2", "yarn", "ntk", "", "9"]), st.lists(st.integers(), max_size=2))


@given(st.dictionaries(st.sampled_from(FIELDS + ["bogus"]), JUNK, max_size=6))
def test_config_from_untrusted_dict_never_crashes(d: dict) -> None:
    """Any dict gives a valid config or a ValueError, and a valid one builds without real memory."""
    try:
        cfg = GPTConfig.from_dict(d)
    except ValueError:
        return
    with torch.device("meta"):
        assert GPT(cfg).num_params() < 1 << 30


def test_config_rejects_non_dict() -> None:
    with pytest.raises(ValueError, match="must be a dict"):
        GPTConfig.from_dict([("num_layers", 3)])
    with pytest.raises(ValueError):  # dataclasses.replace re-validates too
        dataclasses.replace(GPTConfig(), num_heads=7)


def test_model_file_is_lean_and_self_contained(tmp_path) -> None:
    src = open(model_mod.__file__, encoding="utf-8").read()
    # It counts toward the 16 MB artifact, compressed (LZMA2, as the code section stores it): 4.9 KB
    # for the baseline with its switches, 8.9 KB since the SSM, MoE and early-exit blocks, 10,898 bytes
    # since the field's techniques (XSA, SmearGate, BigramHash, output gates, LN scale, gated skips, doc masking),
    # 11,118 with the rotary cache and the fused-loss hook, 11,253 with the trainer's qkv switch.
    assert len(lzma.compress(src.encode(), format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])) < 11_300
    roots = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert roots <= {"__future__", "dataclasses", "math", "torch", "pgolf_codec"}
    # The artifact's copy must run where pgolf is absent: block pgolf_codec and exec the source alone.
    (tmp_path / "m.py").write_text(src)
    code = ("import sys, importlib.util, torch; sys.modules['pgolf_codec'] = None; "
            f"spec = importlib.util.spec_from_file_location('gpt', {str(tmp_path / 'm.py')!r}); "
            "g = importlib.util.module_from_spec(spec); sys.modules['gpt'] = g; spec.loader.exec_module(g); "
            "m = g.GPT(g.GPTConfig(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1)); "
            "print(m(torch.zeros(1, 4, dtype=torch.long)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 4, 32])" in out.stdout
