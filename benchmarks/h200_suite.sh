#!/usr/bin/env bash
# The GPU benchmark suite in one call (after `source benchmarks/h200_setup.sh`), most valuable first;
# each step has its own time limit and writes its JSON under $OUT as soon as it is done.
#   1. train_bench: the baseline's step time at 524,288 tokens/step (vs the starter's 312 ms)
#   2. a short baseline training run (TRAIN_S seconds) -> a real artifact and checkpoint
#   3. eval_bench on that artifact: plain / sliding / LoRA-TTT tokens/s and bpb deltas
#   4. quant_bench on that checkpoint: hand recipes vs GPTQ vs the allocator at fixed bytes
#   5. dequant_bench: Triton dequant against the copy bandwidth
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRAIN_S=${TRAIN_S:-50}
data=/tmp/pg/sp1024 tok=.data/tokenizers/fineweb_1024_bpe.model
timeout 110 python3 benchmarks/train_bench.py --data $data --steps 12 --warmup 4 --variants baseline 2>&1 | tail -2
cp benchmarks/results/train_bench.json "$OUT/train_bench.json" 2>/dev/null
timeout 130 python3 -m pgolf train --config baseline --data $data --tokenizer $tok --out /tmp/runs/short --force \
  --max_wallclock_seconds=$TRAIN_S --compile_warmup_steps=6 2>&1 | grep -E "training done|val_bpb|artifact:"
timeout 80 python3 benchmarks/eval_bench.py --tokens 524288 --artifact /tmp/runs/short/model.pgolf --data $data \
  --tokenizer $tok --out "$OUT/eval_bench.json" 2>&1 | tail -8
timeout 100 python3 benchmarks/quant_bench.py --checkpoint /tmp/runs/short/final_model.safetensors --data $data \
  --tokenizer $tok --out "$OUT/quant_bench.json" 2>&1 | tail -15
cp /tmp/runs/short/model.pgolf "$OUT/short_baseline.pgolf" 2>/dev/null
timeout 45 python3 benchmarks/dequant_bench.py --sizes 16M,64M --out "$OUT/dequant_bench.json" 2>&1 | tail -6
