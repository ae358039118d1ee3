#!/usr/bin/env bash
# The faster step on one H200 (issue: fused kernels): GPU tests of the kernels, the step profile of
# `h200` and `baseline`, and train_bench's side-by-side variants, all logged under $OUT as they go.
#   STAGES="tests profile bench losscheck" (default all); BENCH_VARIANTS=baseline,fused_ce,...; BENCH_STEPS=30;
#   LOSS_FUSED=ce,rope LOSS_SDPA= (the equal-loss check's fused arm); PROFILE_H200_ONLY=1 skips baseline's profile; *_TIMEOUT caps a stage
# Needs the carried .data/{wikipedia,fineweb,tok,tokenizers} and .whl (see h200_setup.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-tests profile bench losscheck}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/stages.log"; }
# sp1024 shards only for `baseline` (its profile, or BENCH_VOCAB=1024): ~15 s of device time
if [[ " $STAGES " == *" profile "* && -z "${PROFILE_H200_ONLY:-}" || "${BENCH_VOCAB:-4096}" == 1024 ]]; then
  source benchmarks/h200_setup.sh
fi
export VOCAB=4096 TOKENIZER=.data/tok/sp4096.model
source benchmarks/h200_setup.sh
set +e  # h200_setup.sh sets -e: a failed stage must not end the script
stamp "data ready"
if [[ " $STAGES " == *" tests "* ]]; then
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/train/test_fused_gpu.py tests/train/test_techniques_gpu.py} \
    > "$OUT/gpu_tests.log" 2>&1; stamp "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"  # the whole log: a failure's reason
fi
if [[ " $STAGES " == *" profile "* ]]; then
  timeout 240 python3 benchmarks/profile_step.py --data /tmp/pg/sp4096 --configs h200 ${PROFILE_SET:-} \
    --out "$OUT/profile_step_h200.json" 2>&1 | tee "$OUT/profile_h200.log"; stamp "profile h200"
  if [[ -z "${PROFILE_H200_ONLY:-}" ]]; then
    timeout 200 python3 benchmarks/profile_step.py --data /tmp/pg/sp1024 --configs baseline ${PROFILE_SET:-} \
      --out "$OUT/profile_step_baseline.json" 2>&1 | tee "$OUT/profile_baseline.log"; stamp "profile baseline"
  fi
fi
if [[ " $STAGES " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/train_bench.py --data /tmp/pg/sp${BENCH_VOCAB:-4096} --config ${BENCH_CONFIG:-h200} \
    --variants "${BENCH_VARIANTS:-baseline,fused_ce,sdpa_cudnn}" --steps "${BENCH_STEPS:-30}" --warmup 5 \
    --out "$OUT/fused_bench_${BENCH_CONFIG:-h200}.json" 2>&1 | tee "$OUT/bench.log"; stamp "bench"
fi
if [[ " $STAGES " == *" losscheck "* ]]; then
  timeout ${LOSS_TIMEOUT:-240} python3 benchmarks/fused_loss_check.py --data /tmp/pg/sp4096 --config h200 --steps 200 \
    --fused "${LOSS_FUSED:-ce,rope}" --sdpa "${LOSS_SDPA:-}" --out "$OUT/fused_loss_check_h200.json" 2>&1 | tee "$OUT/losscheck.log"
  stamp "loss check"
fi
