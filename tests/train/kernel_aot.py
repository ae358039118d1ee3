"""The trainer's Triton kernels compiled ahead of time for Hopper (sm_90) on a machine without a GPU:
Triton's front end, its GPU passes and the ptxas it ships all run on the CPU. This catches what the
interpreter cannot: a kernel that does not compile (a block size no longer a ``tl.constexpr``, a
helper Triton cannot inline, a type error in the GPU lowering) before a GPU run does.

``AOT_SCRIPT`` runs in a fresh interpreter (Triton must be imported compiled, not interpreted): it
compiles every kernel at the ``h200`` shapes' constants, both branches of each constexpr switch,
and prints one ``AOT <kernel> <constants> <bytes of cubin>`` line per compile, then ``AOT OK``.
"""
from __future__ import annotations

AOT_SCRIPT = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from pgolf_train import fused, fused_attn as fa

fa._kernel(fa._xsa_fwd)  # jits the helpers the attention kernels call, into the module's globals
FP32 = {"rstd_ptr", "dg_ptr", "g_ptr", "cos_ptr", "sin_ptr", "loss_ptr"}  # float32 tensors; the rest bf16
CASES = [(fused._softcap_ce_rows, {"BLOCK": 4096, "ONE_BLOCK": True}),
         (fused._softcap_ce_rows, {"BLOCK": 8192, "ONE_BLOCK": False})]
for gain in (True, False):
    for fn in (fa._qk_fwd, fa._qk_bwd):
        CASES.append((fn, {"HAS_GAIN": gain, "BLOCK_R": 32, "BLOCK_D": 64, "BLOCK_H": 32}))
for g in (1, 2):
    for fn in (fa._xsa_fwd, fa._xsa_bwd):
        CASES.append((fn, {"G": g, "BLOCK_R": 32, "BLOCK_D": 64}))
target = GPUTarget("cuda", 90, 32)
for fn, consts in CASES:
    jf = JITFunction(fn)
    missing = sorted(set(consts) - {p.name for p in jf.params if p.is_constexpr})
    assert not missing, f"{fn.__name__}: not constexpr: {missing}"
    sig = {}
    for p in jf.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name == "targets_ptr":
            sig[p.name] = "*i64"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32" if p.name in FP32 else "*bf16"
        else:
            sig[p.name] = "fp32" if p.name in ("eps", "softcap", "grad_scale") else "i32"
    src = ASTSource(jf, sig, constexprs={(jf.arg_names.index(n),): v for n, v in consts.items()})
    k = triton.compile(src, target=target)
    print("AOT", fn.__name__, consts, len(k.asm["cubin"]))
print("AOT OK", len(CASES))
'''
