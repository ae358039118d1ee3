"""The codec's Triton kernels (pgolf_codec/gpu.py) compiled for sm_90 without a GPU (``tests.aot``):
``AOT_SCRIPT`` compiles each at the constants the host code picks for the schemes the configs use,
then prints ``AOT OK <compiles>``."""
from __future__ import annotations

from ..aot import AOT_HELPER

AOT_SCRIPT = AOT_HELPER + r'''
from pgolf_codec import gpu, schemes

assert gpu._triton()  # wraps the kernels and their helpers (compiled: TRITON_INTERPRET=0)
T = {"payload_ptr": "*u8", "scales_ptr": "*fp32", "zeros_ptr": "*u8"}
SYM, BIN, TER, ASYM = gpu.KIND_SYM, gpu.KIND_BINARY, gpu.KIND_TERNARY, gpu.KIND_ASYM
n = 0
# generic dequant: (FIELD, BITS, KIND, GROUP, WIDE, BLOCK_R, BLOCK_C, out)
for field, bits, kind, group, wide, br, bc, out in [(0, 2, TER, 0, False, 8, 512, "*bf16"),
                                                    (5, 5, SYM, 64, True, 1, 4096, "*fp32"),
                                                    (8, 8, ASYM, 0, False, 4, 1024, "*fp16")]:
    n += 1
    compile_sm90(gpu._dequant_kernel, dict(FIELD=field, BITS=bits, KIND=kind, GROUP=group, OUT_BF16_SW=False,
                                           WIDE=wide, BLOCK_R=br, BLOCK_C=bc), {**T, "out_ptr": out})
# 8-code chunks: (FIELD, BITS, KIND, WORD, GROUP, HALVES, out); BR x UC = the host's 512 chunks
for field, bits, kind, word, group, halves, out in [(4, 4, SYM, 1, 0, False, "*bf16"),
                                                    (4, 4, SYM, 2, 64, True, "*fp32"),
                                                    (1, 1, BIN, 1, 0, True, "*fp32"),
                                                    (6, 6, ASYM, 2, 0, True, "*fp32"),
                                                    (8, 8, SYM, 1, 0, False, "*fp16")]:
    n += 1
    compile_sm90(gpu._dequant_chunk_kernel, dict(FIELD=field, BITS=bits, KIND=kind, WORD=word, GROUP=group,
                                                 OUT_BF16_SW=False, HALVES=halves, WIDE=False, BR=8, UC=64),
                 {**T, "out_ptr": out}, num_warps=gpu._CHUNK_WARPS)
# fake-quant under given scales (int4:mse, h200's QAT, takes this path): (BITS, KIND, GROUP, w)
for bits, kind, group, w in [(4, SYM, 0, "*bf16"), (6, SYM, 64, "*fp32"), (2, TER, 0, "*bf16"), (4, ASYM, 0, "*fp16")]:
    n += 1
    compile_sm90(gpu._fake_quant_kernel, dict(BITS=bits, KIND=kind, GROUP=group, OUT_BF16_SW=False, WIDE=False,
                                              BLOCK_R=8, BLOCK_C=512), {**T, "w_ptr": w, "out_ptr": w}, num_warps=8)
# fake-quant with the clip statistic in registers: (BITS, KIND, GROUP, STAT, scale dtype, BR, BC, w, lo/hi)
for bits, kind, group, stat, sd, br, bc, w, lohi in [(4, SYM, 0, 0, "fp16", 4, 512, "*bf16", "*bf16"),
                                                     (6, SYM, 64, 1, "bf16", 32, 64, "*fp32", "*fp32"),
                                                     (4, ASYM, 0, 1, "fp16", 2, 1024, "*bf16", "*fp32")]:
    n += 1
    lo, hi = schemes._SCALE_RANGE[sd]
    compile_sm90(gpu._fake_quant_rows_kernel,
                 dict(BITS=bits, KIND=kind, GROUP=group, STAT=stat, SCALE_BF16=sd == "bf16", SCALE_LO=lo, SCALE_HI=hi,
                      OUT_BF16_SW=False, WIDE=False, BR=br, BC=bc),
                 {"w_ptr": w, "out_ptr": w, "lo_ptr": lohi, "hi_ptr": lohi}, num_warps=4, enable_fp_fusion=False)
print("AOT OK", n)
'''
