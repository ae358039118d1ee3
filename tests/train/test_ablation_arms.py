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
from ablation_arms import ARMS, set_args  # noqa: E402


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_is_a_valid_h200_override_that_changes_it(arm):
    base = load_config("h200", [])
    cfg = load_config("h200", ARMS[arm])
    changed = {k for k, v in cfg.to_dict().items() if base.to_dict()[k] != v}
    assert changed == {kv.split("=")[0] for kv in ARMS[arm]}  # ref: nothing
    assert count_params(cfg) >= count_params(base)  # no arm removes parameters


def test_the_shell_gets_set_arguments_and_a_clear_error():
    out = subprocess.run([sys.executable, str(BENCH / "ablation_arms.py"), "bigram"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == set_args("bigram") == [
        "--set", "bigram_buckets=4096", "--set", "bigram_dim=128"]
    bad = subprocess.run([sys.executable, str(BENCH / "ablation_arms.py"), "bigrm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown arm 'bigrm'" in bad.stderr and "Traceback" not in bad.stderr
