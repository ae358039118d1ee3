"""SIGTERM unwinds a command like Ctrl-C: what it was replacing survives, its half-made outputs go."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pgolf_train.prepare import check, prepare

REPO = Path(__file__).resolve().parents[2]

# `pgolf data prepare --force` that receives SIGTERM as it writes the first shard (two workers, so
# the tokenizer pool is torn down too).
_KILLED_PREPARE = textwrap.dedent("""
    import os, signal, sys
    import pgolf_train.prepare as prep
    from pgolf.cli import main

    real = prep.ShardWriter.add
    def add(self, tokens):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, tokens)
    prep.ShardWriter.add = add
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_prepare_keeps_the_previous_dataset(tmp_path, fineweb_docs, sp1024):
    out = tmp_path / "d"
    prepare([fineweb_docs], out, vocab=1024, val_docs=5, tokenizer=sp1024, workers=1, max_docs=30)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, "data", "prepare", "--docs", str(fineweb_docs),
                           "--vocab", "1024", "--tokenizer", str(sp1024), "--val-docs", "3", "--out", str(out),
                           "--force", "--workers", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert "pgolf: terminated" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the staging directory is gone
    assert check(out, sp1024)["ok"]


def test_forked_workers_keep_the_default_sigterm():
    """A pool worker blocked in C must still die when the pool terminates it."""
    import multiprocessing as mp
    import signal

    from pgolf.cli import _sigterm_unwinds

    with _sigterm_unwinds():
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        with mp.get_context("fork").Pool(1) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
