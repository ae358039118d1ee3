"""`pgolf train` and `pgolf quantize`: bad settings fail up front, naming the key or flag and its range."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgolf.cli import main as pgolf
from pgolf_train.config import ConfigError, load_config
from pgolf_train.model import GPT, GPTConfig

from .train_fixtures import train_command as train_main


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as a CPU-only torch build sees it, whatever the test machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)


# --- the config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("matrix_lr=inf", "matrix_lr = inf: must be a finite number"),  # once passed and trained NaN
    ("scalar_lr=nan", "scalar_lr = nan: must be a finite number"),
    ("max_wallclock_seconds=inf", "max_wallclock_seconds = inf: must be a finite number"),
    ("rope_base=-inf", "rope_base = -inf: must be a finite number"),  # a model field too
    ("embed_lr=1e6", "embed_lr = 1000000.0: must be in [0, 10]"),
    ("adam_eps=0", "adam_eps = 0.0: must be in (0, 1]"),
    ("recipe=*=int99", "recipe = '*=int99': QuantSpec.parse: unknown scheme 'int99'"),
    ("recipe=*.weight", "is not PATTERN=SCHEME"),
    ("recipe=missing.toml", "recipe file not found: missing.toml"),
    ("coder=zip", "coder = 'zip': unknown coder 'zip'"),
])
def test_config_rejects_non_finite_out_of_range_and_unparsable_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value)


def test_every_float_field_of_every_named_config_is_finite():
    import dataclasses
    import math

    for path in sorted((Path(__file__).resolve().parents[2] / "pgolf_train" / "configs").glob("*.toml")):
        cfg = load_config(path.stem)
        assert all(math.isfinite(v) for v in dataclasses.asdict(cfg).values() if isinstance(v, float))


def test_dry_run_rejects_a_bad_recipe(capsys):
    assert train_main(["--config", "tiny", "--dry-run", "--set", "recipe=*=int99"]) == 2
    assert "recipe = '*=int99'" in capsys.readouterr().err
    assert train_main(["--config", "tiny", "--dry-run", "--matrix_lr=inf"]) == 2
    assert "matrix_lr = inf: must be a finite number" in capsys.readouterr().err


def test_train_on_cuda_without_cuda_is_a_clear_error(no_cuda, tmp_path, capsys):
    out = tmp_path / "run"
    rc = pgolf(["train", "--config", "tiny", "--device", "cuda", "--data", str(tmp_path), "--tokenizer", "t.model",
                "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "device cuda: no CUDA device available (torch" in err and "built without CUDA" in err
    assert not out.exists()  # nothing done before the check


# --- pgolf quantize -----------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path) -> Path:
    cfg = dict(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=32)
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(GPT(GPTConfig(**cfg)).state_dict(), path)
    (tmp_path / "train_summary.json").write_text(json.dumps({"config": cfg}))
    return path


@pytest.fixture
def no_calibration(monkeypatch):
    """Calibration is the expensive first stage: these checks must all come before it."""
    import pgolf_train.calibrate

    def refuse(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(pgolf_train.calibrate, "calibrate", refuse)


def quantize_args(checkpoint: Path, *extra: str) -> list[str]:
    return ["quantize", str(checkpoint), "--data", str(checkpoint.parent), "--tokenizer", "t.model",
            "-o", str(checkpoint.parent / "out.pgolf"), *extra]


@pytest.mark.parametrize("flag, value, rule", [
    ("--budget", "-5", "must be an integer >= 1"),  # once failed after a minute of calibration ("got -7442")
    ("--budget", "0", "must be an integer >= 1"),
    ("--calib-tokens", "0", "must be an integer >= 1"),
    ("--calib-seconds", "-1", "must be a number > 0"),
    ("--calib-batch", "0", "must be an integer >= 1"),
    ("--group", "-1", "must be an integer >= 0"),
    ("--tolerance", "nan", "must be a finite number"),
    ("--val-tokens", "-10", "must be an integer >= 2"),
    ("--bits", "4,9", "must be an integer in [1, 8], got '9'"),
    ("--clips", "8,-1", "must be a number > 0, got '-1'"),
])
def test_quantize_flags_out_of_range_are_usage_errors(checkpoint, flag, value, rule, capsys):
    with pytest.raises(SystemExit) as e:
        pgolf(quantize_args(checkpoint, flag, value))
    assert e.value.code == 2
    assert f"argument {flag}: {rule}" in capsys.readouterr().err


def test_quantize_budget_below_the_fixed_bytes_fails_before_calibration(checkpoint, no_calibration, capsys):
    assert pgolf(quantize_args(checkpoint, "--budget", "1000", "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert "--budget 1,000: below the" in err and "before any matrix is stored" in err


def test_quantize_bad_coder_and_cuda_fail_before_calibration(checkpoint, no_calibration, no_cuda, capsys):
    assert pgolf(quantize_args(checkpoint, "--coder", "zip")) == 2
    assert "--coder: unknown coder 'zip'" in capsys.readouterr().err
    assert pgolf(quantize_args(checkpoint, "--device", "cuda")) == 2
    assert "--device cuda: no CUDA device available" in capsys.readouterr().err
