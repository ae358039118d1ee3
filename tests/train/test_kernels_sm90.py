"""Every Triton kernel of the trainer (pgolf_train.fused, pgolf_train.fused_attn) compiles for the
H200's sm_90 here, without a GPU (``kernel_aot``): the GPU tests run them; this keeps a change that
breaks their compilation from waiting for a GPU to show it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .kernel_aot import AOT_SCRIPT


def test_trainer_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("AOT ")]
    assert lines[-1][:2] == ["AOT", "OK"] and int(lines[-1][2]) == len(lines) - 1 == 10
    assert all(int(line[-1]) > 1000 for line in lines[:-1])  # a cubin came out of each
