"""The codec's Triton kernels (pgolf_codec/gpu.py: the device dequantizers and the QAT fake-quant
that every ``h200`` training step runs) compile for the H200's sm_90 here, without a GPU
(``kernel_aot``), at the constants the host code picks for the schemes the configs use: ternary,
binary, int4/int6/int8, asymmetric, per-row and grouped scales, bf16/fp16/fp32 outputs."""
from __future__ import annotations

import pytest

from ..aot import compile_all
from .kernel_aot import AOT_SCRIPT


def test_codec_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    cubins = compile_all(AOT_SCRIPT)
    assert len(cubins) == 15 and all(b > 1000 for b in cubins)  # a cubin came out of each
