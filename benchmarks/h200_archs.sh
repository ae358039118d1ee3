#!/usr/bin/env bash
# One architecture arm under H200-300 against `h200`, at (nearly) its parameter count and bytes:
#   ARM=ssm        SSM mixers in blocks 1,3,5,7 (inner width 512, 8 heads of 64, state 64), attention elsewhere
#   ARM=moe        every MLP 4 experts of hidden 256 (the dense MLP's parameters), top-2 routing
#   ARM=early_exit exit heads after virtual layers 3 and 5, then evaluations at each of $TAUS
# TTT is off (the comparison is plain and sliding). GPU_TESTS=1 first runs tests/train/test_archs_gpu.py.
# Needs the carried .data/{wikipedia,fineweb,tok,tokenizers} and .whl (see h200_setup.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export VOCAB=4096 TOKENIZER=.data/tok/sp4096.model
source benchmarks/h200_setup.sh
set +e  # h200_setup.sh sets -e: a failed step below must not end the script before the arm runs
if [ "${GPU_TESTS:-0}" = 1 ]; then
  timeout 240 python3 -m pytest tests/train/test_archs_gpu.py -q -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
case "$ARM" in
  ssm) sets=(--set ssm_layers=1,3,5,7) ;;
  moe) sets=(--set moe_experts=4 --set moe_top_k=2 --set mlp_mult=0.5) ;;
  early_exit) sets=(--set exit_layers=3,5) ;;
  *) echo "unknown ARM=$ARM"; exit 2 ;;
esac
NAME=arch_$ARM bash benchmarks/h200_run.sh h200 4096 "${sets[@]}" --set eval_ttt=
rc=$?
if [ "$ARM" = early_exit ] && [ -f /tmp/runs/arch_early_exit/train/model.pgolf ]; then
  for tau in ${TAUS:-0.9 0.8 0.7 0.6 0.5}; do
    for stride in 1024 64; do  # plain (no overlap), then sliding
      timeout 60 python3 -m pgolf eval /tmp/runs/arch_early_exit/train/model.pgolf --data /tmp/pg/sp4096 \
        --tokenizer /tmp/pg/sp4096/tokenizer.model --stride $stride --early-exit "$tau" \
        --out "$OUT/exit_${tau}_s${stride}.json" 2>&1 | tail -3
    done
  done
fi
exit $rc
