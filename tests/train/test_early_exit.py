"""Early-exit heads (`exit_layers`): the exit rule against a token-by-token decoder reference, causality
with some tokens exiting, the thresholds' limits, the training loss, normalization, config
validation, compile, artifact and `pgolf eval`."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from pgolf_train.model import GPT, GPTConfig, rms_norm
from pgolf_train.muon import split_params

from .arch_helpers import (assert_compiled_matches_eager, batch, check_trained_and_scored, randomized,
                           train_export_and_eval)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16)


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**TINY, "exit_layers": "1,2", **kw})


def scored(m: GPT, x: torch.Tensor, tau: float | None) -> tuple[torch.Tensor, list[int]]:
    """Eval logits under threshold ``tau`` and where this call's tokens left (exit_counts' increment)."""
    m.eval()
    m.exit_threshold = tau
    before = m.exit_counts.clone()
    with torch.no_grad():
        logits = m.logits(x)
    return logits, (m.exit_counts - before).tolist()


def mixed_tau(m: GPT, x: torch.Tensor) -> float:
    """The threshold on a grid that spreads x's tokens most evenly over the exits and the last layer
    (the largest smallest share); fails unless every one of them gets some."""
    best, tau = max((min(scored(m, x, float(t))[1]), -t) for t in np.arange(0.02, 0.6, 0.005))
    m.exit_counts.zero_()
    assert best > 0, "no threshold mixes the exits on this model"
    return float(-tau)


def exit_heads(m: GPT, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit head's logits over all tokens (the training forward returns them)."""
    m.train()
    with torch.no_grad():
        heads = m._run(x)[1]
    m.eval()
    return heads


def decoder_reference(m: GPT, idx: torch.Tensor, tau: float) -> tuple[torch.Tensor, float]:
    """The exit rule as a depth-skipping decoder computes it, one token at a time. Token t runs the
    virtual layers in order, each block applied to the prefix 0..t whose earlier states are already
    fixed (an exited token's state stays what it was at its exit: the layers above read that for
    their keys and values); at an exit layer, if the head's top probability reaches ``tau``, t
    leaves with those logits; a token that never exits gets the final head. Also returns the
    smallest |top probability - tau| of any decision (a tie would make the comparison meaningless)."""
    x0 = rms_norm(m.tok_emb(idx))
    cos, sin = m.rope(idx.size(1), idx.device)
    L, enc = len(m.layer_plan), m.num_encoder
    states = [[None] * idx.size(1) for _ in range(L)]
    out, margin = [], math.inf
    for t in range(idx.size(1)):
        done, logits = False, None
        for i, b in enumerate(m.layer_plan):
            prev = x0[:, :t + 1] if i == 0 else torch.stack(states[i - 1][:t + 1], 1)
            j = 2 * enc - 1 - i  # the encoder layer whose output the decoder layer i adds (last first)
            if i >= enc and 0 <= j:
                prev = prev + m.skip_weights[i - enc] * torch.stack(states[j][:t + 1], 1)
            if done:
                states[i][t] = states[i - 1][t]
                continue
            states[i][t] = m.blocks[b](prev, x0[:, :t + 1], cos[:t + 1], sin[:t + 1], m.softmax_scale)[:, t]
            if i in m.exits:
                head = m._head(rms_norm(states[i][t]) * m.exit_scales[m.exits.index(i)])
                top = head.softmax(-1).amax().item()
                margin = min(margin, abs(top - tau))
                if top >= tau:
                    done, logits = True, head
        out.append(logits if done else m._head(rms_norm(states[L - 1][t])))
    return torch.stack(out, 1), margin


# --- shapes and gradients -----------------------------------------------------------------------

def test_shapes():
    m = GPT(tiny())
    assert m.exits == [1, 2] and tuple(m.exit_scales.shape) == (2, 32) and torch.all(m.exit_scales == 1)
    assert m.exit_threshold is None and m.exit_counts.dtype == torch.long and m.exit_counts.tolist() == [0, 0, 0]
    assert m.num_params() == GPT(tiny(exit_layers="")).num_params() + 2 * 32
    assert GPT(tiny(exit_layers="")).exit_scales is None
    x, y = batch(tiny())
    assert m(x).shape == (2, 12, 64) and m(x, y).ndim == 0
    assert len(exit_heads(m, x)) == 2 and all(h.shape == (2, 12, 64) for h in exit_heads(m, x))
    assert any(p is m.exit_scales for p in split_params(m)["scalar"])  # Adam, with the other gains


def test_every_parameter_gets_a_gradient():
    cfg = tiny()
    torch.manual_seed(0)
    m = GPT(cfg).train()  # the real init
    x, y = batch(cfg)
    # Zero-init output projections: at step 0 the blocks are the identity and the weights feeding
    # those projections get exactly zero gradient. One real optimizer step moves them off zero;
    # after it every parameter, exit_scales included, has a finite nonzero gradient.
    m(x, y).backward()
    assert torch.all(m.blocks[0].attn.c_q.weight.grad == 0)
    torch.optim.Adam(m.parameters(), lr=1e-2).step()
    m.zero_grad()
    m(x, y).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} gets no gradient"
    assert torch.all(m.exit_scales.grad.abs().sum(-1) > 0)  # each head's row
    m.zero_grad()
    m.cfg = dataclasses.replace(cfg, exit_loss_weight=0.0)
    m(x, y).backward()
    assert torch.all(m.exit_scales.grad == 0)  # only the exit term trains the exit heads


def test_training_loss_includes_the_exit_term():
    cfg = tiny(exit_loss_weight=0.3)
    m = randomized(cfg).train()
    x, y = batch(cfg)
    with torch.no_grad():
        loss = m(x, y)
        heads = exit_heads(m, x)
        m.train()
        m.cfg = dataclasses.replace(cfg, exit_loss_weight=0.0)
        plain = m(x, y)
        m.eval()
        final = m(x, y)  # eval (no threshold): the last layer's CE alone
    ce = [F.cross_entropy(h.flatten(0, 1), y.flatten()).item() for h in heads]
    assert plain.item() == pytest.approx(final.item(), abs=1e-6)
    assert loss.item() == pytest.approx(plain.item() + 0.3 * sum(ce) / 2, rel=1e-6)
    assert m.exit_counts.tolist() == [0, 0, 0]  # training and tau=None tally nothing


# --- the exit rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"num_layers": 5, "exit_layers": "0,3"},
                                {"num_layers": 2, "loop_end": 2, "loop_times": 2, "exit_layers": "0,2"},
                                {"ssm_layers": "1", "ssm_state": 8, "ssm_head_dim": 8, "ssm_chunk": 4,
                                 "moe_experts": 3, "moe_top_k": 2}])
def test_exit_rule_equals_a_token_by_token_decoder(kw):
    cfg = tiny(**kw)
    m = randomized(cfg).eval()
    x, _ = batch(cfg, B=1, T=16)
    mixed = mixed_tau(m, x)  # every exit and the end get tokens
    for tau in (0.03, mixed, 0.3):
        logits, counts = scored(m, x, tau)
        with torch.no_grad():
            ref, margin = decoder_reference(m, x, tau)
        assert margin > 1e-5, f"tau={tau} ties a decision"
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        assert sum(counts) == 16
        if tau == mixed:
            assert min(counts) > 0


def test_tau_none_is_the_plain_final_head():
    cfg = tiny()
    m = randomized(cfg)
    plain = GPT(dataclasses.replace(cfg, exit_layers=""))
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "exit_scales"})
    x, y = batch(cfg)
    logits, counts = scored(m, x, None)
    with torch.no_grad():
        assert torch.equal(logits, plain.eval().logits(x))
        assert torch.equal(m.token_losses(x, y), plain.token_losses(x, y))
    assert counts == [0, 0, 0]


@pytest.mark.parametrize("tau", [1.5, 1.0 + 1e-6, 2.0])
def test_tau_above_one_exits_nothing(tau):
    m = randomized(tiny())
    x, _ = batch(tiny())
    logits, counts = scored(m, x, tau)
    assert counts == [0, 0, 24]
    assert torch.equal(logits, scored(m, x, None)[0])


@pytest.mark.parametrize("tau", [0.0, -1.0])
@pytest.mark.parametrize("layers", ["1,2", "0", "3", "2,0"])
def test_tau_at_most_zero_exits_everything_at_the_first_exit(tau, layers):
    m = randomized(tiny(exit_layers=layers))
    x, _ = batch(tiny())
    logits, counts = scored(m, x, tau)
    assert counts == [24] + [0] * len(m.exits)
    torch.testing.assert_close(logits, exit_heads(m, x)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(logits, scored(m, x, None)[0], atol=1e-3)


def test_exit_counts_tally_each_call():
    m = randomized(tiny())
    x, _ = batch(tiny())
    tau = mixed_tau(m, x)
    _, first = scored(m, x, tau)
    assert first[0] > 0 and first[1] > 0 and first[2] > 0 and sum(first) == 24  # every exit and the end
    scored(m, x, tau)
    assert m.exit_counts.tolist() == [2 * c for c in first]


def test_scored_distributions_are_normalized():
    m = randomized(tiny())
    x, y = batch(tiny())
    logits, counts = scored(m, x, mixed_tau(m, x))
    assert min(counts) > 0
    logp = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2, 12, dtype=torch.float64), rtol=0, atol=1e-12)
    assert logits.abs().max() <= m.cfg.logit_softcap
    with torch.no_grad():
        per_token = m.token_losses(x, y)
    assert torch.isfinite(per_token).all() and (per_token >= 0).all()
    torch.testing.assert_close(per_token.double(), -logp.gather(-1, y[..., None])[..., 0], rtol=1e-5, atol=1e-5)


# --- causality ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "loop_end": 2, "loop_times": 2, "exit_layers": "0,2"}])
def test_causal_with_some_tokens_exiting(kw):
    cfg = tiny(**kw)
    m = randomized(cfg)
    x, _ = batch(cfg, B=1, T=24)
    tau = mixed_tau(m, x)
    base, counts = scored(m, x, tau)
    assert min(counts) > 0
    for t in (0, 5, 11, 17, 22):
        g = torch.Generator().manual_seed(t)
        x2 = x.clone()
        x2[:, t + 1:] = torch.randint(0, cfg.vocab_size, x2[:, t + 1:].shape, generator=g)
        x2[:, t + 1] = (x[:, t + 1] + 1) % cfg.vocab_size
        out, counts = scored(m, x2, tau)
        assert 0 < counts[-1] < 24, counts  # some tokens exit, some do not, in this run too
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["1,,2", "x", "-1", "4", "0,4", "1;2", " , ", "all2", "1.0"])
def test_malformed_exit_layers_name_the_field(text):
    with pytest.raises(ValueError, match="exit_layers"):
        tiny(exit_layers=text)


def test_exit_layers_index_virtual_layers():
    loop = dict(num_layers=2, loop_end=2, loop_times=3)  # 6 virtual layers of 2 blocks
    assert tiny(**loop, exit_layers="5,2").layer_set("exit_layers", 6) == [2, 5]
    assert GPT(tiny(**loop, exit_layers="all")).exits == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="exit_layers: layer 6 is out of range"):
        tiny(**loop, exit_layers="6")
    with pytest.raises(ValueError, match="ssm_layers: layer 2 is out of range"):
        tiny(**loop, ssm_layers="2")  # SSM layers are physical blocks


@given(st.text(alphabet="0123456789,- xal", max_size=8))
def test_any_exit_layers_text_is_valid_or_a_named_error(text):
    try:
        cfg = tiny(exit_layers=text)
    except ValueError as e:
        assert "exit_layers" in str(e)
        return
    with torch.device("meta"):
        m = GPT(cfg)
    assert m.exits == cfg.layer_set("exit_layers", 4) and all(0 <= i < 4 for i in m.exits)
    assert (m.exit_scales is None) == (not m.exits)


def test_config_roundtrip():
    cfg = tiny(exit_layers="0,3", exit_loss_weight=1)
    d = cfg.to_dict()
    assert isinstance(d["exit_loss_weight"], float) and GPTConfig.from_dict(d) == cfg
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="exit_loss_weight"):
        tiny(exit_loss_weight=-0.1)
    with pytest.raises(ValueError, match="exit_layers must be str"):
        GPTConfig.from_dict({**d, "exit_layers": [0, 3]})


# --- compile ------------------------------------------------------------------------------------

def test_compile_fullgraph_training_matches_eager():
    """Training (every exit head's CE in the loss), forward and backward captured whole (fullgraph).
    The aot_eager backend is the graph inductor would get (AOT autograd's forward/backward split
    included); inductor's own C++ codegen works here too but costs ~30 s on 2 cores for this model."""
    cfg = tiny()
    m = randomized(cfg).train()
    x, y = batch(cfg)
    grads, _ = assert_compiled_matches_eager(m, x, y)
    assert grads["exit_scales"].abs().sum() > 0


# --- artifact and `pgolf eval` ------------------------------------------------------------------

def test_early_exit_model_trains_exports_and_evaluates(tiny_data, sp1024, tmp_path, capsys):
    sets = ['exit_layers="0"']
    summary, ev, direct = train_export_and_eval(tiny_data, sp1024, tmp_path / "run", sets, capsys)
    check_trained_and_scored(summary, ev, direct)  # `pgolf eval` (no threshold) scores the final head
    from pgolf_eval.loader import model_from_artifact

    model, art = model_from_artifact(tmp_path / "run" / "model.pgolf")
    assert "exit_scales" in art.tensors and model.exits == [0]
    x = torch.as_tensor(np.arange(65) % 1024)[None]
    _, counts = scored(model, x[:, :-1], 0.0)  # the decoded exit head is live
    assert counts == [64, 0]
    torch.testing.assert_close(scored(model, x[:, :-1], 0.0)[0], exit_heads(model, x[:, :-1])[0], rtol=0, atol=1e-6)
