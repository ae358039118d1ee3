"""The ablation arms of benchmarks/h200_ablation.sh are valid `h200` overrides (a typo would cost a
device call), each changes the config, and the shell helper prints them as `--set` arguments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgolf_train.build import count_params
from pgolf_train.config import load_config

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
from ablation_arms import ARMS, set_args, vocab  # noqa: E402


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_is_a_valid_h200_override_that_changes_it(arm):
    base = load_config("h200", [])
    cfg = load_config("h200", ARMS[arm])
    changed = {k for k, v in cfg.to_dict().items() if base.to_dict()[k] != v}
    keys = {kv.split("=")[0] for kv in ARMS[arm]}
    assert changed <= keys and (bool(changed) == (arm != "ref"))  # a key may restate h200's value (a shape's depth)
    assert count_params(cfg) > 0  # the model builds (on the meta device) within its limits


def test_recipes_survive_the_shell():
    """The runner expands the --set list unquoted under `set -f`: a recipe's '*' and ';' reach pgolf intact."""
    recipe = next(kv for kv in ARMS["lowbit_ternary"] if kv.startswith("recipe="))
    out = subprocess.run(["bash", "-c", f'set -f; sets=$({sys.executable} {BENCH / "ablation_arms.py"} lowbit_ternary); '
                          'printf "%s\\n" $sets'], capture_output=True, text=True, cwd=BENCH)
    assert recipe in out.stdout.splitlines(), out.stdout


def test_the_shell_gets_set_arguments_and_a_clear_error():
    out = subprocess.run([sys.executable, str(BENCH / "ablation_arms.py"), "bigram"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == set_args("bigram") == [
        "--set", "bigram_buckets=4096", "--set", "bigram_dim=128"]
    bad = subprocess.run([sys.executable, str(BENCH / "ablation_arms.py"), "bigrm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown arm 'bigrm'" in bad.stderr and "Traceback" not in bad.stderr


def test_vocab_arms_name_their_vocabulary():
    assert vocab("ref") == 4096 and vocab("vocab2048") == 2048 and vocab("vocab8192") == 8192
    out = subprocess.run([sys.executable, str(BENCH / "ablation_arms.py"), "--vocab", "vocab8192"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "8192"


def test_the_arms_table_shows_a_qat_models_as_trained_score(capsys):
    """A model trained under QAT from step 0 is scored by its fake-quant forward: its float weights
    alone (3.66 for the ternary arm) are not what it learned, so the table's pre-quant column takes
    the as-trained score, marked q; a model without QAT keeps its float score."""
    from archs_collect import print_arms

    tie = {"delta": 0.0, "ci95": [0.0, 0.0], "verdict": "tie"}
    row = {"steps": 10, "ms_per_step": 1.0, "val_bpb_plain": 1.6936, "val_bpb_sliding": 1.6558, "artifact_bytes": 1,
           "sliding_vs_h200": {"overall": tie, "buckets": [{"bucket": "<512", **tie}]}}
    print_arms([{**row, "arm": "qat", "val_bpb_prequant": 3.6604, "val_bpb_qat": 1.6936},
                {**row, "arm": "float", "val_bpb_prequant": 1.5803, "val_bpb_qat": None}])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("qat", "float"))]
    assert "1.6936q" in lines[0] and "3.6604" not in lines[0]
    assert "1.5803 " in lines[1]


def _fake_run(d: Path, argv: list[str], losses: list[float]) -> Path:
    """A run directory as the runner leaves it: report.json with per-document evals, train_summary.json."""
    import json

    d.mkdir()
    per_doc = {"length": [300, 1000, 4000, 9000], "tokens": [300, 1000, 4000, 9000],
               "bytes": [900, 3000, 12000, 27000], "loss": losses}
    ev = {"val_bpb": 1.6, "per_doc": per_doc}
    (d / "report.json").write_text(json.dumps({
        "argv": argv, "params": 10, "steps": 100, "train_seconds": 300.0, "tokens_seen": 1000,
        "val_bpb_prequant": 1.6, "val_bpb_qat": None, "evals": {"plain": ev, "sliding": ev},
        "artifact_bytes": 5, "code_bytes": 1, "challenge": {"total_bytes": 6}, "git_commit": "c" * 40}))
    (d / "train_summary.json").write_text(json.dumps({"final_train_loss": 2.0}))
    return d


def test_the_collector_records_what_each_run_ran_not_todays_table(tmp_path, capsys):
    """Overrides come from each run's argv: a run whose arm was since removed (lowbit_int4, now h200)
    or changed still collects, with what it ran; the runner's budget and TTT switch are not the arm's."""
    from ablation_collect import main as collect

    runner = ["--set", "max_wallclock_seconds=300", "--set", "eval_ttt="]
    ref = _fake_run(tmp_path / "ref", ["run", "--config", "h200", *runner, "--set", "val_loss_every=500"],
                    [600.0, 2000.0, 8000.0, 18000.0])
    gone = _fake_run(tmp_path / "gone", ["run", "--config", "h200", "--set", "num_layers=12", "--set", "qat_start=0",
                                         *runner], [590.0, 1990.0, 7990.0, 17990.0])
    changed = _fake_run(tmp_path / "l13", ["run", "--config", "h200", "--set", "model_dim=512", "--set",
                                           "num_layers=13", *runner], [600.0, 2000.0, 8000.0, 18000.0])
    out = collect(["--run", f"ref={ref}", "--run", f"lowbit_int4={gone}", "--run", f"lowbit_int4_l13={changed}",
                   "--budget", "300", "--code-commit", "x", "--out", str(tmp_path / "r.json")])
    rows = {r["arm"]: r for r in out["arms"]}
    assert rows["ref"]["overrides"] == ["val_loss_every=500"]
    assert rows["lowbit_int4"]["overrides"] == ["num_layers=12", "qat_start=0"]
    assert rows["lowbit_int4_l13"]["overrides"] == ["model_dim=512", "num_layers=13"]
    assert rows["lowbit_int4"]["plain_vs_h200"]["overall"]["delta"] < 0
    assert "lowbit_int4_l13: ran with" in capsys.readouterr().err  # today's arm differs: said, not hidden
    with pytest.raises(SystemExit, match="expected ARM=RUNDIR"):
        collect(["--run", "ref", "--budget", "300", "--code-commit", "x", "--out", str(tmp_path / "r2.json")])


@pytest.mark.parametrize("arm", ["h200_int7", "vocab8192", "vocab8192_b6", "emb_int5", "body_int6", "bigger_alloc"])
def test_the_arms_written_for_the_int7_h200_keep_its_optimizer(arm):
    """These arms' results are of the int7 h200, which trained without QAT and without Muon's weight
    decay; h200 took both later, so each arm must switch both back off to keep its name's meaning."""
    cfg = load_config("h200", ARMS[arm])
    assert cfg.muon_weight_decay == 0.0 and cfg.qat_start == 1.0
    assert load_config("h200", ARMS["no_muon_wd"]).muon_weight_decay == 0.0 < load_config("h200", []).muon_weight_decay
