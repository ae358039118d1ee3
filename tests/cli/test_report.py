"""The report's curves: tokens seen on the x axis (from the trainer's log), and a smoothed train loss."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pgolf_eval.scorer import Scorer
from pgolf.report import curve_series, ema, plot_curves, read_jsonl
from pgolf_train.config import load_config
from pgolf_train.trainer import train
from tests.train.train_fixtures import make_tiny_shards


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fineweb_docs, sp1024):
    base = tmp_path_factory.mktemp("report")
    data = make_tiny_shards(base / "data", fineweb_docs, sp1024)
    cfg = load_config("tiny", ["iterations=20", "val_loss_every=10", "val_max_tokens=2048"])
    train(cfg, data, sp1024, base / "run", scorer=Scorer(), echo=False)
    return cfg, base / "run"


def test_a_tiny_runs_curves_have_increasing_tokens_seen(tiny_run, tmp_path):
    cfg, run = tiny_run
    log = read_jsonl(run / "train.jsonl")
    s = curve_series(log)  # the trainer's records carry the tokens: no fallback needed
    steps, tokens = s["train"]["step"], s["train"]["tokens"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20]  # the first 10, then every train_log_every
    assert tokens == [st * cfg.train_batch_tokens for st in steps]  # once all 0: no tokens field
    assert all(b > a for a, b in zip(tokens, tokens[1:])) and tokens[0] > 0
    assert s["train"]["elapsed"] == sorted(s["train"]["elapsed"])
    # validation at step 10, then the artifact's score at the end (step 20)
    assert s["val"]["tokens"] == [10 * cfg.train_batch_tokens, 20 * cfg.train_batch_tokens]
    assert len(s["train"]["loss_ema"]) == len(s["train"]["loss"])
    assert plot_curves(log, tmp_path) == ["curves.png"] and (tmp_path / "curves.png").stat().st_size > 0


def test_an_older_log_without_tokens_falls_back_to_steps_times_batch():
    log = [{"step": 1, "loss": 6.9, "elapsed": 0.1}, {"step": 5, "loss": 6.0, "elapsed": 0.5},
           {"step": 5, "val_bpb": 3.0, "elapsed": 0.6}, {"event": "checkpoint", "step": 5, "elapsed": 0.6}]
    s = curve_series(log, tokens_per_step=2048)
    assert s["train"]["tokens"] == [2048, 5 * 2048] and s["val"]["tokens"] == [5 * 2048]
    assert all(math.isnan(x) for x in curve_series(log)["train"]["tokens"])  # unknown, not a false 0


def test_the_ema_smooths_noise_and_follows_the_trend():
    rng = np.random.default_rng(0)
    trend = np.linspace(7.0, 4.0, 400)
    raw = trend + rng.normal(0, 0.3, trend.size)
    smooth = np.array(ema(list(raw), span=40))
    assert smooth[0] == pytest.approx(raw[0])  # bias-corrected: no pull toward 0 at the start
    assert np.std(np.diff(smooth)) < 0.1 * np.std(np.diff(raw))
    assert np.abs(smooth[100:] - trend[100:]).max() < 0.5  # lags the trend by ~span/2 points at most
    assert ema([1.0, 2.0, 3.0], span=1) == [1.0, 2.0, 3.0]
