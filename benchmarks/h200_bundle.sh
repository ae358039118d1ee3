#!/usr/bin/env bash
# The generated train_gpt.py on the H200, with pgolf not importable: `torchrun --standalone
# --nproc_per_node=1 train_gpt.py` of the h200 config on a short clock (SECONDS_TRAIN, default 60)
# and part of the val stream (VAL_TOKENS, default 100000), from an empty directory whose only
# Python path is the zstandard wheel. Needs .data/{wikipedia,fineweb,tok} and .whl/ carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site /tmp/bundle
tar xJf .whl/zstandard-*-min.tar.xz -C /tmp/site
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
shards=$(ls ${WIKI_DIR:-.data/wikipedia}/*.jsonl.xz | head -${WIKI_SHARDS:-8})
# its own folder, prepared afresh: a machine kept warm may hold /tmp/pg/sp4096 of another shard set,
# which a failed prepare would then leave in use unnoticed
data=/tmp/pg/bundle_sp4096; rm -rf "$data"
PYTHONPATH="$PWD:/tmp/site" python3 -m pgolf data prepare --docs .data/fineweb/parameter_golf_verify_docs_200.jsonl $shards \
  --vocab 4096 --val-docs 200 --tokenizer .data/tok/sp4096.model --out $data --workers 16 2>&1 | tail -1
[ -f $data/manifest.json ] || { echo "data prepare failed"; exit 2; }
PYTHONPATH="$PWD:/tmp/site" python3 -c "
from pgolf.bundle import build; from pgolf_train.config import load_config
b = build(load_config('h200')); open('/tmp/bundle/train_gpt.py', 'wb').write(b.data); print('train_gpt.py', b.bytes, 'bytes')"
tok=$PWD/.data/tok/sp4096.model
cd /tmp/bundle
PYTHONPATH=/tmp/site python3 -c "import pgolf" 2>/dev/null && echo "pgolf is importable here: not an isolated test" && exit 3
PYTHONPATH=/tmp/site DATA_PATH=$data TOKENIZER_PATH=$tok RUN_ID=gpu MAX_WALLCLOCK_SECONDS=${SECONDS_TRAIN:-60} \
  VAL_MAX_TOKENS=${VAL_TOKENS:-100000} torchrun --standalone --nproc_per_node=1 train_gpt.py > "$OUT/bundle_run.log" 2>&1
rc=$?
grep -E "^(final_|Serialized|Code size|Total|TTT|WARNING|training done|artifact:)" "$OUT/bundle_run.log"
cp logs/gpu/results.json "$OUT/" 2>/dev/null
echo "rc=$rc"
exit $rc
