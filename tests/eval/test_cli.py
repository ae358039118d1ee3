"""`pgolf eval`: report and JSON, one-line errors (exit 2) for corrupt artifacts and bad shards."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pgolf.cli import main
from pgolf_eval.ttt import TTTConfig
from pgolf_eval.evaluate import evaluate_artifact
from pgolf_train.shards import write_shard


def test_json_report_matches_api(artifact, val_dir, sp1024, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024), "--stride", "8",
               "--json", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    for d in (printed, written):
        assert {"val_bpb", "val_loss", "tokens", "bytes", "seconds", "mode", "coverage"} <= set(d)
        assert d["mode"] == "sliding" and d["coverage"] == "full" and d["device"] == "cpu"
    api = evaluate_artifact(artifact, val_dir, sp1024, stride=8, log=None)
    assert written["val_bpb"] == pytest.approx(api.val_bpb, rel=1e-9) and written["tokens"] == api.tokens
    rc = main(["eval", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024), "--truncate"])
    report = capsys.readouterr().out
    assert rc == 0 and "val_bpb" in report and "coverage truncate" in report


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pgolf eval: error")]
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_artifact_is_a_one_line_format_error(artifact, val_dir, sp1024, tmp_path, capsys, damage):
    data = bytearray(artifact.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"not an artifact at all" * 10)
    bad = tmp_path / "bad.pgolf"
    bad.write_bytes(bytes(data))
    rc = main(["eval", str(bad), "--data", str(val_dir), "--tokenizer", str(sp1024)])
    assert rc == 2
    line = one_line_error(capsys)
    assert str(bad) in line
    from pgolf_codec import errors
    assert any(f" {name}:" in line for name, c in vars(errors).items()
               if isinstance(c, type) and issubclass(c, errors.FormatError))


def test_token_beyond_vocab_is_a_clear_error(artifact, tmp_path, sp1024, capsys):
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "fineweb_val_000000.bin", np.array([1, 5, 9, 1500, 7], np.uint16))
    rc = main(["eval", str(artifact), "--data", str(d), "--tokenizer", str(sp1024)])
    assert rc == 2
    line = one_line_error(capsys)
    assert "ShardError" in line and "fineweb_val_000000.bin" in line and "1500" in line and "1024" in line


def test_benchmark_runs_tiny(tmp_path, artifact, val_dir, sp1024):
    import importlib.util

    from .conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("eval_bench", REPO_ROOT / "benchmarks" / "eval_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--tokens", "512", "--seq-len", "32", "--out", str(out),
                       "--artifact", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024)]) == 0
    d = json.loads(out.read_text())
    assert {"command", "date", "device"} <= set(d) and len(d["speed"]) == len(d["quality"]) == len(bench.modes(32, 512)) == 4
    assert all(r["tokens_per_s"] > 0 for r in d["speed"]) and d["quality"][0]["delta_vs_plain"] == 0


def test_ttt_sweep_runs_tiny(tmp_path, artifact, val_dir, sp1024):
    import importlib.util

    from .conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("ttt_sweep", REPO_ROOT / "benchmarks" / "ttt_sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sweep.json"
    assert bench.main(["--artifact", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024),
                       "--variants", "ref,lr3e-3_all_c64,best", "--device", "cpu", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    rows = {r["variant"]: r for r in d["rows"]}
    assert {"command", "date", "device"} <= set(d) and list(rows) == ["plain", "sliding s=4", "ref", "lr3e-3_all_c64", "best"]
    assert rows["sliding s=4"]["delta_vs_sliding"] == 0 and rows["ref"]["setting"]["chunk"] == 16  # the context
    assert rows["lr3e-3_all_c64"]["ttt"]["adapted_modules"] == 6 * rows["ref"]["ttt"]["adapted_modules"] // 2
    old = TTTConfig(**{**bench.OLD, "chunk": 16})  # the evaluator's first default, in a 16-token context
    for name, kw in (("plain", {}), ("sliding s=4", {"stride": 4}), ("ref", {"ttt": old}), ("best", {"ttt": "lora"})):
        api = evaluate_artifact(artifact, val_dir, sp1024, log=None, **kw)
        assert rows[name]["val_bpb"] == pytest.approx(api.val_bpb, rel=1e-6), name
    with pytest.raises(SystemExit):
        bench.main(["--artifact", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024),
                    "--variants", "nope", "--out", str(out)])


def test_ttt_says_how_much_it_adapted_and_shows_length_buckets(artifact, val_dir, sp1024, capsys):
    """The last line of a TTT report states the adapted share; JSON carries buckets, the interval and
    the per-document rows; a budget too small to adapt is a warning, with every token still scored."""
    base = ["eval", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024), "--ttt", "lora",
            "--ttt-chunk", "8", "--ttt-rank", "2"]
    assert main(base + ["--time-budget", "1000000", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["extra"]["ttt"]["adapted_fraction"] == 1.0 and d["extra"]["ttt"]["warmup_s"] is not None
    assert [b["bucket"] for b in d["docs"]["buckets"]] == ["<512", "512-2K", "2K-8K", ">=8K"]
    assert d["docs"]["bpb_ci95"][0] < d["val_bpb"] < d["docs"]["bpb_ci95"][1]
    assert sum(d["per_doc"]["bytes"]) == d["bytes"]
    assert main(base + ["--time-budget", "0.001"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("WARNING: TTT adapted") and "time budget" in lines[-1]
    assert any(line.startswith("<512") for line in lines) and f"tokens        {d['tokens']:,}" in "\n".join(lines)


def test_ngram_tilt_from_the_command_line(artifact, val_dir, sp1024, tmp_path, capsys):
    """`pgolf eval --ngram-tilt` equals the API's tilted evaluation, and its report says what the tilt
    touched, with --ttt too; a setting out of range is refused by the parser."""
    from pgolf_eval.ngram import NgramTilt

    base = ["eval", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024)]
    out = tmp_path / "t.json"
    assert main(base + ["--ngram-tilt", "--ngram-order", "4", "--ngram-min-count", "2", "--ngram-scope", "doc",
                        "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "n-gram tilt   order 4 threshold 0.8 boost 2.625 min-count 2 scope doc" in report
    api = evaluate_artifact(artifact, val_dir, sp1024, tilt=NgramTilt(order=4, min_count=2, scope="doc"), log=None)
    written = json.loads(out.read_text())
    assert written["val_bpb"] == pytest.approx(api.val_bpb, rel=1e-9) and written["extra"]["tilt"]["min_count"] == 2
    assert main(base + ["--ngram-tilt", "--ttt", "lora", "--ttt-chunk", "8"]) == 0
    report = capsys.readouterr().out
    assert "n-gram tilt   order 16" in report and "ttt           lora" in report
    with pytest.raises(SystemExit):
        main(base + ["--ngram-tilt", "--ngram-threshold", "1.5"])
