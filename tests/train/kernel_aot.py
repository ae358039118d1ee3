"""The trainer's Triton kernels (pgolf_train.fused, pgolf_train.fused_attn) compiled for sm_90
without a GPU (``tests.aot``): ``AOT_SCRIPT`` compiles each at the ``h200`` shapes' constants, both
branches of every constexpr switch, then prints ``AOT OK <compiles>``."""
from __future__ import annotations

from ..aot import AOT_HELPER

AOT_SCRIPT = AOT_HELPER + r'''
from pgolf_train import fused, fused_attn as fa

fa._kernel(fa._xsa_fwd)  # jits the helpers the attention kernels call, into the module's globals
FP32 = {"rstd_ptr", "dg_ptr", "g_ptr", "cos_ptr", "sin_ptr", "loss_ptr"}  # float32 tensors; the rest bf16
TYPES = {**{n: "*fp32" for n in FP32}, "targets_ptr": "*i64", "eps": "fp32", "softcap": "fp32", "grad_scale": "fp32"}
CASES = [(fused._softcap_ce_rows, {"BLOCK": 4096, "ONE_BLOCK": True}),
         (fused._softcap_ce_rows, {"BLOCK": 8192, "ONE_BLOCK": False})]
for gain in (True, False):
    for fn in (fa._qk_fwd, fa._qk_bwd):
        CASES.append((fn, {"HAS_GAIN": gain, "BLOCK_R": 32, "BLOCK_D": 64, "BLOCK_H": 32}))
for g in (1, 2):
    for fn in (fa._xsa_fwd, fa._xsa_bwd):
        CASES.append((fn, {"G": g, "BLOCK_R": 32, "BLOCK_D": 64}))
for fn, consts in CASES:
    compile_sm90(fn, consts, TYPES)
print("AOT OK", len(CASES))
'''
