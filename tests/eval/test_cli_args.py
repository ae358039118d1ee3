"""`pgolf eval`: every numeric flag and --device are checked before the artifact is read, naming the flag."""
from __future__ import annotations

import pytest
import torch

from pgolf.cli import main


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as a CPU-only torch build sees it, whatever the test machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)


def base(artifact, val_dir, sp1024) -> list[str]:
    return ["eval", str(artifact), "--data", str(val_dir), "--tokenizer", str(sp1024)]


@pytest.mark.parametrize("flag, value, rule", [
    ("--max-tokens", "-10", "must be an integer >= 2"),  # once scored all but the last 10 tokens
    ("--max-tokens", "1", "must be an integer >= 2"),
    ("--batch-tokens", "0", "must be an integer >= 1"),
    ("--seq-len", "0", "must be an integer >= 1"),
    ("--stride", "-4", "must be an integer >= 1"),
    ("--rope-factor", "0", "must be a number > 0"),
    ("--time-budget", "inf", "must be a finite number"),
    ("--ttt-lr", "nan", "must be a finite number"),
    ("--ttt-rank", "0", "must be an integer >= 1"),
    ("--ttt-chunk", "0", "must be an integer >= 1"),
    ("--ttt-epochs", "-1", "must be an integer >= 0"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, flag, value, rule, capsys):
    missing = tmp_path / "none.pgolf"  # never opened: the flags fail first
    with pytest.raises(SystemExit) as e:
        main(["eval", str(missing), "--data", str(tmp_path), "--tokenizer", "t.model", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {rule}, got '{value}'" in capsys.readouterr().err


def test_stride_longer_than_the_window_is_refused(artifact, val_dir, sp1024, capsys):
    assert main(base(artifact, val_dir, sp1024) + ["--seq-len", "16", "--stride", "32"]) == 2
    assert "--stride 32: must be at most --seq-len (16)" in capsys.readouterr().err


def test_max_tokens_scores_exactly_that_prefix(artifact, val_dir, sp1024, capsys):
    assert main(base(artifact, val_dir, sp1024) + ["--max-tokens", "100", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["tokens"] == 99  # 100 tokens: 99 predicted targets


def test_cuda_on_a_cpu_only_torch_is_a_clear_error(artifact, val_dir, sp1024, no_cuda, capsys):
    assert main(base(artifact, val_dir, sp1024) + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device available" in err and "built without CUDA" in err
    assert "AssertionError" not in err and "Traceback" not in err
    assert main(base(artifact, val_dir, sp1024) + ["--device", "tpu7"]) == 2
    assert "--device 'tpu7': not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
