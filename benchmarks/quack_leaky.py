"""LeakyReLU(0.5)² as an activation of quack's fused GEMMs (CuTe DSL), for the probes.

quack (``quack-kernels``) ships relu² but not h200's LeakyReLU(0.5)². ``register()`` adds
``"leaky_relu_sq"`` to its activation tables: the epilogue's forward f(x) = max(x, x/2)², and its
backward (``gemm_dact``: dout·f'(x) and f(x) recomputed from the stored pre-activation), with
f'(x) = 2·max(x, x/4) (2x above zero, x/2 below). Both are max-and-multiply only, so the
epilogue stays one FMNMX and a few FMULs per element, as relu²'s does.

Importing this module needs quack and the CuTe DSL (a CUDA machine with the wheels, see
``fa4_probe.sh``); nothing in pgolf imports it.
"""
from __future__ import annotations

import torch.nn.functional as F
from cutlass import Float32, const_expr
from cutlass._mlir.dialects import arith
from cutlass.cutlass_dsl import dsl_user_op

NAME = "leaky_relu_sq"


@dsl_user_op
def _max_scaled(x, s: float, *, loc=None, ip=None):
    """max(x, s·x) for one fp32 value (s < 1): the leaky ramp with slope s below zero."""
    return Float32(arith.maxnumf(Float32(x).ir_value(loc=loc, ip=ip),
                                 Float32(x * s).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))


@dsl_user_op
def leaky_relu_sq(x, *, loc=None, ip=None):
    """max(x, x/2)² of an fp32 value or a pair of them (quack's packed F32x2)."""
    if const_expr(not isinstance(x, tuple)):
        y = _max_scaled(x, 0.5, loc=loc, ip=ip)
        return y * y
    return leaky_relu_sq(x[0], loc=loc, ip=ip), leaky_relu_sq(x[1], loc=loc, ip=ip)


@dsl_user_op
def dleaky_relu_sq(x, dout, *, loc=None, ip=None):
    """(dout · f'(x), f(x)) for f = leaky_relu_sq; x and dout both scalars or both pairs."""
    if const_expr(not isinstance(x, tuple)):
        y = _max_scaled(x, 0.5, loc=loc, ip=ip)
        return 2.0 * (dout * _max_scaled(x, 0.25, loc=loc, ip=ip)), y * y
    a = dleaky_relu_sq(x[0], dout[0], loc=loc, ip=ip)
    b = dleaky_relu_sq(x[1], dout[1], loc=loc, ip=ip)
    return (a[0], b[0]), (a[1], b[1])


def register() -> str:
    """Add ``"leaky_relu_sq"`` to quack's activation tables (idempotent); returns the name."""
    from quack import activation, gemm_interface

    activation.act_fn_map[NAME] = leaky_relu_sq
    activation.dact_fn_map[NAME] = dleaky_relu_sq
    gemm_interface.act_to_pytorch_fn_map[NAME] = lambda x: F.leaky_relu(x, 0.5).square()
    return NAME
