#!/usr/bin/env bash
# Document attention on one H200: the GPU tests of the varlen op and the fused attention path, then
# train_bench's h200 step causal (today's h200) against doc_attention as varlen and with its mask.
#   BENCH_STEPS=30; DOC_VARIANTS=fused_qkv_qk_xsa,doc_varlen,doc_mask
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/stages.log"; }
export VOCAB=4096 TOKENIZER=.data/tok/sp4096.model
source benchmarks/h200_setup.sh
set +e
stamp "data ready"
timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/train/test_doc_attn_gpu.py tests/train/test_fused_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1; stamp "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/train_bench.py --data /tmp/pg/sp4096 --config h200 \
  --variants "${DOC_VARIANTS:-fused_qkv_qk_xsa,doc_varlen,doc_mask}" --steps "${BENCH_STEPS:-30}" --warmup 5 \
  --out "$OUT/doc_attn_bench_h200.json" 2>&1 | tee "$OUT/bench.log"; stamp "bench"
