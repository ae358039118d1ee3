#!/usr/bin/env bash
# fused=mlp (quack's CuTe DSL GEMMs with the activation in their epilogues) and fused=fa4
# (FlashAttention 4) on a lent H200, in the
# call after `STAGE=a bash benchmarks/fa4_probe.sh` on the same warm machine. Carry .whl/fa4b,
# .whl/zstandard-*-min.tar.xz, .data/fineweb, .data/tok and .data/$WIKI (a few Wikipedia shards:
# train_bench needs ~10M tokens, not the protocol's 62 shards, and the wheels take most of a call's 64 MiB).
#   STAGES="bench tests probe losscheck" (default "bench tests probe", run in that order); BENCH_VARIANTS=...;
#   PROBE_ARGS=--tuned; WIKI=wiki10; *_TIMEOUT caps a stage. Logs under $OUT as they go.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-bench tests probe}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/stages.log"; }
source benchmarks/cute_env.sh || exit 3
python3 -c "import torch, triton, quack; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.log"
if [[ " $STAGES " == *" bench "* || " $STAGES " == *" losscheck "* ]]; then
  python3 -m pgolf data prepare --docs .data/fineweb/parameter_golf_verify_docs_200.jsonl .data/${WIKI:-wiki10}/*.jsonl.xz \
    --vocab 4096 --val-docs 200 --tokenizer .data/tok/sp4096.model --out /tmp/pg/sp4096 --workers 16 > "$OUT/prepare.log" 2>&1
  stamp "data: $(tail -1 "$OUT/prepare.log")"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/train_bench.py --data /tmp/pg/sp4096 --config h200 \
    --variants "${BENCH_VARIANTS:-unfused,fused_qkv_qk_xsa,fused_mlp,fused_mlp_fa4}" --steps "${BENCH_STEPS:-20}" --warmup 5 \
    --out "$OUT/fused_bench_h200.json" > "$OUT/bench.log" 2>&1; stamp "bench: rc $?"
fi
if [[ " $STAGES " == *" tests "* ]]; then
  timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/train/test_cute_gpu.py} \
    > "$OUT/gpu_tests.log" 2>&1; stamp "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
fi
if [[ " $STAGES " == *" probe "* ]]; then
  timeout ${PROBE_TIMEOUT:-100} python3 benchmarks/quack_mlp_probe.py --out "$OUT/quack_mlp_probe_h200.json" ${PROBE_ARGS:-} \
    > "$OUT/probe.log" 2>&1; stamp "probe: rc $?"
fi
if [[ " $STAGES " == *" losscheck "* ]]; then
  timeout ${LOSS_TIMEOUT:-240} python3 benchmarks/fused_loss_check.py --data /tmp/pg/sp4096 --config h200 --steps 200 \
    --fused "${LOSS_FUSED:-ce,rope,qkv,qk,xsa,mlp}" --sdpa "" --out "$OUT/fused_loss_check_h200.json" > "$OUT/losscheck.log" 2>&1
  stamp "loss check: rc $?"
fi
