#!/usr/bin/env bash
# One H200-300 protocol run: `benchmarks/h200_run.sh CONFIG VOCAB [pgolf run args...]`.
# Run after `benchmarks/h200_setup.sh` (VOCAB=$VOCAB); writes RUNDIR=/tmp/runs/CONFIG and, when
# $OUT is set, copies the report, the logs and the summary there as CONFIG.* files.
set -euo pipefail
config=$1 vocab=$2; shift 2
data=/tmp/pg/sp$vocab
tok=$data/tokenizer.model
[ "$vocab" = 1024 ] && tok=.data/tokenizers/fineweb_1024_bpe.model
python3 -m pgolf run --config "$config" --data "$data" --tokenizer "$tok" --out "/tmp/runs/$config" --force "$@" \
  2>&1 | tee "/tmp/runs_$config.log"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$config"
  cp "/tmp/runs/$config/report.json" "/tmp/runs/$config/report.md" "/tmp/runs/$config/train/train.jsonl" \
     "/tmp/runs/$config/train/train_summary.json" "$OUT/$config/"
  cp "/tmp/runs_$config.log" "$OUT/$config/run.log"
fi
