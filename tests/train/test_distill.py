"""Distillation inside the budget: the loss, frozen teacher, the budget split, α = 1 ≡ plain training,
the artifact holds only the student, and the H200 benchmark at a tiny size."""
from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf_eval.scorer import Scorer
from pgolf_train import trainer
from pgolf_train.config import ConfigError, load_config
from pgolf_train.distill import (Distiller, alpha_at, distill_losses, student_config, teacher_config,
                                 teacher_iterations)
from pgolf_train.loader import DistributedTokenLoader
from pgolf_train.trainer import build_model, build_optimizers, set_schedule, train, train_step

from .train_fixtures import exit_quietly, logged_losses, read_log

REPO = Path(__file__).resolve().parents[2]
WIDE_TEACHER = "model_dim=96;num_layers=3"  # 96 appears in no shape of the 64-wide student


# --- configuration -------------------------------------------------------------------------------

def test_budget_split_and_teacher_config():
    clock = load_config("tiny", ["max_wallclock_seconds=100", "distill_teacher_frac=0.4",
                                 f"teacher_overrides={json.dumps(WIDE_TEACHER)}", "qat_start=0.5"])
    t, s = teacher_config(clock), student_config(clock)
    assert t.max_wallclock_seconds == pytest.approx(40.0) and s.max_wallclock_seconds == pytest.approx(60.0)
    assert (t.model_dim, t.num_layers, t.qat_start, t.distill_teacher_frac) == (96, 3, 1.0, 0.0)
    assert (s.model_dim, s.num_layers, s.qat_start) == (64, 2, 0.5)  # the student keeps its QAT
    # without a clock the iterations are split; born-again (no overrides) keeps the student's model
    steps = load_config("tiny", ["iterations=40", "distill_teacher_frac=0.25"])
    assert teacher_iterations(steps) == 10 and student_config(steps).iterations == 30
    assert teacher_config(steps).model_config() == steps.model_config()
    # two generations: the teacher phase is itself a distillation run, its teacher on half the share
    gen = load_config("tiny", ["max_wallclock_seconds=100", "distill_teacher_frac=0.6", "distill_generations=2"])
    t2 = teacher_config(gen)
    assert t2.max_wallclock_seconds == pytest.approx(60.0) and t2.distill_teacher_frac == 0.5
    assert teacher_config(t2).max_wallclock_seconds == pytest.approx(30.0)
    assert student_config(t2).max_wallclock_seconds == pytest.approx(30.0)


def test_distill_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="distill_teacher_frac"):
        load_config("tiny", ["distill_teacher_frac=1.0"])
    with pytest.raises(ConfigError, match="teacher_overrides.*may not set max_wallclock_seconds"):
        load_config("tiny", ["distill_teacher_frac=0.5", 'teacher_overrides="max_wallclock_seconds=9"'])
    with pytest.raises(ConfigError, match="teacher_overrides.*vocab_size"):
        load_config("tiny", ["distill_teacher_frac=0.5", 'teacher_overrides="vocab_size=512"'])
    with pytest.raises(ConfigError, match="teacher_overrides.*num_heads"):
        load_config("tiny", ["distill_teacher_frac=0.5", 'teacher_overrides="model_dim=90"'])  # 90 % 4 heads
    with pytest.raises(ConfigError, match="teacher_overrides.*unknown config key.*'num_layer'"):
        load_config("tiny", ["distill_teacher_frac=0.5", 'teacher_overrides="num_layer=3"'])
    with pytest.raises(ConfigError, match="distill_teacher_frac.*0 student step"):
        load_config("tiny", ["iterations=10", "distill_teacher_frac=0.99"])
    for key, value in (("distill_alpha", "1.5"), ("distill_temperature", "0"), ("distill_generations", "0"),
                       ("distill_alpha_schedule", '"step"')):
        with pytest.raises(ConfigError, match=key):
            load_config("tiny", [f"{key}={value}"])
    cfg = load_config("distill")  # the shipped config resolves its teacher
    assert teacher_config(cfg).model_dim == 640 and cfg.distill_teacher_frac == 0.4


def test_alpha_schedules():
    def cfg(kind: str):
        return load_config("tiny", ["distill_alpha=0.2", "distill_alpha_end=1.0", f'distill_alpha_schedule="{kind}"'])

    assert [alpha_at(cfg("constant"), f) for f in (0.0, 0.5, 1.0)] == [0.2, 0.2, 0.2]
    assert [alpha_at(cfg("linear"), f) for f in (0.0, 0.5, 1.0, 1.7)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert alpha_at(cfg("cosine"), 0.25) == pytest.approx(0.2 + 0.8 * 0.5 * (1 - math.cos(math.pi / 4)))


# --- the loss ------------------------------------------------------------------------------------

def test_loss_matches_its_definition_and_kl_vanishes_for_the_same_weights(tiny_data):
    cfg = load_config("tiny", ["distill_alpha=0.3", "distill_temperature=2.0"])
    student = build_model(cfg, torch.device("cpu"))
    x, y = DistributedTokenLoader(tiny_data, 0, 1, "cpu").next_batch(512, 64, 1)

    # against torch's own KL on random logits: KL(p_t || p_s) with both at temperature T, mean per token
    s_logits, t_logits = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    tgt = torch.randint(0, 11, (2, 5))
    ce, kl = distill_losses(s_logits, t_logits, tgt, 2.0)
    ref = F.kl_div(F.log_softmax(s_logits / 2, -1).flatten(0, 1), F.log_softmax(t_logits / 2, -1).flatten(0, 1),
                   log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl, ref)
    torch.testing.assert_close(ce, F.cross_entropy(s_logits.flatten(0, 1), tgt.flatten()))
    assert kl > 0

    # the same weights: KL exactly 0 and it pushes no gradient; the loss is α·CE alone
    distiller = Distiller(copy.deepcopy(student), cfg)
    distiller.set_progress(0.0)
    loss = distiller(student, x, y)
    stats = distiller.stats()
    assert stats["kl"] == 0.0 and stats["alpha"] == 0.3
    assert stats["ce"] == pytest.approx(float(student(x, y).detach()), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(0.3 * stats["ce"], rel=1e-6)
    kl_only = Distiller(copy.deepcopy(student), load_config("tiny", ["distill_alpha=0.0"]))
    kl_only.set_progress(0.0)
    kl_only(student, x, y).backward()
    # (not exactly 0: the softmax's backward uses sum(p_t), which is 1 only up to rounding)
    same = max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None)

    # a different teacher: a positive KL with a real gradient
    other = build_model(load_config("tiny", ["seed=7", "model_dim=96"]), torch.device("cpu"))
    student.zero_grad(set_to_none=True)
    kl_only = Distiller(other, load_config("tiny", ["distill_alpha=0.0"]))
    kl_only.set_progress(0.0)
    kl_only(student, x, y).backward()
    assert kl_only.stats()["kl"] > 0
    differ = max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None)
    assert same < 1e-8 < 1e-4 < differ, (same, differ)


def test_a_student_step_moves_only_the_student(tiny_data):
    cfg = load_config("tiny", ["distill_alpha=0.5"])
    device = torch.device("cpu")
    student = build_model(cfg, device)
    teacher = build_model(load_config("tiny", ["seed=3", "model_dim=96", "num_layers=3"]), device)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(teacher, cfg)
    optimizers, muon = build_optimizers(cfg, student, device)
    set_schedule(optimizers, muon, 1.0, cfg.muon_momentum)
    loader = DistributedTokenLoader(tiny_data, 0, 1, device, cfg.vocab_size)
    for _ in range(2):
        distiller.set_progress(0.0)
        train_step(student, optimizers, loader, cfg, 1, False, device, list(student.parameters()), distiller)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_t[k]), k
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert "tok_emb.weight" in moved and any(k.startswith("blocks.") for k in moved)


# --- whole runs ----------------------------------------------------------------------------------

def test_alpha_one_trains_exactly_like_the_plain_trainer_and_only_the_student_is_stored(tiny_data, sp1024, tmp_path):
    """α = 1 (constant): the KL term weighs 0, so the student phase is the plain trainer bit for bit
    (same init, data, schedule, QAT switch, EMA), though the teacher runs on every micro-batch."""
    common = ["qat_start=0.5", "ema_decay=0.9", "val_max_tokens=2048"]
    plain = tmp_path / "plain"
    ref = train(load_config("tiny", ["iterations=6", *common]), tiny_data, sp1024, plain, scorer=Scorer(), echo=False)
    run = tmp_path / "distill"
    cfg = load_config("tiny", ["iterations=10", "distill_teacher_frac=0.4", "distill_alpha=1.0",
                               f"teacher_overrides={json.dumps(WIDE_TEACHER)}", *common])
    got = train(cfg, tiny_data, sp1024, run, scorer=Scorer(), echo=False)

    assert got["steps"] == ref["steps"] == 6 and got["distill"]["teacher_steps"] == 4
    assert logged_losses(run) == logged_losses(plain)  # exact floats, every logged step
    from pgolf_codec.safetensors_io import read_safetensors

    a, _ = read_safetensors(plain / "final_model.safetensors")
    b, _ = read_safetensors(run / "final_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got["val_bpb"] == ref["val_bpb"]
    stats = [r for r in read_log(run) if "kl" in r]
    assert stats and all(r["alpha"] == 1.0 and r["kl"] > 0 for r in stats)  # the teacher did run

    # the artifact is the student's: its tensors, its shapes, the same model bytes as the plain run
    from pgolf_codec.container import read_artifact

    art, art_plain = read_artifact(run / "model.pgolf"), read_artifact(plain / "model.pgolf")
    student_sd = build_model(load_config("tiny"), torch.device("cpu")).state_dict()
    assert {k: tuple(v.shape) for k, v in art.tensors.items()} == {k: tuple(v.shape) for k, v in student_sd.items()}
    assert all(96 not in v.shape for v in art.tensors.values())
    def payload(a) -> list[tuple]:
        return [(t["name"], t["shape"], t["bytes"]) for t in a.info.tensors]

    assert payload(art) == payload(art_plain)  # byte for byte the same tensors as the plain run's
    # beyond the tensors only the header differs (the config in the metadata names the distill fields)
    assert art.info.model_bytes - art.info.header_bytes == art_plain.info.model_bytes - art_plain.info.header_bytes
    assert art.info.model_bytes == got["model_bytes"]
    assert art.info.total_bytes == got["artifact_bytes"] == (run / "model.pgolf").stat().st_size
    assert art.metadata["model_config"]["model_dim"] == 64
    teacher_bytes = (run / "teacher" / "final_model.safetensors").stat().st_size
    assert got["artifact_bytes"] < teacher_bytes and not (run / "teacher" / "model.pgolf").exists()
    assert got["teacher_val_bpb"] == json.loads((run / "teacher" / "train_summary.json").read_text())["val_bpb_prequant"]


class FakeClock:
    """``time`` for the trainer: ``perf_counter`` advances only by ``dt`` seconds per training step."""

    def __init__(self, dt: float) -> None:
        self.dt, self.steps = dt, 0

    def perf_counter(self) -> float:
        return self.steps * self.dt


def test_the_trainers_clock_enforces_the_split(tiny_data, sp1024, tmp_path, monkeypatch):
    """Budget 5 s, teacher 40%: with every step taking 0.35 s of the (fake) clock, the teacher stops at
    the first step at or past 2 s (6 steps, 2.1 s) and the student at 3 s (9 steps, 3.15 s). The student
    is depth-recurrent, fake-quantized from 50% of its share and averaged by an EMA."""
    clock = FakeClock(0.35)
    real_step = trainer.train_step

    def timed_step(*args, **kwargs):
        clock.steps += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(trainer, "train_step", timed_step)
    cfg = load_config("tiny", ["max_wallclock_seconds=5", "iterations=1000", "distill_teacher_frac=0.4",
                               'teacher_overrides="num_layers=3"', "loop_start=0", "loop_end=2", "loop_times=2",
                               "qat_start=0.5", "ema_decay=0.9", "val_max_tokens=2048", "train_log_every=1",
                               'distill_alpha_schedule="linear"', "distill_alpha=0.25", "distill_alpha_end=0.75"])
    run = tmp_path / "run"
    summary = train(cfg, tiny_data, sp1024, run, scorer=Scorer(), echo=False)

    d = summary["distill"]
    assert (d["teacher_steps"], d["student_steps"]) == (6, 9)
    assert d["teacher_train_seconds"] == pytest.approx(2.1) and d["student_train_seconds"] == pytest.approx(3.15)
    assert summary["train_seconds"] == pytest.approx(5.25)  # both phases: what the budget counts
    recs = read_log(run)
    phases = [r for r in recs if r.get("event") == "phase"]
    assert [(p["phase"], p["budget_s"]) for p in phases] == [("teacher", pytest.approx(2.0)),
                                                             ("student", pytest.approx(3.0))]
    done = next(r for r in recs if r.get("event") == "teacher_done")
    assert done["teacher_val_bpb"] == summary["teacher_val_bpb"] and math.isfinite(done["teacher_val_bpb"])
    assert done["teacher_train_seconds"] == pytest.approx(2.1) and done["teacher_steps"] == 6
    assert any(r.get("event") == "qat_switch" for r in recs) and summary["ema"]
    alphas = [r["alpha"] for r in recs if "alpha" in r]
    assert alphas[0] == 0.25 and alphas == sorted(alphas) and alphas[-1] < 0.75  # linear over the student's share
    assert math.isfinite(summary["val_bpb"]) and summary["steps"] == 9


def test_benchmark_runs_both_arms_at_a_tiny_size(tiny_data, sp1024, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_bench", REPO / "benchmarks" / "distill_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "distill_bench.json"
    common = ["--data", str(tiny_data), "--tokenizer", str(sp1024), "--out", str(out), "--config", "tiny",
              "--budget", "2", "--set", "iterations=1000", "--set", "val_max_tokens=2048",
              "--run-dir", str(tmp_path / "runs"), "--quiet"]
    assert bench.main([*common, "--arm", "baseline"]) == 0
    assert bench.main([*common, "--arm", "distill", "--teacher-frac", "0.4", "--teacher", WIDE_TEACHER]) == 0
    result = json.loads(out.read_text())
    base, dist = result["rows"]["baseline"], result["rows"]["distill_t40"]
    assert result["device"].startswith("cpu") and result["date"] and "--teacher-frac" in result["command"]
    assert base["teacher_val_bpb"] is None and math.isfinite(dist["teacher_val_bpb"])
    assert dist["delta_vs_baseline"] == pytest.approx(dist["val_bpb"] - base["val_bpb"])
    assert dist["distill"]["teacher_frac"] == 0.4 and dist["distill"]["teacher_params"] > base["params"]
    for row in (base, dist):  # each arm ran on its budget: stopped at the first step past it
        assert 2.0 <= row["train_seconds"] and math.isfinite(row["val_bpb"]) and row["fits"]


def _ddp_rank(rank: int, world: int, data: str, tokenizer: str, out: str, store: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # a file store: no TCP port to pick, or to collide with another test's
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = load_config("tiny", ["iterations=6", "distill_teacher_frac=0.5", 'teacher_overrides="num_layers=3"',
                               "val_max_tokens=2048"])
    train(cfg, data, tokenizer, out, scorer=Scorer(), echo=False)  # both phases run over the group it finds
    dist.barrier()
    dist.destroy_process_group()
    exit_quietly()


def test_two_ranks_train_teacher_and_student_over_the_same_group(tiny_data, sp1024, tmp_path):
    import torch.multiprocessing as mp

    run = tmp_path / "ddp"
    mp.spawn(_ddp_rank, args=(2, str(tiny_data), str(sp1024), str(run), str(tmp_path / "store")), nprocs=2,
             join=True)
    summary = json.loads((run / "train_summary.json").read_text())
    teacher = json.loads((run / "teacher" / "train_summary.json").read_text())
    assert summary["world_size"] == teacher["world_size"] == 2
    assert (summary["steps"], teacher["steps"]) == (3, 3) and math.isfinite(summary["teacher_val_bpb"])
    assert math.isfinite(summary["val_bpb"]) and summary["fits"]
