#!/usr/bin/env bash
# Prepare a lent H200 machine for the H200-300 protocol and the GPU benchmarks.
# Expects (carried beside the checkout, ignored by git): .data/{wikipedia,fineweb,tokenizers}
# and .whl/zstandard-*-min.tar.xz (the GPU image lacks zstandard).
# Leaves: PYTHONPATH set for the checkout; /tmp/pg/sp1024 = challenge-format shards (train = all
# Wikipedia shards, val = the 200 FineWeb documents) tokenized with the challenge's sp1024 (with
# VOCAB unset or 1024; with another VOCAB, /tmp/pg/sp$VOCAB instead).
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar xJf .whl/zstandard-*-min.tar.xz -C /tmp/site
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, zstandard, numba, msgpack, sentencepiece, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# The challenge-tokenizer shards only when a run needs them (VOCAB unset or 1024): ~15 s of device time.
if [ "${VOCAB:-1024}" = 1024 ] && [ ! -f /tmp/pg/sp1024/manifest.json ]; then
  python3 -m pgolf data prepare --docs .data/fineweb/parameter_golf_verify_docs_200.jsonl .data/wikipedia/*.jsonl.xz \
    --vocab 1024 --val-docs 200 --tokenizer .data/tokenizers/fineweb_1024_bpe.model --out /tmp/pg/sp1024 --workers 16
fi
# A config that trains its own tokenizer: VOCAB=4096 benchmarks/h200_setup.sh also makes /tmp/pg/sp$VOCAB,
# the tokenizer trained on (a sample of) the Wikipedia training documents only.
# TOKENIZER=PATH reuses a tokenizer trained beforehand with the same command (saves device time;
# every run of a comparison then shares one tokenizer).
if [ -n "${VOCAB:-}" ] && [ "${VOCAB}" != 1024 ] && [ ! -f /tmp/pg/sp$VOCAB/manifest.json ]; then
  if [ -n "${TOKENIZER:-}" ]; then tok_args=(--tokenizer "$TOKENIZER"); else tok_args=(--tokenizer-sample-mb 40); fi
  python3 -m pgolf data prepare --docs .data/fineweb/parameter_golf_verify_docs_200.jsonl .data/wikipedia/*.jsonl.xz \
    --vocab "$VOCAB" --val-docs 200 "${tok_args[@]}" --out /tmp/pg/sp$VOCAB --workers 16
  # an `if`, not `[ ... ] && cp`: a false test as the block's last command fails the block under
  # `set -e`, which exits the shell that sourced this file
  if [ -n "${TOKENIZER:-}" ]; then cp "$TOKENIZER" /tmp/pg/sp$VOCAB/tokenizer.model; fi
fi
