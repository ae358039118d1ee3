"""`pgolf run` and `pgolf pack`: bad flags and settings fail before any stage runs."""
from __future__ import annotations

import pytest
import torch

from pgolf.cli import main


def test_run_on_cuda_without_cuda_fails_before_the_data_stage(tmp_path, fineweb_docs, sp1024, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    out = tmp_path / "run"
    rc = main(["run", "--config", "tiny", "--docs", str(fineweb_docs), "--val-docs", "20", "--tokenizer", str(sp1024),
               "--out", str(out), "--set", "device=cuda"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "device cuda: no CUDA device available" in err and "built without CUDA" in err
    assert not (out / "data").exists() and not (out / "train").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "--config", "tiny", "--docs", "d.jsonl", "--out", "o", "--val-docs", "0"],
     "argument --val-docs: must be an integer >= 1, got '0'"),
    (["pack", "m.pt", "-o", "m.pgolf", "--max-bytes", "-5"], "argument --max-bytes: must be an integer >= 1, got '-5'"),
])
def test_numeric_flags_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_run_rejects_a_non_finite_setting_before_any_stage(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--config", "tiny", "--data", str(tmp_path), "--tokenizer", "t.model", "--out", str(out),
               "--set", "matrix_lr=inf"])
    assert rc == 2
    assert "matrix_lr = inf: must be a finite number" in capsys.readouterr().err
    assert not (out / "train").exists()
