"""Optimizer and export techniques as config switches: the Polar-Express table against its derivation,
the Muon weight-decay taper, the embedding's decay, and GPTQ of the tied embedding at int7."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from pgolf_train.build import build_model, build_optimizers
from pgolf_train.config import ConfigError, make_config
from pgolf_train.muon import POLAR_EXPRESS_COEFFS, Muon, ns_schedule
from pgolf_train.schedule import budget_fraction, lr_multiplier, muon_momentum, muon_wd_multiplier, set_schedule

from .train_fixtures import fit_on_shard

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, train_seq_len=16,
            train_batch_tokens=64, compile=False, device="cpu")


def _script():
    spec = importlib.util.spec_from_file_location("polar_express_coeffs",
                                                  REPO / "benchmarks" / "polar_express_coeffs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- Polar Express ------------------------------------------------------------------------------

def test_hard_coded_table_is_the_scripts_derivation() -> None:
    derived = _script().polar_express_coeffs(steps=len(POLAR_EXPRESS_COEFFS))
    assert len(derived) == len(POLAR_EXPRESS_COEFFS) == 8
    for got, want in zip(POLAR_EXPRESS_COEFFS, derived):
        for g, w in zip(got, want):
            assert abs(g - w) <= 1e-6 * max(1.0, abs(w)), (got, want)


def test_derivation_matches_the_paper_without_safety_factor() -> None:
    """With the safety factor off, the first quintic is the paper's published one (its appendix
    prints (8.28721201814563, -23.595886519098837, 17.300387312530933) for l = 1e-3)."""
    a, b, c = _script().polar_express_coeffs(steps=1, safety=1.0)[0]
    for got, want in zip((a, b, c), (8.28721201814563, -23.595886519098837, 17.300387312530933)):
        assert abs(got - want) < 1e-9
    # and the collapsed interval's limit is the Taylor quintic (15/8, -10/8, 3/8)
    last = _script().polar_express_coeffs(steps=9, safety=1.0)[-1]
    assert all(abs(g - w) < 1e-8 for g, w in zip(last, (15 / 8, -10 / 8, 3 / 8)))


@pytest.mark.parametrize("l,u", [(1e-3, 1.0), (0.024, 1.0), (0.13, 1.87), (0.86, 1.14)])
def test_minimax_quintic_equioscillates(l: float, u: float) -> None:
    """The Remez result's error never exceeds E on [l, u] and reaches ±E at 4 alternating points,
    so no odd quintic does better (Chebyshev's equioscillation theorem)."""
    pe = _script()
    a, b, c, E = pe.minimax_quintic(l, u)
    xs = [l + (u - l) * i / 20000 for i in range(20001)]
    err = [1 - pe.quintic((a, b, c), x) for x in xs]
    assert max(abs(e) for e in err) <= E * (1 + 1e-9)
    assert abs(err[0] - E) < 1e-12 and abs(err[-1] + E) < 1e-12  # +E at l, -E at u
    disc = math.sqrt(9 * b * b - 20 * a * c)
    inner = sorted(math.sqrt((-3 * b + s * disc) / (10 * c)) for s in (-1, 1))
    assert abs(1 - pe.quintic((a, b, c), inner[0]) + E) < 1e-12  # -E
    assert abs(1 - pe.quintic((a, b, c), inner[1]) - E) < 1e-12  # +E


def test_ns_schedule() -> None:
    assert ns_schedule("quintic", 3) == ((3.4445, -4.7750, 2.0315),) * 3
    assert ns_schedule("polar_express", 5) == POLAR_EXPRESS_COEFFS[:5]
    long = ns_schedule("polar_express", 11)
    assert long[:8] == POLAR_EXPRESS_COEFFS and long[8:] == (POLAR_EXPRESS_COEFFS[-1],) * 3
    assert all(isinstance(x, float) for abc in long for x in abc)  # Python floats: no tensors on the hot path


def test_config_switches_reach_muon() -> None:
    cfg = make_config(TINY)
    assert (cfg.muon_ns_coeffs, cfg.muon_wd_schedule) == ("quintic", "constant")
    _, muon = build_optimizers(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    assert muon.param_groups[0]["ns_coeffs"] == "quintic" and muon.param_groups[0]["base_weight_decay"] == 0.0
    cfg = make_config({**TINY, "muon_ns_coeffs": "polar_express", "muon_weight_decay": 0.04})
    _, muon = build_optimizers(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    assert muon.param_groups[0]["ns_coeffs"] == "polar_express"
    assert muon.param_groups[0]["base_weight_decay"] == 0.04
    for key, bad in (("muon_ns_coeffs", "cubic"), ("muon_wd_schedule", "cosine")):
        with pytest.raises(ConfigError, match=key):
            make_config({**TINY, key: bad})


# ---- Muon weight-decay taper ---------------------------------------------------------------------

def test_wd_multiplier_by_schedule() -> None:
    base = {**TINY, "max_wallclock_seconds": 0.0, "iterations": 100, "warmdown_iters": 50}
    for sched, step, want in (("constant", 80, 1.0), ("lr", 10, 1.0), ("lr", 80, 0.4), ("lr", 100, 0.0),
                              ("linear_to_zero", 0, 1.0), ("linear_to_zero", 80, 0.2), ("linear_to_zero", 100, 0.0)):
        cfg = make_config({**base, "muon_wd_schedule": sched})
        mul = lr_multiplier(cfg, step, 0.0)
        assert muon_wd_multiplier(cfg, mul, budget_fraction(cfg, step, 0.0)) == pytest.approx(want, abs=1e-12)
    # by the clock when there is a budget: 45 s of 60 s done, warm-down over the last half
    cfg = make_config({**TINY, "max_wallclock_seconds": 60.0, "warmdown_frac": 0.5, "muon_wd_schedule": "lr"})
    mul = lr_multiplier(cfg, 500, 45_000.0)
    assert mul == pytest.approx(0.5) and muon_wd_multiplier(cfg, mul, budget_fraction(cfg, 500, 45_000.0)) == mul
    cfg = make_config({**TINY, "max_wallclock_seconds": 60.0, "muon_wd_schedule": "linear_to_zero"})
    assert muon_wd_multiplier(cfg, 1.0, budget_fraction(cfg, 500, 45_000.0)) == pytest.approx(0.25)


@pytest.mark.parametrize("sched", ["constant", "lr", "linear_to_zero"])
def test_applied_decay_at_a_warmdown_step(sched: str) -> None:
    """With a zero gradient only the decay acts: p ← p·(1 − lr·wd·m), lr = matrix_lr·mult the
    scheduled LR and m the schedule's wd multiplier (1, mult, 1 − progress)."""
    wd, step = 0.5, 80
    cfg = make_config({**TINY, "max_wallclock_seconds": 0.0, "iterations": 100, "warmdown_iters": 50,
                       "muon_weight_decay": wd, "muon_wd_schedule": sched})
    model = build_model(cfg, torch.device("cpu"))
    optimizers, muon = build_optimizers(cfg, model, torch.device("cpu"))
    mult = lr_multiplier(cfg, step, 0.0)
    assert mult == pytest.approx(0.4)
    m = muon_wd_multiplier(cfg, mult, budget_fraction(cfg, step, 0.0))
    assert m == pytest.approx({"constant": 1.0, "lr": mult, "linear_to_zero": 0.2}[sched])
    set_schedule(optimizers, muon, mult, muon_momentum(cfg, step), m)
    params = muon.param_groups[0]["params"]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    muon.step()
    lr = cfg.matrix_lr * mult
    factor = 1 - lr * (wd * m)
    for p, p0 in zip(params, before):
        torch.testing.assert_close(p.detach(), p0 * factor, rtol=0, atol=0)
    if sched == "lr":
        assert factor == pytest.approx(1 - cfg.matrix_lr * wd * mult ** 2)


def test_constant_wd_schedule_is_the_old_training_path() -> None:
    """Default schedule: steps driven through the new wd argument equal the old 4-argument
    set_schedule (which never touched weight_decay), bit for bit."""
    def run(new: bool) -> dict[str, torch.Tensor]:
        cfg = make_config({**TINY, "max_wallclock_seconds": 0.0, "iterations": 6, "warmdown_iters": 4,
                           "muon_weight_decay": 0.3})
        model = build_model(cfg, torch.device("cpu"))
        optimizers, muon = build_optimizers(cfg, model, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        for step in range(cfg.iterations):
            mul = lr_multiplier(cfg, step, 0.0)
            if new:
                set_schedule(optimizers, muon, mul, muon_momentum(cfg, step),
                             muon_wd_multiplier(cfg, mul, budget_fraction(cfg, step, 0.0)))
            else:
                set_schedule(optimizers, muon, mul, muon_momentum(cfg, step))
            x = torch.randint(0, 64, (4, 17), generator=g)
            model(x[:, :-1], x[:, 1:]).backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    new, old = run(True), run(False)
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_set_schedule_leaves_a_plain_muon_alone() -> None:
    """A Muon built without base_weight_decay (tests, benchmarks) keeps its weight_decay."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    muon = Muon([p], weight_decay=0.2)
    muon.param_groups[0]["base_lr"] = 0.04
    set_schedule([muon], muon, 0.5, 0.9, wd_mul=0.0)
    assert muon.param_groups[0]["weight_decay"] == 0.2 and muon.param_groups[0]["lr"] == 0.02


# ---- the embedding's weight decay (AdamW) ----------------------------------------------------------

@pytest.mark.parametrize("sched", ["constant", "lr"])
def test_embedding_decay_is_decoupled_scheduled_and_only_on_the_embedding(sched: str) -> None:
    """embed_weight_decay: with zero gradients only the decay acts, tok_emb ← tok_emb·(1 − lr·wd·m)
    with lr = tied_embed_lr·mult and m the schedule's multiplier (as Muon's); the scalars, under the
    same Adam, do not move."""
    wd, step = 0.5, 80
    cfg = make_config({**TINY, "max_wallclock_seconds": 0.0, "iterations": 100, "warmdown_iters": 50,
                       "embed_weight_decay": wd, "muon_wd_schedule": sched})
    model = build_model(cfg, torch.device("cpu"))
    optimizers, muon = build_optimizers(cfg, model, torch.device("cpu"))
    adam = optimizers[0]
    assert type(adam) is torch.optim.AdamW and [g["weight_decay"] for g in adam.param_groups][1:] == [0.0] * (
        len(adam.param_groups) - 1)
    mult = lr_multiplier(cfg, step, 0.0)
    m = muon_wd_multiplier(cfg, mult, budget_fraction(cfg, step, 0.0))
    set_schedule(optimizers, muon, mult, muon_momentum(cfg, step), m)
    params = [p for g in adam.param_groups for p in g["params"]]
    before = {id(p): p.detach().clone() for p in params}
    for p in params:
        p.grad = torch.zeros_like(p)
    adam.step()
    factor = 1 - cfg.tied_embed_lr * mult * wd * m
    torch.testing.assert_close(model.tok_emb.weight.detach(), before[id(model.tok_emb.weight)] * factor,
                               rtol=1e-6, atol=0)
    assert not torch.equal(model.tok_emb.weight.detach(), before[id(model.tok_emb.weight)])
    for p in adam.param_groups[1]["params"]:
        assert torch.equal(p.detach(), before[id(p)])


def test_without_embedding_decay_the_optimizer_is_the_baselines() -> None:
    cfg = make_config(TINY)
    optimizers, _ = build_optimizers(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    assert type(optimizers[0]) is torch.optim.Adam
    assert all("base_weight_decay" not in g for g in optimizers[0].param_groups)
    with pytest.raises(ConfigError, match="embed_weight_decay"):
        make_config({**TINY, "embed_weight_decay": -0.1})


# ---- GPTQ of the tied embedding at int7 ----------------------------------------------------------

def test_gptq_int7_tied_embedding_beats_round_to_nearest(tiny_data: Path) -> None:
    """The calibration collects tok_emb.weight's Hessian from its use as the tied output head (the
    final normed hidden states); GPTQ at int7 with it gives a lower held-out head-output error
    (Hessian error on validation states) and a lower full-model logit error than round-to-nearest
    int7 with the same scales, for the recipe's percentile clip and for plain max scaling."""
    from pgolf_codec.gptq import gptq_quantize, hessian_error
    from pgolf_codec.schemes import QuantSpec, dequantize, quantize
    from pgolf_train.calibrate import collect_hessians, shard_batches
    from pgolf_train.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, seq_len=64))
    fit_on_shard(model, tiny_data, steps=20)
    cal = collect_hessians(model, shard_batches(tiny_data, seq_len=64, batch_size=8, vocab_size=1024), max_tokens=4096)
    held = collect_hessians(model, shard_batches(tiny_data, seq_len=64, batch_size=8, split="val", vocab_size=1024),
                            max_tokens=4096)
    assert cal.hessians["tok_emb.weight"].shape == (64, 64)
    w = model.tok_emb.weight.detach().clone()
    val = next(shard_batches(tiny_data, seq_len=64, batch_size=8, split="val", vocab_size=1024))
    with torch.no_grad():
        ref = model.logits(val)

    def logit_mse(w_hat: torch.Tensor) -> float:
        with torch.no_grad():
            model.tok_emb.weight.copy_(w_hat)
            out = float((model.logits(val) - ref).square().mean())
            model.tok_emb.weight.copy_(w)
        return out

    for text in ("int7:percentile=99.99984", "int7"):
        spec = QuantSpec.parse(text)
        q_gptq = gptq_quantize(w, cal.hessians["tok_emb.weight"], spec)
        q_rtn = quantize(w, spec)
        assert torch.equal(q_gptq.scales, q_rtn.scales)  # same format and scales: only the rounding differs
        w_gptq, w_rtn = dequantize(q_gptq), dequantize(q_rtn)
        h_gptq = hessian_error(w, w_gptq, held.hessians["tok_emb.weight"])
        h_rtn = hessian_error(w, w_rtn, held.hessians["tok_emb.weight"])
        assert h_gptq < 0.5 * h_rtn, (text, h_gptq, h_rtn)
        assert logit_mse(w_gptq) < 0.7 * logit_mse(w_rtn), text  # the input-embedding use included
