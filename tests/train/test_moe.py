"""Routed mixture-of-experts MLP (`moe_experts`): a naive per-token reference with and without
capacity drops, the balancing loss, causality in eval and in training (capacity packing), the
optimizer split, config validation, QAT against the artifact, compile, artifact and `pgolf eval`."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf_train.model import GPT, MLP, GPTConfig, MoE
from pgolf_train.muon import Muon, split_params

from .arch_helpers import (assert_compiled_matches_eager, batch, check_trained_and_scored, randomized,
                           train_export_and_eval)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=16)
E = 4


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**TINY, "moe_experts": E, **kw})


U = torch.ones(32) / 32 ** 0.5  # a direction every test input leans along


def moe_layer(seed: int = 0, skew: float = 0.0, **kw) -> MoE:
    """A standalone MoE with random experts; ``skew`` > 0 points expert 0's router row along U, so
    that inputs from ``inputs`` prefer it (its logit rises by ~4·skew)."""
    torch.manual_seed(seed)
    moe = MoE(tiny(**kw))
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        moe.router[0] += skew * U
    return moe


def inputs(B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 32, generator=g) + 4 * U


def expert_out(mlp: MLP, v: torch.Tensor) -> torch.Tensor:
    h = mlp.fc.weight.double() @ v
    h = (F.leaky_relu(h, 0.5) if mlp.leaky else torch.relu(h)).square()
    return mlp.proj.weight.double() @ h


def naive_moe(moe: MoE, x: torch.Tensor, cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (flattened order), each token's choices in rank order: top-k of the router's
    softmax, gates renormalized over the k (top-1: the probability itself), each expert an MLP in float64. ``cap``: an expert takes
    its first ``cap`` requests and skips the rest (None: no limit). Returns (y, dropped [n, k])."""
    flat = x.reshape(-1, x.size(-1))
    probs = F.linear(flat.float(), moe.router.float()).softmax(-1)  # choices as the model makes them
    out = torch.zeros(flat.shape, dtype=torch.float64)
    dropped = torch.zeros(flat.size(0), moe.k, dtype=torch.bool)
    taken = [0] * len(moe.experts)
    for i, v in enumerate(flat.double()):
        gate, choice = probs[i].double().topk(moe.k)
        if moe.k > 1:  # top-1 keeps the router probability (Switch)
            gate = gate / gate.sum()
        for j, e in enumerate(choice.tolist()):
            if cap is not None and taken[e] >= cap:
                dropped[i, j] = True
            else:
                out[i] += gate[j] * expert_out(moe.experts[e], v)
            taken[e] += 1
    return out.view(x.shape), dropped


def naive_aux(moe: MoE, x: torch.Tensor) -> float:
    """Switch balancing loss E·Σ_e f_e·p_e: f the share of tokens whose first choice is e, p the mean probability."""
    probs = F.linear(x.reshape(-1, x.size(-1)).double(), moe.router.double()).softmax(-1)
    f = torch.bincount(probs.argmax(-1), minlength=len(moe.experts)).double() / probs.size(0)
    return float(len(moe.experts) * (f * probs.mean(0)).sum())


# --- shapes and gradients -----------------------------------------------------------------------

def test_shapes_and_parameter_count():
    cfg = tiny(mlp_mult=3)
    m = GPT(cfg)
    dense = GPT(dataclasses.replace(cfg, moe_experts=0))
    for b in m.blocks:
        assert isinstance(b.mlp, MoE) and len(b.mlp.experts) == E and b.mlp.k == 1
        assert tuple(b.mlp.router.shape) == (E, 32)
        for e in b.mlp.experts:
            assert tuple(e.fc.weight.shape) == (96, 32) and tuple(e.proj.weight.shape) == (32, 96)
            assert torch.all(e.proj.weight == 0)  # zero-init: every block starts as the identity
    assert m.num_params() == dense.num_params() + 2 * ((E - 1) * 2 * 96 * 32 + E * 32)
    x, _ = batch(cfg)
    assert m(x).shape == (2, 12, 64)
    moe = m.blocks[0].mlp
    v = torch.randn(3, 5, 32)
    assert moe(v).shape == v.shape and moe.eval()(v).shape == v.shape


@pytest.mark.parametrize("kw", [{}, {"moe_top_k": 2}, {"moe_top_k": 4, "activation": "leaky_relu2"}])
def test_every_parameter_gets_a_gradient(kw):
    cfg = tiny(**kw)
    torch.manual_seed(0)
    m = GPT(cfg)  # the real init
    x, y = batch(cfg, B=4, T=16)  # 64 tokens: every expert is chosen by some
    # Zero-init expert projections: at step 0 every expert's output is 0, so the expert fc weights
    # (and, through the gates, the router's task gradient) are exactly zero. One real optimizer
    # step moves the projections off zero; after it every parameter has a finite nonzero gradient.
    m(x, y).backward()
    assert all(torch.all(e.fc.weight.grad == 0) for e in m.blocks[0].mlp.experts)
    torch.optim.Adam(m.parameters(), lr=1e-2).step()
    m.zero_grad()
    m(x, y).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} gets no gradient"


@pytest.mark.parametrize("k", [1, 2])
def test_router_learns_from_the_task_loss(k):
    """The gates carry the task gradient to the router (no balancing term): top-1 through the router
    probability it scales by (a renormalized top-1 gate would be the constant 1), top-2 through the
    renormalized pair."""
    cfg = tiny(moe_top_k=k, moe_aux_weight=0.0)
    m = randomized(cfg)
    x, y = batch(cfg)
    m(x, y).backward()
    assert all(b.mlp.router.grad.abs().sum() > 0 for b in m.blocks)


# --- the reference: no drops in eval, capacity in training, top-k ---------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_eval_drops_nothing_and_equals_the_per_token_loop(k):
    moe = moe_layer(moe_top_k=k, skew=2.0).eval()  # skewed: most tokens want expert 0
    x = inputs()
    _, would_drop = naive_moe(moe, x, cap=math.ceil(1.25 * 32 * k / E))
    assert would_drop.any()  # training would drop some of these tokens; evaluation must not
    ref, dropped = naive_moe(moe, x, cap=None)
    assert not dropped.any()
    with torch.no_grad():
        y = moe(x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and a token's output is that token's alone: one at a time gives the same
    with torch.no_grad():
        one = torch.cat([moe(x[:, t:t + 1]) for t in range(16)], dim=1)
    torch.testing.assert_close(one, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k, capacity, cap, skew", [(1, 0.5, 4, 1.0), (2, 0.5, 8, 1.0), (2, 1.0, 16, 1.0),
                                                    (1, 0.01, 1, 1.0), (2, 0.75, 12, 0.0), (3, 0.5, 12, 0.0)])
def test_training_capacity_drops_tokens_in_token_order(k, capacity, cap, skew):
    """Slots go token by token, a token's choices together (not all first choices before any second:
    that would let a later token's first choice take an earlier token's second-choice slot)."""
    moe = moe_layer(moe_top_k=k, moe_capacity=capacity, skew=skew).train()
    x = inputs()  # 32 tokens: cap = ceil(capacity · 32 · k / E)
    assert max(1, min(32, math.ceil(capacity * 32 * k / E))) == cap
    ref, dropped = naive_moe(moe, x, cap=cap)
    assert dropped.any() and not dropped.all()
    with torch.no_grad():
        y = moe(x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    whole = dropped.all(-1).view(2, 16)  # every choice skipped: the expert contribution is 0
    if whole.any():
        assert torch.all(y[whole] == 0)
    assert torch.all(y[~whole].abs().sum(-1) > 0)


def test_top2_gates_are_renormalized():
    moe = moe_layer(moe_top_k=2).eval()
    x = inputs(1, 8)
    with torch.no_grad():
        y = moe(x)
        probs = F.linear(x[0], moe.router).softmax(-1)
        g, c = probs.topk(2, dim=-1)
        for i in range(8):
            a, b = (expert_out(moe.experts[e], x[0, i].double()) for e in c[i].tolist())
            want = (g[i, 0] * a + g[i, 1] * b) / (g[i, 0] + g[i, 1])
            torch.testing.assert_close(y[0, i].double(), want, rtol=1e-5, atol=1e-5)


# --- the balancing loss -------------------------------------------------------------------------

def test_aux_loss():
    moe = moe_layer().train()
    x = inputs()
    with torch.no_grad():
        moe.router.zero_()  # uniform routing: p_e = 1/E, so E·Σ f_e/E = 1
    aux: list = []
    moe(x, aux)
    assert len(aux) == 1 and aux[0].item() == pytest.approx(1.0, abs=1e-6)
    skewed = moe_layer(skew=3.0).train()
    aux = []
    with torch.no_grad():
        skewed(x, aux)
        want = naive_aux(skewed, x)
    assert aux[0].item() == pytest.approx(want, rel=1e-5)
    assert aux[0].item() > 1.5  # imbalance costs
    aux = []
    skewed.eval()(x, aux)
    assert aux == []  # evaluation has no balancing term


def test_training_loss_adds_the_weighted_mean_aux_loss():
    cfg = tiny(moe_top_k=2, moe_aux_weight=0.5, moe_capacity=4.0)  # capacity >= all tokens: no drops
    m = randomized(cfg).train()
    x, y = batch(cfg)
    seen = []
    for b in m.blocks:
        b.mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[1][-1]) if mod.training else None)
    with torch.no_grad():
        loss = m(x, y)
        assert len(seen) == len(m.blocks)
        mean_aux = torch.stack(seen).mean().item()
        m.cfg = dataclasses.replace(cfg, moe_aux_weight=0.0)
        plain = m(x, y)
        m.eval()
        assert m(x, y).item() == pytest.approx(plain.item(), abs=1e-6)  # eval: the plain CE
    assert loss.item() == pytest.approx(plain.item() + 0.5 * mean_aux, rel=1e-6)


# --- causality ----------------------------------------------------------------------------------

def prefix_changes(model: GPT, x: torch.Tensor, ts) -> list[int]:
    """The t for which replacing every token after t changed some logit at positions <= t (in any row)."""
    bad = []
    with torch.no_grad():
        base = model(x)
        for t in ts:
            g = torch.Generator().manual_seed(t)
            x2 = x.clone()
            x2[:, t + 1:] = torch.randint(0, model.cfg.vocab_size, x2[:, t + 1:].shape, generator=g)
            if not torch.allclose(model(x2)[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6):
                bad.append(t)
    return bad


def moe_inputs(model: GPT, x: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach())) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_causal(k, training, monkeypatch):
    cfg = tiny(moe_top_k=k, moe_capacity=0.5)
    m = randomized(cfg).train(training)
    x, _ = batch(cfg, B=1, T=20)
    cap = math.ceil(0.5 * 20 * k / E)
    drops = [naive_moe(b.mlp, h, cap)[1].any().item() for b, h in zip(m.blocks, moe_inputs(m, x))]
    assert all(drops)  # capacity really overflows in every layer (only training applies it)
    ts = range(0, 19, 2)
    assert prefix_changes(m, x, ts) == []
    # The check has teeth: the same packing run in reverse token order (a later token takes the
    # slot first) is caught in training, where slots are scarce; without drops it is still causal.
    forward = MoE.forward
    monkeypatch.setattr(MoE, "forward", lambda self, v, aux=None: forward(self, v.flip(-2), aux).flip(-2))
    assert (prefix_changes(m, x, ts) != []) == training


def test_training_packing_is_causal_in_flattened_order():
    """Slots go in flattened (row, position) order: a row's tokens never change an earlier row's outputs,
    nor positions <= t of their own row."""
    cfg = tiny(moe_top_k=2, moe_capacity=0.5)
    m = randomized(cfg, seed=3).train()
    x, _ = batch(cfg, B=3, T=10)
    with torch.no_grad():
        base = m(x)
        for row in range(3):
            for t in (0, 4, 8):
                x2 = x.clone()
                x2[row, t + 1:] = (x2[row, t + 1:] + 7) % cfg.vocab_size
                x2[row + 1:] = (x2[row + 1:] + 3) % cfg.vocab_size
                out = m(x2)
                torch.testing.assert_close(out[:row], base[:row], rtol=0, atol=1e-6)
                torch.testing.assert_close(out[row, :t + 1], base[row, :t + 1], rtol=0, atol=1e-6)


# --- optimizer split, config --------------------------------------------------------------------

def test_muon_gets_the_expert_matrices_and_adam_the_router():
    m = GPT(tiny(moe_top_k=2))
    groups = split_params(m)
    names = {id(p): n for n, p in m.named_parameters()}
    by_group = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    assert sum(len(ps) for ps in groups.values()) == len(names)
    experts = {n for n in names.values() if ".mlp.experts." in n}
    assert len(experts) == 2 * E * len(m.blocks) and experts <= by_group["matrix"]
    assert {f"blocks.{i}.mlp.router" for i in range(2)} <= by_group["scalar"]
    Muon(groups["matrix"])


@pytest.mark.parametrize("bad, match", [({"moe_top_k": 5}, "moe_top_k=5 exceeds moe_experts"),
                                        ({"moe_experts": 0, "moe_top_k": 2}, "moe_top_k=2 exceeds"),
                                        ({"moe_experts": -1}, "moe_experts"), ({"moe_experts": 257}, "moe_experts"),
                                        ({"moe_top_k": 0}, "moe_top_k"), ({"moe_capacity": -0.5}, "moe_capacity"),
                                        ({"moe_aux_weight": float("inf")}, "moe_aux_weight"),
                                        ({"moe_experts": 2.0}, "moe_experts must be int")])
def test_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_config_roundtrip():
    cfg = tiny(moe_top_k=3, moe_capacity=2, moe_aux_weight=0.1)
    d = cfg.to_dict()
    assert isinstance(d["moe_capacity"], float) and GPTConfig.from_dict(d) == cfg
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert tiny(moe_top_k=E).moe_top_k == E


# --- QAT ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int4:sdclip=3", "ternary"])
def test_qat_fake_quant_of_expert_weights_is_what_the_artifact_decodes(scheme, tmp_path):
    """The expert weights the MoE's QAT forward uses are, bit for bit, what the artifact decodes,
    and the QAT model's output equals the decoded model's (the batched expert path really uses
    the fake-quantized weights); the straight-through gradient reaches every expert."""
    from pgolf_codec.container import read_artifact, write_artifact
    from pgolf_codec.schemes import Recipe
    from pgolf_train.model import _weight
    from pgolf_train.qat import qat_modules, set_qat

    cfg = tiny(moe_top_k=2)
    m = randomized(cfg)
    recipe = Recipe.parse(f"*.weight={scheme};*=fp32")
    done = dict(set_qat(m, recipe, True))
    experts = {n for n in done if ".experts." in n}
    assert len(experts) == 2 * E * len(m.blocks) and not any("router" in n for n in done)
    trained = {name: _weight(mod).detach().clone() for name, mod in qat_modules(m)}
    state = {k: v.detach().float() for k, v in m.state_dict().items()}
    write_artifact(tmp_path / "a.pgolf", state, recipe)
    decoded = read_artifact(tmp_path / "a.pgolf").tensors
    for name in experts:
        assert torch.equal(decoded[name], trained[name]), name
    plain = copy.deepcopy(m)
    set_qat(plain, recipe, False)
    ref = copy.deepcopy(plain)
    ref.load_state_dict(decoded)
    x, y = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)
        assert not torch.allclose(m(x), plain(x), atol=1e-3)  # QAT really changed the forward
    m(x, y).backward()
    assert all(mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
               for name, mod in qat_modules(m) if name in experts)


# --- compile ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2])
def test_compile_fullgraph_training_matches_eager(k):
    """Training mode with overflowing capacity, forward and backward captured whole (fullgraph). The
    aot_eager backend is the graph inductor would get (AOT autograd's forward/backward split
    included); inductor's own C++ codegen works here too but costs ~50 s on 2 cores for this model."""
    cfg = tiny(moe_top_k=k, moe_capacity=0.5)
    m = randomized(cfg).train()
    x, y = batch(cfg)
    assert_compiled_matches_eager(m, x, y)


# --- artifact and `pgolf eval` ------------------------------------------------------------------

def test_moe_trains_exports_and_evaluates(tiny_data, sp1024, tmp_path, capsys):
    sets = ["moe_experts=4", "moe_top_k=2"]
    summary, ev, direct = train_export_and_eval(tiny_data, sp1024, tmp_path / "run", sets, capsys)
    check_trained_and_scored(summary, ev, direct)
    from pgolf_codec.container import read_artifact

    tensors = read_artifact(tmp_path / "run" / "model.pgolf").tensors
    assert {f"blocks.0.mlp.experts.{e}.{w}.weight" for e in range(4) for w in ("fc", "proj")} <= set(tensors)
    assert "blocks.1.mlp.router" in tensors and "blocks.0.mlp.fc.weight" not in tensors
