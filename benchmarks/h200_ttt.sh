#!/usr/bin/env bash
# TTT on the H200, in two device calls (issue: TTT that never silently turns off).
#   STEP=run:   set-up, the GPU tests of the TTT timing path, then `pgolf run --config h200`
#   STEP=sweep: on that run's artifact (or ART=...), per-document LoRA vs phased vs both
#               (ttt_sweep.py, VARIANTS=...), with length buckets and paired intervals against sliding.
#               With /tmp/pg/sp4096 copied in beforehand (val shards prepared elsewhere), no Wikipedia
#               needs carrying: `mkdir -p /tmp/pg && cp -r DIR /tmp/pg/sp4096 && STEP=sweep ART=... bash ...`
# Needs .data/ (wikipedia, fineweb, tokenizers, tok/sp4096.model) and .whl/ carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export VOCAB=4096 TOKENIZER=.data/tok/sp4096.model
if [ ! -f /tmp/pg/sp4096/manifest.json ] || [ -z "${PYTHONPATH:-}" ]; then
  source benchmarks/h200_setup.sh > "$OUT/setup.log" 2>&1; tail -3 "$OUT/setup.log"
fi
set +e
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
case "${STEP:-run}" in
  run)
    git rev-parse HEAD > "$OUT/code_commit.txt" 2>/dev/null
    timeout 120 python3 -m pytest -q tests/eval/test_ttt_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
    NAME=h200 bash benchmarks/h200_run.sh h200 4096 "$@" 2>&1 | grep -vE "^(step|ttt |eval )" | tail -40
    ;;
  sweep)
    timeout 120 python3 -m pytest -q tests/eval/test_ttt_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
    art=${ART:-/tmp/runs/h200/train/model.pgolf}
    python3 benchmarks/ttt_sweep.py --artifact "$art" --data /tmp/pg/sp4096 --tokenizer /tmp/pg/sp4096/tokenizer.model \
      --variants "${VARIANTS:-best,phased_lr3e-3,phased_lr1e-2,phased_lr1e-2_e2,phased_p8k_lr1e-2,both_lr3e-3,both_lr1e-2}" \
      --out "$OUT/${SWEEP_NAME:-ttt_sweep_h200_phased}.json" ${CODE_COMMIT:+--code-commit "$CODE_COMMIT"} 2>&1 | tail -14
    ;;
esac
