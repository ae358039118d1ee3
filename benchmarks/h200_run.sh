#!/usr/bin/env bash
# One H200-300 protocol run: `benchmarks/h200_run.sh CONFIG VOCAB [pgolf run args...]`.
# Run after `benchmarks/h200_setup.sh` (VOCAB=$VOCAB); writes RUNDIR=/tmp/runs/$NAME (NAME defaults
# to CONFIG) and, when $OUT is set, copies the report, the logs, the summary, the extra evaluations
# and the artifact to $OUT/$NAME, also when the run failed part-way (its exit status is kept).
set -uo pipefail
config=$1 vocab=$2; shift 2
name=${NAME:-$config}
data=/tmp/pg/sp$vocab
tok=$data/tokenizer.model
[ "$vocab" = 1024 ] && tok=.data/tokenizers/fineweb_1024_bpe.model
python3 -m pgolf run --config "$config" --data "$data" --tokenizer "$tok" --out "/tmp/runs/$name" --force "$@" \
  2>&1 | tee "/tmp/runs_$name.log"
rc=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$name"
  for f in report.json report.md eval_ttt.json train/train.jsonl train/train_summary.json train/model.pgolf; do
    [ -f "/tmp/runs/$name/$f" ] && cp "/tmp/runs/$name/$f" "$OUT/$name/"
  done
  cp "/tmp/runs_$name.log" "$OUT/$name/run.log"
fi
exit $rc
