"""Every Triton kernel of the trainer (pgolf_train.fused, pgolf_train.fused_attn) compiles for the
H200's sm_90 here, without a GPU (``kernel_aot``): the GPU tests run them; this keeps a change that
breaks their compilation from waiting for a GPU to show it."""
from __future__ import annotations

import pytest

from ..aot import compile_all
from .kernel_aot import AOT_SCRIPT


def test_trainer_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    cubins = compile_all(AOT_SCRIPT)
    assert len(cubins) == 10 and all(b > 1000 for b in cubins)  # a cubin came out of each
