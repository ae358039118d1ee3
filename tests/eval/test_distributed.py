"""Two gloo processes give the same bpb as one: windows and TTT documents split, sums all_reduced."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pgolf_eval.evaluate import evaluate_tokens
from pgolf_eval.ttt import TTTConfig
from pgolf_train.tokenizer import byte_tables

from .conftest import tiny_model

CASES = {"plain": {}, "sliding": {"stride": 5}, "isolated": {"stride": 5, "doc_isolated": True},
         "ttt": {"ttt": TTTConfig(chunk=8, epochs=0)},
         # the carried adapter: both ranks must take the same steps on the summed gradients
         # (two documents in flight: one slot on each rank; the schedule is the whole stream's)
         "phased": {"ttt": TTTConfig(chunk=8, rank=2, lr=0.05, scope="both", phase_tokens=200, phase_batch=3,
                                     parallel_docs=2)}}


def _worker(rank: int, world: int, init: str, tokens, sp1024: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, tables = tiny_model(), byte_tables(sp1024, 1024)
        res = {k: evaluate_tokens(model, tokens, tables, seq_len=16, log=None, **kw).to_dict() for k, kw in CASES.items()}
        Path(out, f"{rank}.json").write_text(json.dumps(res))
    finally:
        torch.distributed.barrier()  # no rank closes its sockets while a peer still works
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(val_tokens, sp1024, tmp_path):
    tokens = val_tokens[:900]
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", tokens, str(sp1024), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    model, tables = tiny_model(), byte_tables(sp1024, 1024)
    for name, kw in CASES.items():
        one = evaluate_tokens(model, tokens, tables, seq_len=16, log=None, **kw)
        for r in ranks:
            assert r[name]["world_size"] == 2
            assert (r[name]["tokens"], r[name]["bytes"]) == (one.tokens, one.bytes)
            # the summed gradients round differently from one process's; Adam carries it a few steps
            assert r[name]["val_bpb"] == pytest.approx(one.val_bpb, rel=1e-6 if name != "phased" else 1e-4)
            assert r[name]["per_doc"]["bytes"] == one.per_doc["bytes"]
        if name == "phased":
            assert ranks[0]["phased"]["extra"]["ttt"]["phases_trained"] >= 1  # the third document scores after it
