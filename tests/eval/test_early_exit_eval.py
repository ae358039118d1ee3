"""`pgolf eval --early-exit TAU`: the exit rule's bpb, where the positions left, refusals; and the TTT
guard against LoRA targets whose forward never runs (MoE experts)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pgolf.cli import main
from pgolf_eval.evaluate import evaluate_tokens, per_target_bytes
from pgolf_eval.ttt import TTTConfig, select_targets
from pgolf_train.model import GPT, GPTConfig
from pgolf_train.tokenizer import byte_tables

from .conftest import pack

TAU = 0.3  # on exit_model(): some positions leave at each exit head, some reach the end


def exit_model(seed: int = 0, **kw) -> GPT:
    """4 layers, exit heads after virtual layers 1 and 2; random weights, exit gains large enough
    that the heads are sometimes confident."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=1024, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=16)
    model = GPT(GPTConfig(**{**cfg, "exit_layers": "1,2", **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        if model.exit_scales is not None:
            model.exit_scales.fill_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def exit_artifact(tmp_path_factory, sp1024):
    return pack(tmp_path_factory.mktemp("exit") / "exit.pgolf", exit_model(), sp1024)


def run_eval(capsys, *args: str) -> tuple[int, dict | None, str]:
    rc = main(["eval", *args, "--json"])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


def direct(model: GPT, tokens: np.ndarray, tau: float | None, sp1024, seq_len: int = 16):
    """bpb of non-overlapping windows of ``seq_len``, in one batch as `pgolf eval` forms it (the last,
    shorter window right-padded), with ``model.exit_threshold = tau``; and ``exit_counts``."""
    n = len(tokens) - 1
    width = -(-n // seq_len) * seq_len
    x = np.zeros(width, np.int64)
    y = np.zeros(width, np.int64)
    x[:n], y[:n] = tokens[:-1], tokens[1:]
    model.exit_threshold = tau
    model.exit_counts.zero_()
    try:
        with torch.inference_mode():
            losses = model.token_losses(torch.from_numpy(x).view(-1, seq_len), torch.from_numpy(y).view(-1, seq_len))
    finally:
        model.exit_threshold = None
    nats = losses.flatten()[:n].double().sum().item()
    n_bytes = int(per_target_bytes(tokens, byte_tables(sp1024, 1024)).sum())
    return nats / math.log(2) / n_bytes, model.exit_counts.tolist()


def test_early_exit_bpb_is_the_models_exit_rule_and_the_shares_add_up(exit_artifact, val_dir, val_tokens, sp1024,
                                                                      capsys, tmp_path):
    base = [str(exit_artifact), "--data", str(val_dir), "--tokenizer", str(sp1024)]
    out = tmp_path / "r.json"
    rc, d, err = run_eval(capsys, *base, "--early-exit", str(TAU), "--out", str(out))
    assert rc == 0, err
    assert json.loads(out.read_text())["early_exit"] == d["early_exit"]
    e = d["early_exit"]
    model = exit_model()
    bpb, counts = direct(model, val_tokens, TAU, sp1024)
    assert d["val_bpb"] == pytest.approx(bpb, rel=1e-9)
    assert [x["positions"] for x in e["exits"]] + [e["final"]["positions"]] == counts
    assert all(c > 0 for c in counts), counts  # the threshold splits: some exit at each head, some do not
    assert e["threshold"] == TAU and e["virtual_layers"] == 4 and e["positions"] == sum(counts) == 94 * 16
    assert [x["layer"] for x in e["exits"]] == [1, 2] and e["final"]["layer"] == 3
    shares = [x["share"] for x in e["exits"]] + [e["final"]["share"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-12)
    assert shares == pytest.approx([c / sum(counts) for c in counts], rel=1e-12)
    want = (counts[0] * (4 - 1 - 1) + counts[1] * (4 - 1 - 2)) / (sum(counts) * 4)
    assert e["layers_skipped_frac"] == pytest.approx(want, rel=1e-12)
    plain_bpb, _ = direct(model, val_tokens, None, sp1024)
    assert abs(d["val_bpb"] - plain_bpb) > 1e-4  # the exits changed the score: the flag took effect
    # the report says it too
    assert main(["eval", *base, "--early-exit", str(TAU)]) == 0
    report = capsys.readouterr().out
    assert "early exit    tau 0.3: layer 1 " in report and "layers skipped" in report


def test_threshold_one_is_the_plain_evaluation(exit_artifact, val_dir, sp1024, capsys):
    base = [str(exit_artifact), "--data", str(val_dir), "--tokenizer", str(sp1024)]
    rc, plain, err = run_eval(capsys, *base)
    assert rc == 0 and plain["early_exit"] is None, err
    rc, one, err = run_eval(capsys, *base, "--early-exit", "1")
    assert rc == 0, err
    e = one["early_exit"]  # no head of this model is ever certain: everything reaches the end
    assert [x["positions"] for x in e["exits"]] == [0, 0] and e["final"]["share"] == 1.0
    assert e["layers_skipped_frac"] == 0.0
    assert one["val_bpb"] == plain["val_bpb"] and one["val_loss"] == plain["val_loss"]


def test_sliding_windows_count_every_forwarded_position(exit_artifact, val_dir, sp1024, capsys):
    base = [str(exit_artifact), "--data", str(val_dir), "--tokenizer", str(sp1024), "--stride", "4"]
    rc, plain, _ = run_eval(capsys, *base)
    rc2, d, err = run_eval(capsys, *base, "--early-exit", str(TAU))
    assert rc == rc2 == 0, err
    assert d["mode"] == "sliding" and d["tokens"] == plain["tokens"]
    e = d["early_exit"]
    fwd = d["extra"]["forward_tokens"]  # context included; the batches' padding comes on top
    assert fwd <= e["positions"] < fwd + 16 and fwd > 3 * d["tokens"]
    assert sum(x["share"] for x in e["exits"]) + e["final"]["share"] == pytest.approx(1.0, abs=1e-12)
    assert all(x["positions"] > 0 for x in e["exits"])


def test_ttt_applies_the_threshold_to_scoring_forwards_only(val_tokens, sp1024):
    """Adaptation forwards (with gradients) run without the exit rule; only scoring forwards exit and
    are counted, so the tally is the same whether or not (and how much) the pass adapts, warm-up or not."""
    tables = byte_tables(sp1024, 1024)
    toks = val_tokens[:600]
    seen: list[tuple[bool, float | None]] = []

    def watched(model: GPT) -> GPT:
        inner = model.token_losses

        def token_losses(idx, targets):
            seen.append((torch.is_grad_enabled(), model.exit_threshold))
            return inner(idx, targets)
        model.token_losses = token_losses
        return model

    results = []
    for epochs, budget in ((0, None), (2, 1e6)):  # a time budget runs the warm-up on synthetic tokens
        cfg = TTTConfig(chunk=8, rank=2, lr=0.05, epochs=epochs, phase_epochs=epochs, phase_tokens=100,
                        parallel_docs=1,
                        from_start=False)
        model = watched(exit_model())
        res = evaluate_tokens(model, toks, tables, seq_len=16, ttt=cfg, early_exit=TAU, time_budget=budget,
                              batch_tokens=64, log=None)
        assert model.exit_threshold is None  # the model's own setting is back
        results.append(res)
    assert any(grad for grad, _ in seen) and any(not grad for grad, _ in seen)
    assert all(tau is None for grad, tau in seen if grad) and all(tau == TAU for grad, tau in seen if not grad)
    calm, busy = results
    assert busy.extra["ttt"]["adapted_chunks"] > 0 and busy.extra["ttt"]["warmup_s"] is not None
    assert busy.extra["ttt"]["phases_trained"] > 0
    assert busy.early_exit["positions"] == calm.early_exit["positions"] > 0
    assert 0 < calm.early_exit["final"]["positions"] < calm.early_exit["positions"]  # some did exit
    assert busy.val_loss != calm.val_loss  # the adaptation did change the scores
    # without adaptation, TTT scores as sliding windows in each document do: with the exit rule
    sliding = evaluate_tokens(exit_model(), toks, tables, seq_len=16, stride=8, doc_isolated=True,
                              early_exit=TAU, log=None)
    assert calm.val_loss == pytest.approx(sliding.val_loss, rel=1e-6)
    assert calm.tokens == sliding.tokens


def test_an_artifact_without_exit_heads_is_refused(artifact, val_dir, sp1024, capsys):
    rc = main(["eval", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024), "--early-exit", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("pgolf eval: error")]
    assert len(lines) == 1
    assert str(artifact) in lines[0] and "needs a model with exit heads" in lines[0] and "exit_layers=''" in lines[0]


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
def test_threshold_out_of_range_is_a_usage_error(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "none.pgolf"), "--data", str(tmp_path), "--tokenizer", "t.model",
              "--early-exit", value])
    assert e.value.code == 2
    assert "argument --early-exit: must be a " in capsys.readouterr().err


def test_api_threshold_checks():
    from pgolf_eval.evaluate import check_early_exit

    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_early_exit(exit_model(), 0.0)
    with pytest.raises(ValueError, match="needs a model with exit heads"):
        check_early_exit(exit_model(exit_layers=""), 0.5)
    assert check_early_exit(exit_model(), 1) == 1.0


# --- the TTT guard: LoRA targets whose forward never runs ---------------------------------------------

def moe_model() -> GPT:
    cfg = GPTConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=16,
                    moe_experts=2)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def test_moe_expert_targets_are_refused_naming_the_layers_that_never_run():
    model = moe_model()
    with pytest.raises(ValueError, match="whose forward never runs") as e:
        select_targets(model, ("*fc",))
    msg = str(e.value)
    assert "blocks.0.mlp.experts.0.fc" in msg and "blocks.1.mlp.experts.1.fc" in msg
    # on the meta device (`pgolf run`'s check before training), where no forward runs, too
    with torch.device("meta"):
        meta = moe_model()
    with pytest.raises(ValueError, match="blocks.0.mlp.experts.0.fc"):
        select_targets(meta, ("*fc",))
    # the attention layers of the same model do run
    assert len(select_targets(model, ("attn",))) == 4 * 2
    # and `pgolf eval --ttt lora --ttt-targets '*fc'` stops before scoring anything
    with pytest.raises(ValueError, match="blocks.1.mlp.experts.0.fc"):
        evaluate_tokens(model, np.array([1, 5, 9, 7, 3], np.uint16), np.ones(5, np.int64), seq_len=4,
                        ttt=TTTConfig(chunk=2, rank=2, targets=("*fc",)), log=None)


def test_a_layer_applied_only_as_a_weight_is_refused_too():
    """The general check: an untied lm_head is multiplied through its weight, its forward never called."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=16,
                          tie_embeddings=False)).eval()
    with pytest.raises(ValueError, match=r"\['lm_head'\]"):
        select_targets(model, ("q", "lm_head"))


def test_normal_targets_still_work_and_the_probe_leaves_no_trace(val_tokens, sp1024):
    model = exit_model()
    model.exit_threshold = TAU
    model.exit_counts[:] = torch.tensor([5, 6, 7])
    names = [n for n, _ in select_targets(model, ("attn", "mlp"))]
    assert len(names) == 6 * 4 and names[0] == "blocks.0.attn.c_q"
    assert model.exit_counts.tolist() == [5, 6, 7]
    assert all(not m._forward_hooks for m in model.modules())
    model.exit_threshold = None
    res = evaluate_tokens(model, val_tokens[:160], byte_tables(sp1024, 1024), seq_len=16,
                          ttt=TTTConfig(chunk=8, rank=2, targets=("attn", "mlp")), log=None)
    assert res.extra["ttt"]["adapted_modules"] == 24 and res.early_exit is None
