#!/usr/bin/env bash
# FlashAttention 4 (CuTe DSL) on a lent H200, whose image lacks it: benchmarks/fa4_probe.py.
# Its unpacked wheels (257 MB) are 71 MB xz-compressed, over one call's 64 MiB, so they travel in
# two calls to the same warm machine (it is released 30 s after a call):
#   STAGE=a  carry .whl/fa4a: the CuTe DSL's MLIR library (_cutlass_ir.cu13...so, 193 MB; 52 MB xz)
#   STAGE=b  carry .whl/fa4b: the rest of the unpacked wheels (a tar, 19 MB xz); runs the probe
# Make them here: pip download (no deps) flash-attn-4==4.0.0b40 quack-kernels==0.6.5
# nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-{core,base,cu13}==4.8.1
# apache-tvm-ffi torch-c-dlpack-ext for cp312 manylinux_2_28_x86_64, unzip all into one folder,
# xz the MLIR library alone into .whl/fa4a/cutlass_ir.cu13.so.xz and the rest into .whl/fa4b/fa4-rest.tar.xz.
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# A folder named site-packages: quack fingerprints its epilogue functions for its kernel cache and
# stops at installed code by that name; unpacked anywhere else it walks into the CuTe DSL's own
# globals and refuses one (a ContextVar) it cannot key.
site=/tmp/fa4/site-packages
lib=$site/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs
case "${STAGE:?STAGE=a or b}" in
  a) mkdir -p "$lib"
     xz -dc .whl/fa4a/cutlass_ir.cu13.so.xz > "$lib/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so"
     ls -la "$lib" | tee "$OUT/stage_a.log" ;;
  b) source benchmarks/cute_env.sh
     probe=${PROBE:-benchmarks/fa4_probe.py}  # or benchmarks/quack_mlp_probe.py (the same wheels)
     name=$(basename "$probe" .py)
     timeout ${PROBE_TIMEOUT:-420} python3 "$probe" --out "$OUT/${name}_h200.json" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/$name.log" ;;
esac
