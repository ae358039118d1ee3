#!/usr/bin/env bash
# One H200-300 protocol run: `benchmarks/h200_run.sh CONFIG VOCAB [pgolf run args...]`.
# Run after `benchmarks/h200_setup.sh` (VOCAB=$VOCAB); writes RUNDIR=/tmp/runs/$NAME (NAME defaults
# to CONFIG) and, when $OUT is set, writes $OUT/$NAME/reports.tar (the report, the logs, the summary,
# the extra evaluations) and the artifact beside it, also when the run failed part-way (its exit
# status is kept).
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
  # Two files per run (the device returns at most 8): the artifact, and the reports and logs in one tar.
  mkdir -p "$OUT/$name" "/tmp/runs/$name/bundle"
  cp "/tmp/runs_$name.log" "/tmp/runs/$name/bundle/run.log"
  for f in report.json report.md eval_sliding.json eval_ttt.json train/train.jsonl train/train_summary.json; do
    [ -f "/tmp/runs/$name/$f" ] && cp "/tmp/runs/$name/$f" "/tmp/runs/$name/bundle/"
  done
  tar cf "$OUT/$name/reports.tar" -C "/tmp/runs/$name/bundle" .
  [ -f "/tmp/runs/$name/train/model.pgolf" ] && cp "/tmp/runs/$name/train/model.pgolf" "$OUT/$name/"
fi
exit $rc
