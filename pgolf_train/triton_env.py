"""Triton for the trainer's kernels (``pgolf_train.fused``, ``pgolf_train.fused_attn``): whether a
kernel runs on a tensor, and how a kernel is jitted.

Evaluation and CPU training need no Triton: without it ``triton`` and ``tl`` are None and every
kernel's wrapper runs torch ops instead. On the CPU the kernels run only when Triton was imported
under ``TRITON_INTERPRET=1`` (the tests): Triton's own library functions (tl.sum, tl.max) are
interpreted or compiled from that moment on, so each kernel is jitted in that same mode, whatever
the environment says when it is first used.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # evaluation and CPU training need no Triton
    triton = tl = None

_JITTED: dict[Callable, Any] = {}


def interpreter() -> bool:
    """Whether Triton was imported interpreted (``TRITON_INTERPRET=1``)."""
    return triton is not None and type(tl.standard.sum).__name__ == "InterpretedFunction"


def use_triton(t: Tensor) -> bool:
    """Whether the kernels run on ``t``: a CUDA tensor with Triton installed, or a CPU tensor with
    Triton interpreting."""
    return triton is not None and (t.is_cuda or (t.device.type == "cpu" and interpreter()))


def jit(fn: Callable) -> Any:
    """``triton.jit(fn)``, made once per function at first use, in the mode Triton was imported in."""
    if fn not in _JITTED:
        with _env("TRITON_INTERPRET", "1" if interpreter() else "0"):
            _JITTED[fn] = triton.jit(fn)
    return _JITTED[fn]


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old
