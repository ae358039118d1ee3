"""``fused=mlp``: the MLP's activation inside its GEMMs (quack's CuTe DSL kernels, Hopper and newer).

Compiled, the reference MLP is two cuBLAS GEMMs with the activation between them as inductor
kernels: forward one pass that reads h = x·W1ᵀ and writes act(h), backward one that reads h and
d act and writes d h (806 MB and 1.21 GB per ``h200`` layer, at the copy bandwidth). Here the first
GEMM's epilogue writes h and act(h) from its accumulator, and the backward's d act = dy·W2 GEMM
multiplies by act'(h) in its epilogue (``quack.mlp.mlp_func``): those passes are gone.

quack has relu² but not LeakyReLU(0.5)²; ``_register`` adds it to its tables as ``leaky_relu_sq``:
f(x) = max(x, x/2)², f'(x) = 2·max(x, x/4), max-and-multiply only, as relu²'s epilogue is.
The epilogue applies f to the fp32 accumulator (the reference applies it to h rounded to bf16),
and the backward reads the stored bf16 h: bf16-rounding differences, no more.

quack (``quack-kernels``, with ``nvidia-cutlass-dsl``) is optional: ``unavailable()`` names why it
cannot run here, the trainer refuses ``mlp`` with that reason, and without it (or off CUDA) the
module runs the model's own ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf_train.device import hopper_kernels_unavailable
from pgolf_train.model import MLP, _activation, _weight

QUACK_ACT = {True: "leaky_relu_sq", False: "relu_sq"}  # MLP.leaky → quack's activation name


def _register() -> None:
    """Add ``leaky_relu_sq`` (forward and backward epilogue math) to quack's activation tables."""
    import torch.nn.functional as F
    from cutlass import Float32, const_expr
    from cutlass._mlir.dialects import arith
    from cutlass.cutlass_dsl import dsl_user_op
    from quack import activation, gemm_interface

    @dsl_user_op
    def max_scaled(x, s: float, *, loc=None, ip=None):
        """max(x, s·x) of one fp32 value (s < 1): the leaky ramp, slope s below zero."""
        return Float32(arith.maxnumf(Float32(x).ir_value(loc=loc, ip=ip),
                                     Float32(x * s).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))

    @dsl_user_op
    def leaky_relu_sq(x, *, loc=None, ip=None):
        """max(x, x/2)² of an fp32 value or a pair of them (quack's packed F32x2)."""
        if const_expr(not isinstance(x, tuple)):
            y = max_scaled(x, 0.5, loc=loc, ip=ip)
            return y * y
        return leaky_relu_sq(x[0], loc=loc, ip=ip), leaky_relu_sq(x[1], loc=loc, ip=ip)

    @dsl_user_op
    def dleaky_relu_sq(x, dout, *, loc=None, ip=None):
        """(dout · f'(x), f(x)); x and dout both scalars or both pairs."""
        if const_expr(not isinstance(x, tuple)):
            y = max_scaled(x, 0.5, loc=loc, ip=ip)
            return 2.0 * (dout * max_scaled(x, 0.25, loc=loc, ip=ip)), y * y
        a = dleaky_relu_sq(x[0], dout[0], loc=loc, ip=ip)
        b = dleaky_relu_sq(x[1], dout[1], loc=loc, ip=ip)
        return (a[0], b[0]), (a[1], b[1])

    activation.act_fn_map["leaky_relu_sq"] = leaky_relu_sq
    activation.dact_fn_map["leaky_relu_sq"] = dleaky_relu_sq
    gemm_interface.act_to_pytorch_fn_map["leaky_relu_sq"] = lambda x: F.leaky_relu(x, 0.5).square()


_quack_mlp = None  # quack.mlp.mlp_func once imported: a plain global, which torch.compile reads as a constant


def _mlp_func():
    """quack's fused MLP (forward and backward), LeakyReLU² registered; ImportError without quack."""
    global _quack_mlp
    if _quack_mlp is None:
        from quack.mlp import mlp_func

        _register()
        _quack_mlp = mlp_func
    return _quack_mlp


def unavailable(device: torch.device | str | None = None) -> str | None:
    """None when ``fused=mlp`` can run on ``device`` (default: the current CUDA device), else why not."""
    return hopper_kernels_unavailable(device, "quack's GEMMs", _mlp_func, "quack-kernels")


def mlp_forward(m: MLP, x: Tensor) -> Tensor:
    """``MLP.forward`` with the activation in quack's GEMM epilogues (x [..., C] → [..., C]);
    the model's ops off CUDA or for a dtype quack does not take."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return m.proj(_activation(m.fc(x), m.leaky))
    w1, w2 = _weight(m.fc).to(x.dtype), _weight(m.proj).to(x.dtype)
    f = _quack_mlp if _quack_mlp is not None else _mlp_func()
    y = f(x.reshape(-1, x.size(-1)), w1, w2, activation=QUACK_ACT[m.leaky], tuned=False)
    return y.view(*x.shape[:-1], y.size(-1))


class FusedMLP(MLP):
    """The model's MLP with ``mlp_forward``: the same parameters and state dict."""

    def forward(self, x: Tensor, aux: list | None = None) -> Tensor:
        return mlp_forward(self, x)


def bind(model: torch.nn.Module, on: bool) -> None:
    """Make every MLP of ``model`` a ``FusedMLP`` (``on``) or an ``MLP`` again (an MoE runs its experts'
    weights itself, so its experts are unaffected).

    ``on`` with CUDA here imports quack and registers LeakyReLU² now, before any ``torch.compile``:
    traced inside the compiled forward, the registration is a side effect dynamo replays only after
    the graph has run, so quack's kernels looked ``leaky_relu_sq`` up in tables that lacked it (a
    ``KeyError`` on the H100, 2026-12-07). Where quack cannot run this loads nothing: the trainer
    refuses ``mlp`` with the reason ``unavailable`` gives, and off CUDA the module runs the model's ops."""
    if on:
        unavailable()  # loads quack where it can run; the reason it cannot is the trainer's to report
    for m in model.modules():
        if type(m) in (MLP, FusedMLP):
            m.__class__ = FusedMLP if on else MLP
