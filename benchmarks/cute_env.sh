#!/usr/bin/env bash
# Sourced on a lent GPU machine after `STAGE=a bash benchmarks/fa4_probe.sh` ran on it: unpacks the
# rest of the CuTe DSL wheels (carried .whl/fa4b, and .whl/zstandard-*-min.tar.xz) under a folder
# named site-packages (see fa4_probe.sh) and puts them, the checkout and zstandard on PYTHONPATH.
site=/tmp/fa4/site-packages
lib=$site/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs
if [ ! -s "$lib/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so" ]; then
  echo "the CuTe DSL's MLIR library is not here: run STAGE=a bash benchmarks/fa4_probe.sh on this machine first" >&2
  return 3 2>/dev/null || exit 3
fi
[ -d "$site/quack" ] || tar xJf .whl/fa4b/fa4-rest.tar.xz -C "$site"
mkdir -p /tmp/site && tar xJf .whl/zstandard-*-min.tar.xz -C /tmp/site
export PYTHONPATH="$PWD:$site:$site/nvidia_cutlass_dsl/dsl_packages:/tmp/site" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
