#!/usr/bin/env bash
# One change at a time against `h200` under H200-300 (issue 22): ARMS="ref xsa_all ..." (names from
# benchmarks/ablation_arms.py), BUDGET=300 (seconds of training; a screening budget below 300 needs
# `ref` in the same campaign), TTT off (plain and sliding are the comparison); EXTRA="--set k=v ..."
# adds the same overrides to every arm (e.g. val_loss_every=500 for the validation curve). Each arm's
# reports.tar and artifact land in $OUT/abl_<arm>/ as it finishes; then, on this machine:
#   python3 benchmarks/ablation_collect.py --run ARM=DIR ... --out benchmarks/results/ablation_h200.json
# Needs the carried .data/{wikipedia,fineweb,tok,tokenizers} and .whl (see h200_setup.sh); a vocab arm
# also .data/tok/sp<V>.model (made by `pgolf data prepare`, see results/vocab_tokenizers_cpu.json).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export VOCAB=4096 TOKENIZER=.data/tok/sp4096.model
source benchmarks/h200_setup.sh
set +e  # h200_setup.sh sets -e: a failed arm must not end the campaign
set -f  # the arms' recipes hold '*': no filename expansion of the --set list
rc=0
for arm in ${ARMS:?set ARMS, e.g. ARMS=\"ref xsa_all\"}; do
  sets=$(python3 benchmarks/ablation_arms.py "$arm") || { rc=2; continue; }
  v=$(python3 benchmarks/ablation_arms.py --vocab "$arm")
  if [ "$v" != 4096 ]; then  # the arm's own shards, its tokenizer trained beforehand (.data/tok/sp$v.model)
    ( export VOCAB=$v TOKENIZER=.data/tok/sp$v.model; set +f; source benchmarks/h200_setup.sh ) >/dev/null 2>&1 \
      || { echo "$arm: data preparation for vocab $v failed"; rc=1; continue; }
  fi
  # shellcheck disable=SC2086  # the --set list splits on purpose
  NAME=abl_$arm bash benchmarks/h200_run.sh h200 "$v" $sets --set max_wallclock_seconds=${BUDGET:-300} \
    --set eval_ttt= ${EXTRA:-} 2>&1 | grep -E "training done|val_bpb|fits|Error|error" | tail -8
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
exit $rc
