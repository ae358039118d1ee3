"""The trainer on real data (tiny config, CPU): learning, export, resume after a kill, the CLI."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_eval.scorer import Scorer
from pgolf_train.config import ConfigError, load_config, make_config
from pgolf_train.ema import EMA, warmup_decay
from pgolf_train.loader import DistributedTokenLoader, TokenStream
from pgolf_train.shards import list_shards, read_shard
from pgolf_train.trainer import lr_multiplier, train

from .train_fixtures import logged_losses, read_log, train_command as main

REPO = Path(__file__).resolve().parents[2]


# --- configuration ------------------------------------------------------------------------------

def test_baseline_dry_run_reports_challenge_param_count(capsys):
    assert main(["--config", "baseline", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 17_059_912
    assert out["grad_accum"] == 8  # one process: the baseline's 8 micro-steps
    assert out["config"]["train_batch_tokens"] == 524_288 and out["config"]["warmdown_iters"] == 1200


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="matrix_lrr.*did you mean 'matrix_lr'"):
        load_config("tiny", ["matrix_lrr=0.1"])
    with pytest.raises(ConfigError, match="num_layers: expected an integer"):
        load_config("tiny", ["num_layers=two"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config("tiny", ["ema_decay=1.5"])
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnum_layers = 3\n")
    with pytest.raises(ConfigError, match="tables are not allowed"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="model fields"):
        load_config("tiny", ["num_heads=3"])  # 64 is not divisible by 3
    cfg = load_config("tiny", ["matrix_lr=0.1", "compile=true", "train_seq_len=32"])
    assert cfg.matrix_lr == 0.1 and cfg.compile is True and cfg.seq_len == 32


def test_every_named_config_loads():
    for path in sorted((REPO / "pgolf_train" / "configs").glob("*.toml")):
        cfg = load_config(path.stem)
        assert cfg.model_config().num_layers == cfg.num_layers


def test_wallclock_warmdown_is_the_baselines():
    cfg = make_config({"max_wallclock_seconds": 600.0, "warmdown_iters": 1200})
    # 100 ms/step: warm-down covers the last 120 s
    assert lr_multiplier(cfg, 1000, 100_000.0) == 1.0
    assert lr_multiplier(cfg, 5400, 540_000.0) == pytest.approx(60_000 / 120_000)
    assert lr_multiplier(cfg, 6000, 600_000.0) == 0.0
    cos = make_config({"max_wallclock_seconds": 100.0, "warmdown_frac": 1.0, "schedule": "cosine",
                       "min_lr_frac": 0.1, "lr_warmup_steps": 10})
    assert lr_multiplier(cos, 4, 0.0) == pytest.approx(0.5)  # warm-up: (4+1)/10
    assert lr_multiplier(cos, 100, 50_000.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(cos, 200, 100_000.0) == pytest.approx(0.1)


# --- EMA and data stream ---------------------------------------------------------------------------

def test_ema_warmup_decay_and_update():
    assert warmup_decay(0.997, 0) == pytest.approx(0.1)
    assert warmup_decay(0.997, 10_000) == 0.997
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, 0.997)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    d = ema.update()
    assert d == pytest.approx(0.1)
    torch.testing.assert_close(ema.weights()["weight"], 0.1 * start + 0.9 * model.weight.detach())


def test_stream_spans_match_across_world_sizes_and_resume(tiny_data):
    def spans(world: int, accum: int, steps: int) -> list[np.ndarray]:
        loaders = [DistributedTokenLoader(tiny_data, r, world, torch.device("cpu")) for r in range(world)]
        out = []
        for _ in range(steps * accum):
            for ld in loaders:
                x, y = ld.next_batch(8 * 2 * 64, 64, accum)
                out.append(torch.cat([x[:, :1], y], dim=1).numpy())
        return sorted(map(bytes, [np.ascontiguousarray(s) for s in out]))

    assert spans(1, 8, 3) == spans(8, 1, 3) == spans(2, 4, 3)
    files = list_shards(tiny_data, "train")
    full = np.concatenate([read_shard(f) for f in files])
    stream = TokenStream(files)
    first = stream.take(len(full) - 5)
    state = stream.state_dict()
    wrapped = stream.take(10)  # crosses the end: wraps to the first shard
    np.testing.assert_array_equal(wrapped, np.concatenate([full[-5:], full[:5]]))
    again = TokenStream(files)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.take(10), wrapped)
    assert first.size == len(full) - 5


# --- the whole run ------------------------------------------------------------------------------

def test_tiny_run_learns_exports_and_scores_the_artifact(tiny_data, sp1024, tmp_path):
    cfg = load_config("tiny", ["iterations=30", "ema_decay=0.9", "qat_start=0.6"])
    run = tmp_path / "run"
    summary = train(cfg, tiny_data, sp1024, run, scorer=Scorer(), echo=False)
    losses = logged_losses(run)
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (25, 30)])
    assert first > 6.5 and last < first - 0.8, losses  # ln(1024) = 6.93 at the start
    for key in ("val_bpb_prequant", "val_bpb", "steps", "train_seconds", "tokens_seen", "params",
                "artifact_bytes", "code_bytes", "model_bytes", "artifact"):
        assert key in summary
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 2048
    assert summary["params"] == sum(p.numel() for p in
                                    __import__("pgolf_train.model", fromlist=["GPT"]).GPT(cfg.model_config()).parameters())
    # int8 per-row barely moves the score; both are far below the uniform 6.93 nats/token
    assert math.isfinite(summary["val_bpb"]) and abs(summary["val_bpb"] - summary["val_bpb_prequant"]) < 0.02
    assert summary["val_bpb"] < 3.5
    # QAT was on when training ended: the model is also scored as trained, and the artifact decodes
    # exactly that forward (a ternary model's float weights alone had scored 3.66 against 1.67)
    assert abs(summary["val_bpb_qat"] - summary["val_bpb"]) < 1e-6
    assert "from quantization, against the QAT forward" in (run / "train.log").read_text()
    # the log says how often the run read its training tokens (a run past 1 sees the same text again)
    from pgolf_train.shards import list_shards, read_header

    train_tokens = sum(read_header(f) for f in list_shards(tiny_data, "train"))
    assert f"({train_tokens:,} tokens)" in (run / "train.log").read_text()
    assert f"; {30 * 2048 / train_tokens:.1f} passes over the training tokens)" in (run / "train.log").read_text()
    from pgolf_codec.container import read_artifact

    art = read_artifact(run / "model.pgolf")
    assert art.info.total_bytes == summary["artifact_bytes"] == (run / "model.pgolf").stat().st_size
    assert art.code["model.py"] == (REPO / "pgolf_train" / "model.py").read_text()
    assert art.metadata["model_config"]["num_layers"] == 2
    assert art.metadata["tokenizer"]["vocab_size"] == 1024 and len(art.metadata["tokenizer"]["sha256"]) == 64
    assert art.metadata["train"]["steps"] == 30
    assert json.loads((run / "train_summary.json").read_text())["val_bpb"] == summary["val_bpb"]
    assert any(r.get("event") == "qat_switch" for r in read_log(run))
    for name in ("final_model.safetensors", "checkpoint.pt", "train.log"):
        assert (run / name).is_file()
    # a run directory is never overwritten by accident
    with pytest.raises(FileExistsError, match="--resume.*--force"):
        train(cfg, tiny_data, sp1024, run, scorer=Scorer(), echo=False)


def test_force_keeps_the_previous_run_until_the_new_one_finishes(tiny_data, sp1024, tmp_path):
    """`--force` used to delete the previous run's files before training: a run that then failed
    left nothing. They wait in .previous-run until the new run has written its own."""
    from pgolf_train.trainer import PREVIOUS_RUN

    cfg = load_config("tiny", ["iterations=2", "val_max_tokens=2048"])
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pgolf", "train.jsonl"):
        (run / name).write_text("old " + name)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception):  # no shards: fails after the run directory was prepared
        train(cfg, empty, sp1024, run, scorer=Scorer(), force=True, echo=False)
    assert (run / PREVIOUS_RUN / "model.pgolf").read_text() == "old model.pgolf"
    with pytest.raises(Exception):  # failing again keeps the same previous run, not the failed one's files
        train(cfg, empty, sp1024, run, scorer=Scorer(), force=True, echo=False)
    assert (run / PREVIOUS_RUN / "train.jsonl").read_text() == "old train.jsonl"
    train(cfg, tiny_data, sp1024, run, scorer=Scorer(), force=True, echo=False)
    assert not (run / PREVIOUS_RUN).exists() and (run / "model.pgolf").read_bytes()[:4] == b"PGLF"


def test_resume_after_kill_continues_the_same_run(tiny_data, sp1024, tmp_path):
    args = ["--config", "tiny", "--data", str(tiny_data), "--tokenizer", str(sp1024),
            "--set", "iterations=20", "--set", "checkpoint_every_steps=4", "--set", "val_max_tokens=2048",
            "--set", "ema_decay=0.9",
            # h200 decays both optimizers' weights on the lr's taper: resume must restore that state too
            "--set", "muon_weight_decay=0.1", "--set", "embed_weight_decay=0.1", "--set", "muon_wd_schedule=lr"]
    ref = tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, "-m", "pgolf", "train", *args, "--out", str(ref)], check=True, env=env,
                   capture_output=True, cwd=REPO)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pgolf", "train", *args, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed"
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= killed_at < 20
    done = subprocess.run([sys.executable, "-m", "pgolf", "train", *args, "--out", str(run), "--resume"],
                          env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = logged_losses(ref), logged_losses(run)
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step
    ref_sum = json.loads((ref / "train_summary.json").read_text())
    run_sum = json.loads((run / "train_summary.json").read_text())
    assert run_sum["steps"] == 20 and run_sum["val_bpb"] == pytest.approx(ref_sum["val_bpb"], rel=1e-5)


def test_torchrun_two_gloo_processes_train_and_exit_cleanly(tiny_data, sp1024, tmp_path):
    # The user's multi-GPU path end to end on CPU: torchrun's env:// rendezvous, the trainer's own
    # process group, DDP, rank 0 writing the artifact, and a clean exit of both ranks.
    args = ["--config", "tiny", "--data", str(tiny_data), "--tokenizer", str(sp1024),
            "--set", "iterations=6", "--set", "val_max_tokens=2048", "--set", "fused=ce,rope"]  # fused under DDP too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pgolf", "train", *args, "--out", str(run)],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["fits"]
    from pgolf_codec.container import read_artifact
    art = read_artifact(run / "model.pgolf")
    assert art.metadata["train"]["steps"] == 6
    assert "world_size: 2" in (run / "train.log").read_text()
    assert "fused kernels: ce,rope" in (run / "train.log").read_text()


def test_exported_weights_pack_as_the_readme_says_and_evaluate(tiny_data, sp1024, tmp_path, capsys):
    """`pgolf pack runs/.../final_model.safetensors --code pgolf_train/model.py` (the README's
    example) and `pgolf pack checkpoint.pt` make artifacts `pgolf eval` can build a model from."""
    from pgolf.cli import main as pgolf
    from pgolf_codec.container import read_artifact
    from pgolf_eval.loader import model_from_artifact

    cfg = load_config("tiny", ["iterations=2", "checkpoint_every_steps=1"])
    run = tmp_path / "run"
    train(cfg, tiny_data, sp1024, run, scorer=Scorer(), echo=False, export=False)
    want = cfg.model_config().to_dict()
    for src in ("final_model.safetensors", "checkpoint.pt"):
        art = tmp_path / f"{src}.pgolf"
        assert pgolf(["pack", str(run / src), "-o", str(art), "--recipe",
                      "tok_emb.weight=int8;*.weight=int6:sdclip=12.5;*=fp16",
                      "--code", str(REPO / "pgolf_train" / "model.py"), "--max-bytes", "16000000"]) == 0
        assert "--config" not in capsys.readouterr().err
        assert read_artifact(art).metadata["model_config"] == want
        model, _ = model_from_artifact(art)
        assert sum(p.numel() for p in model.parameters()) > 0
    # weights without a config: eval says how to fix it; --config supplies it
    from pgolf_codec.safetensors_io import read_safetensors, write_safetensors

    tensors, _ = read_safetensors(run / "final_model.safetensors")
    write_safetensors(tmp_path / "bare.safetensors", tensors)
    assert pgolf(["pack", str(tmp_path / "bare.safetensors"), "-o", str(tmp_path / "bare.pgolf")]) == 0
    assert "--config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--config"):
        model_from_artifact(tmp_path / "bare.pgolf")
    (tmp_path / "cfg.json").write_text(json.dumps(want))
    assert pgolf(["pack", str(tmp_path / "bare.safetensors"), "-o", str(tmp_path / "bare.pgolf"), "--force",
                  "--config", str(tmp_path / "cfg.json")]) == 0
    with pytest.warns(UserWarning, match="embeds no model source"):
        model_from_artifact(tmp_path / "bare.pgolf")


def test_a_failed_run_leaves_no_attention_backend_pinned(tiny_data, sp1024, tmp_path, monkeypatch):
    """The pinned SDPA backend (process-global) was released only when the loop ended normally: a run
    that raised inside it left every later attention call in the process on that one kernel."""
    import pgolf_train.trainer as trainer

    seen = []

    def failing_step(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        raise RuntimeError("step failed")

    monkeypatch.setattr(trainer, "train_step", failing_step)
    cfg = load_config("tiny", ["iterations=3", "sdpa_backend=math", "compile=false", "compile_warmup_steps=0"])
    with pytest.raises(RuntimeError, match="step failed") as failure:
        train(cfg, tiny_data, sp1024, tmp_path / "run", scorer=Scorer(), echo=False)
    assert seen == [False]  # inside the run only the math kernel was allowed
    # checked while the caller still holds the exception (its traceback keeps the run's frames alive,
    # as a REPL or a retrying caller does): the backend must be released by then, not at collection
    assert failure.traceback and torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
