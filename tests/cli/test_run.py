"""`pgolf run`: the README's main job, shortened — real text in, a scored, size-checked artifact out."""
from __future__ import annotations

import json

import pytest

from pgolf.cli import main

CAP = 16_000_000


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, fineweb_docs, wiki_shard, sp1024):
    out = tmp_path_factory.mktemp("run") / "demo"
    rc = main(["run", "--config", "demo", "--docs", str(fineweb_docs), str(wiki_shard), "--val-docs", "20",
               "--tokenizer", str(sp1024), "--out", str(out),
               "--set", "max_wallclock_seconds=8", "--set", "val_max_tokens=8192", "--set", "eval_stride=128",
               "--set", "train_log_every=5", "--set", "checkpoint_every_s=0"])
    return rc, out


def test_run_writes_a_scored_artifact_and_report(demo_run):
    rc, out = demo_run
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("val_bpb", "val_bpb_prequant", "artifact_bytes", "code_bytes", "model_bytes", "train_seconds", "steps"):
        assert report[key] is not None, key
    artifact = out / "train" / "model.pgolf"
    assert report["artifact_bytes"] == artifact.stat().st_size < CAP
    assert report["model_bytes"] + report["code_bytes"] == report["artifact_bytes"]  # every byte is counted
    assert report["headroom_bytes"] == CAP - report["artifact_bytes"]
    assert report["steps"] > 0 and 0 < report["val_bpb"] < 10
    # the final number is the last evaluation the config asks for (sliding, then TTT), of the artifact
    ev = report["evals"]
    assert report["val_bpb_mode"] == "ttt" and report["val_bpb"] == ev["ttt"]["val_bpb"]
    assert ev["sliding"]["stride"] == 128 and ev["ttt"]["tokens"] == ev["sliding"]["tokens"]
    assert ev["ttt"]["extra"]["ttt"]["adapted_chunks"] > 0
    assert {t["name"] for t in report["tensors"]} >= {"tok_emb.weight"}
    md = (out / "report.md").read_text()
    assert "val bpb before quantization" in md and f"{report['artifact_bytes']:,}" in md
    # how often the run read its training set, against the manifest's count of it
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert report["train_tokens"] == manifest["splits"]["train"]["tokens"] > 0
    assert f"| passes over the training set ({report['train_tokens']:,} tokens) | " \
           f"{report['tokens_seen'] / report['train_tokens']:.2f} |" in md
    assert (out / "curves.png").stat().st_size > 0 and (out / "bytes_per_tensor.png").stat().st_size > 0
    # the data stage really ran on the given documents: val is the first 20, the tokenizer reused
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["docs"] == 20 and manifest["tokenizer"]["trained"] is False


def test_run_refuses_a_non_empty_directory(demo_run, capsys):
    _, out = demo_run
    rc = main(["run", "--config", "demo", "--data", str(out / "data"), "--tokenizer", "x.model", "--out", str(out)])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err


def test_run_force_starts_a_previous_run_over(demo_run, sp1024, tmp_path):
    _, first = demo_run
    out = tmp_path / "again"
    (out / "train").mkdir(parents=True)
    (out / "train" / "model.pgolf").write_bytes(b"an earlier run's artifact")
    args = ["run", "--config", "demo", "--data", str(first / "data"), "--tokenizer", str(sp1024), "--out", str(out),
            "--set", "max_wallclock_seconds=1", "--set", "val_max_tokens=4096", "--set", "eval_stride=0"]
    assert main(args) == 2  # without --force the earlier run is kept
    assert (out / "train" / "model.pgolf").read_bytes() == b"an earlier run's artifact"
    assert main([*args, "--force"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "train" / "model.pgolf").stat().st_size == report["artifact_bytes"]


def test_run_with_a_byte_budget_scores_the_allocators_artifact(demo_run, sp1024, tmp_path, capsys):
    _, demo = demo_run
    out = tmp_path / "alloc"
    args = ["run", "--config", "tiny", "--data", str(demo / "data"), "--tokenizer", str(sp1024), "--out", str(out),
            "--set", "iterations=20", "--set", "val_max_tokens=4096"]
    assert main(args + ["--set", "quantize_budget=100000"]) == 0
    report = json.loads((out / "report.json").read_text())
    alloc, recipe = out / "model_alloc.pgolf", out / "train" / "model.pgolf"
    assert report["artifact"] == str(alloc) and report["artifact_bytes"] == alloc.stat().st_size <= 100_000
    assert report["recipe_artifact"]["artifact_bytes"] == recipe.stat().st_size
    assert report["val_bpb"] == report["evals"]["plain"]["val_bpb"] != report["recipe_artifact"]["val_bpb"]
    assert report["val_bpb"] - report["val_bpb_prequant"] <= 0.02  # within the default quantize_tolerance
    # the allocator reuses the trainer's score of the weights: the same number it would compute itself
    assert report["quantize"]["val_bpb_weights"] == report["val_bpb_prequant"]
    from pgolf_eval.evaluate import evaluate_tokens, load_val_stream
    from pgolf_train.model import GPT
    from pgolf_train.quantize import load_checkpoint_weights

    state, cfg = load_checkpoint_weights(out / "train" / "final_model.safetensors", None)
    model = GPT(cfg)
    model.load_state_dict(state)
    tokens, tables = load_val_stream(demo / "data", sp1024, cfg.vocab_size, 4096)
    again = evaluate_tokens(model.eval(), tokens, tables, seq_len=cfg.seq_len, device="cpu", log=None)
    assert again.val_bpb == pytest.approx(report["val_bpb_prequant"], rel=1e-5)
    assert "the recipe's artifact instead" in (out / "report.md").read_text()
    # a budget that costs bpb, with no tolerance: refused with a clear error, nothing scored
    capsys.readouterr()
    refused = tmp_path / "refused"
    args[args.index(str(out))] = str(refused)
    assert main(args + ["--set", "quantize_budget=66500", "--set", "quantize_tolerance=0"]) == 2
    assert "quantize_tolerance" in capsys.readouterr().err
    assert not (refused / "model_alloc.pgolf").exists() and not (refused / "report.json").exists()


def test_eval_modes_build_the_configs_ttt_settings():
    from pgolf.run import _eval_modes
    from pgolf_eval.ttt import TTTConfig
    from pgolf_train.config import ConfigError, load_config

    cfg = load_config("h200", ["eval_ttt_lr=0.003", "eval_ttt_chunk=64", "eval_ttt_targets=attn, mlp",
                               "eval_ttt_epochs=2", "eval_ttt_rank=4", "eval_ttt_from_start=true"])
    modes = {m["mode"]: m for m in _eval_modes(cfg)}
    assert modes["sliding"]["stride"] == cfg.eval_stride
    assert modes["ttt"]["ttt"] == TTTConfig(kind="lora", rank=4, lr=0.003, epochs=2, chunk=64, targets=("attn", "mlp"),
                                            from_start=True)
    assert _eval_modes(load_config("h200", ["eval_ttt_lr=0"]))[-1]["ttt"].learning_rate == 3e-3  # 0 = the default
    assert _eval_modes(load_config("h200", ["eval_ttt_chunk=4096"]))[-1]["ttt"].chunk == 1024  # the window at most
    with pytest.raises(ConfigError, match="eval_ttt_chunk"):
        load_config("h200", ["eval_ttt_chunk=0"])
    with pytest.raises(ConfigError, match="eval_ttt_targets"):
        load_config("h200", ["eval_ttt_targets= ,"])


def test_ttt_defaults_are_one_setting_in_the_evaluator_the_cli_and_configs():
    """TTTConfig holds the defaults; a config that turns TTT on and `pgolf eval --ttt lora` get them
    unchanged (they once drifted: the CLI kept the pre-sweep settings)."""
    import argparse

    from pgolf.run import _eval_modes
    from pgolf_eval import cli as eval_cli
    from pgolf_eval.ttt import TTTConfig
    from pgolf_train.config import load_config

    best = TTTConfig()
    assert (best.rank, best.learning_rate, best.chunk, best.targets, best.from_start) == (16, 3e-3, 64, ("attn", "mlp"), True)
    assert _eval_modes(load_config("demo", ["eval_ttt=lora"]))[-1]["ttt"] == TTTConfig(chunk=min(best.chunk, 256))
    sub = argparse.ArgumentParser().add_subparsers()
    eval_cli.register(sub)
    args = sub.choices["eval"].parse_args(["a.pgolf", "--data", "d", "--tokenizer", "t", "--ttt", "lora"])
    assert eval_cli.ttt_config(args) == best
    off = sub.choices["eval"].parse_args(["a.pgolf", "--data", "d", "--tokenizer", "t", "--ttt", "lora",
                                          "--no-ttt-from-start"])
    assert not eval_cli.ttt_config(off).from_start


def test_run_rejects_a_misspelt_ttt_target_before_training(tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(["run", "--config", "demo", "--data", str(tmp_path), "--tokenizer", "x.model", "--out", str(out),
               "--set", "eval_ttt=lora", "--set", "eval_ttt_targets=q,vv"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "['vv']" in err and "match no linear layer" in err and not (out / "train").exists()



# ------------------------------------------------------------------ a failed run keeps what was there

def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _bad_docs(tmp_path, fineweb_docs):
    lines = fineweb_docs.read_text(encoding="utf-8").splitlines(keepends=True)[:20]
    lines.insert(5, '{"text": broken\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines), encoding="utf-8")
    return bad


def _earlier_run(out):
    (out / "data").mkdir(parents=True)
    (out / "data" / "manifest.json").write_text('{"an": "earlier dataset"}')
    (out / "train").mkdir()
    (out / "train" / "model.pgolf").write_bytes(b"an earlier run's artifact")
    return _tree(out)


def test_run_force_with_bad_docs_keeps_the_previous_run(tmp_path, fineweb_docs, sp1024, capsys):
    out = tmp_path / "run"
    before = _earlier_run(out)
    rc = main(["run", "--config", "demo", "--docs", str(_bad_docs(tmp_path, fineweb_docs)), "--val-docs", "3",
               "--tokenizer", str(sp1024), "--out", str(out), "--force"])
    assert rc == 2 and "bad.jsonl:6: invalid JSON" in capsys.readouterr().err
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["data", "train"]


def test_run_force_with_a_failing_train_stage_keeps_the_previous_run(tmp_path, fineweb_docs, sp1024, capsys):
    from pgolf_train.shards import read_shard, write_shard
    from tests.train.train_fixtures import make_tiny_shards

    data = make_tiny_shards(tmp_path / "bad_data", fineweb_docs, sp1024, n_train_docs=20)
    tokens = read_shard(data / "fineweb_train_000000.bin").copy()
    tokens[3] = 60000  # out of the vocabulary: the trainer's loader refuses the shard
    write_shard(data / "fineweb_train_000000.bin", tokens, overwrite=True)
    out = tmp_path / "run"
    before = _earlier_run(out)
    rc = main(["run", "--config", "demo", "--data", str(data), "--tokenizer", str(sp1024), "--out", str(out),
               "--force", "--set", "iterations=2", "--set", "val_max_tokens=4096"])
    assert rc == 2 and "token out of vocabulary" in capsys.readouterr().err
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["data", "train"]


def test_a_failed_run_removes_the_directory_it_made(tmp_path, fineweb_docs, sp1024, capsys):
    out = tmp_path / "new" / "run"
    args = ["run", "--config", "demo", "--docs", str(_bad_docs(tmp_path, fineweb_docs)), "--val-docs", "3",
            "--tokenizer", str(sp1024), "--out", str(out)]
    assert main(args) == 2
    assert main([*args, "--set", "no_such_field=1"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # the retry needs no --force
    (tmp_path / "file").write_text("not a directory")
    args[args.index(str(out))] = str(tmp_path / "file")
    assert main(args) == 2 and "is not a directory" in capsys.readouterr().err


def test_h200s_stack_trains_int4_under_qat_and_adapts_its_artifact(tmp_path, fineweb_docs, sp1024):
    """`h200` (int4 block matrices fake-quantized from step 0, then sliding windows and score-first TTT)
    at a CPU size: the artifact decodes exactly the forward it trained, its blocks are int4, and TTT
    adapts on top of that int4 artifact."""
    from tests.train.train_fixtures import make_tiny_shards

    data = make_tiny_shards(tmp_path / "data", fineweb_docs, sp1024)
    out = tmp_path / "run"
    cpu = ["vocab_size=1024", "model_dim=64", "num_layers=2", "num_heads=2", "num_kv_heads=1", "train_seq_len=128",
           "train_batch_tokens=2048", "iterations=12", "max_wallclock_seconds=0", "compile=false",
           "compile_warmup_steps=0", "device=cpu", "bf16=false", "fused=", "val_max_tokens=4096",
           "val_batch_tokens=4096", "eval_stride=64", "train_log_every=4", "checkpoint_every_s=0"]
    rc = main(["run", "--config", "h200", "--data", str(data), "--tokenizer", str(sp1024), "--out", str(out),
               *[a for kv in cpu for a in ("--set", kv)]])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    ev = report["evals"]
    assert abs(report["val_bpb_qat"] - ev["plain"]["val_bpb"]) < 1e-6  # the artifact is the QAT forward
    schemes = {t["name"]: t["scheme"] for t in report["tensors"]}
    assert schemes["blocks.0.mlp.fc.weight"] == "int4:mse" and schemes["tok_emb.weight"].startswith("int8")
    assert report["val_bpb_mode"] == "ttt" and ev["ttt"]["extra"]["ttt"]["adapted_chunks"] > 0
    assert ev["ttt"]["tokens"] == ev["sliding"]["tokens"] and ev["ttt"]["val_bpb"] != ev["sliding"]["val_bpb"]
