"""The one-change-at-a-time arms against `h200` (issue 22), one table for the runner and the collector.

Each arm is the `pgolf run --set` overrides on top of `h200`; `ref` is `h200` itself, run in the same
campaign at the same budget (a screening budget below 300 s needs its own reference).

    python3 benchmarks/ablation_arms.py ARM          # prints the arm's `--set k=v` arguments (for the shell)
    python3 benchmarks/ablation_arms.py --vocab ARM  # prints the vocabulary it trains with
"""
from __future__ import annotations

import sys

INT7_RECIPE = ("tok_emb.weight=int8:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;"
               "*.weight=int7:percentile=99.99984;*=fp32")
# The h200 before int4 QAT (to 2026-12-02): int7 blocks after training, 9 layers, MLP 2x. The arms
# written against it (the vocabulary and precision arms, bigger_alloc) start from it, so that their
# names keep the meaning their results have.
NO_QAT, NO_WD, INT7_SHAPE = "qat_start=1.0", "muon_weight_decay=0.0", ["num_layers=9", "mlp_mult=2"]
INT7 = [f"recipe={INT7_RECIPE}", NO_QAT, NO_WD, *INT7_SHAPE]
EMB5 = ("tok_emb.weight=int5:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;"
        "*.weight=int7:percentile=99.99984;*=fp32")  # the int7 recipe, the embedding at int5
BODY6 = ("tok_emb.weight=int8:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;"
         "*.weight=int6:percentile=99.99984;*=fp32")  # the int7 recipe, the block matrices at int6
INT4 = "tok_emb.weight=int8:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;*.weight=int4:mse;*=fp32"
ARMS: dict[str, list[str]] = {
    "ref": [],
    # h200 took int4 QAT at 12 layers, MLP 3x from issue 23's bets (arm lowbit_int4 then; at 300 s
    # -0.0071 sliding [-0.0095, -0.0049], better in every bucket, results/lowbit_h200_300.json)
    "h200_int7": INT7,
    # h200 took Muon's weight decay (0.04, tapered with the lr) from arm muon_wd of the int4 campaign
    # (results/ablation_h200_int4.json: -0.0203 sliding [-0.0234, -0.0173], better in every bucket);
    # this arm takes it back out. The arms below run on today's h200, so with the decay; a results
    # file records the overrides each run had (from its argv), whatever this table says now.
    "no_muon_wd": [NO_WD],
    # h200 took exclusive self-attention on every block and LeakyReLU(0.5)^2 from the first screen
    # (results/ablation_h200_screen60.json, run as arms xsa_all, leaky_relu2 against the h200 before;
    # together at 300 s as xsa_leaky, results/ablation_h200_300.json): these arms take them back out.
    "relu2": ["activation=relu2"],
    "no_xsa": ["xsa_layers="],
    "h200_prev": ["activation=relu2", "xsa_layers="],
    "partial_rope": ["rope_dims=16"],  # as both record stacks (16 of 64 dims)
    "smear_gate": ["smear_gate=true"],
    "bigram": ["bigram_buckets=4096", "bigram_dim=128"],
    "attn_out_gate": ["attn_out_gate=true"],
    "ln_scale": ["ln_scale=true"],
    "skip_gate": ["skip_gate=true"],
    "polar_express": ["muon_ns_coeffs=polar_express"],
    # the records' AdamW decay on the embedding (0.085 at their lr 0.03); here h200's Muon value, whose
    # per-step decay at the peak lr (0.04 x 0.05 = 0.002) is near theirs (0.0026)
    "embed_wd": ["embed_weight_decay=0.04"],
    "doc_attention": ["doc_attention=true"],
    "parallel_residual": ["parallel_residual=true"],
    # issue 23's bets at ~15.5 MB: low-bit QAT from step 0 at 2-4x the parameters (shapes and recipes from
    # results/lowbit_shapes_cpu.json "suggestions"), the recursive model at int4 (4 blocks x 3 passes, 6 x 2;
    # screened at ~14.4 MB with Gaussian stand-ins by lowbit_shapes.screen), the factorized embedding.
    # Trained at 150 s (results/lowbit_h200_150.json): all worse than h200 in every bucket; int2, int4
    # and 4x3 coded to 13.4-14.2 MB under QAT, well under the stand-ins' bytes.
    "lowbit_ternary": ["recipe=tok_emb.weight=int8:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;*.weight=ternary;*=fp32", "qat_start=0", "model_dim=896", "num_layers=11", "num_heads=14", "num_kv_heads=7", "mlp_mult=2"],
    "lowbit_int2": ["recipe=tok_emb.weight=int8:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;*.weight=int2:asym:mse;*=fp32", "qat_start=0", "model_dim=896", "num_layers=9", "num_heads=14", "num_kv_heads=7", "mlp_mult=2"],
    "lowbit_int3": ["recipe=tok_emb.weight=int8:percentile=99.99984;embed_proj.weight=int8:percentile=99.99984;*.weight=int3:mse;*=fp32", "qat_start=0", "model_dim=640", "num_layers=9", "num_heads=10", "num_kv_heads=5", "mlp_mult=4"],
    # int4 (now h200) at 13 layers: 14.7 MB trained; at 300 s a tie with 12 (8% fewer steps)
    "lowbit_int4_l13": ["num_layers=13"],
    "loop4x3_int4": [f"recipe={INT4}",
                     "qat_start=0", "num_layers=4", "loop_start=0", "loop_end=4", "loop_times=3", "model_dim=768",
                     "num_heads=12", "num_kv_heads=6", "mlp_mult=4"],
    "loop6x2_int4": [f"recipe={INT4}",
                     "qat_start=0", "num_layers=6", "loop_start=0", "loop_end=6", "loop_times=2", "model_dim=640",
                     "num_heads=10", "num_kv_heads=5", "mlp_mult=4"],
    # spend the bytes (issue 22): a bigger model, GPTQ + the bit allocator filling 15.9 MB after training
    "bigger_alloc": [f"recipe={INT7_RECIPE}", NO_QAT, NO_WD, "num_layers=11", "mlp_mult=3", "quantize_budget=15900000"],
    "embed128": ["embed_dim=128"],
    "embed256": ["embed_dim=256"],
    # the vocabulary sweep (issue 22): tokenizers trained on the training documents only
    # (.data/tok/spV.model, results/vocab_tokenizers_cpu.json), the runner prepares their shards.
    # 8,192 rows of int8 embedding would pass 16 MB (~16.7 MB; at int6 the CPU preflight came to
    # 16,023,045 bytes), so that arm stores it at int5; emb_int5 is h200 with the same embedding
    # precision, to tell the two effects apart.
    # The first screen (results/ablation_h200_screen60.json): vocab8192 scored 0.006 better before
    # quantization and 0.059 worse after it: the tied embedding does not survive int5. These keep
    # it at int8 and pay in the blocks instead (int6); body_int6 is h200 with the same blocks.
    # These four start from the int7 h200 they were written for (INT7).
    "vocab8192_b6": [NO_QAT, NO_WD, *INT7_SHAPE, "vocab_size=8192", f"recipe={BODY6}"],
    "body_int6": [NO_QAT, NO_WD, *INT7_SHAPE, f"recipe={BODY6}"],
    "vocab8192": [NO_QAT, NO_WD, *INT7_SHAPE, "vocab_size=8192", f"recipe={EMB5}"],
    "emb_int5": [NO_QAT, NO_WD, *INT7_SHAPE, f"recipe={EMB5}"],
    # on the int4 h200. At 8,192 rows an int8 embedding would add ~1.9 MB to its trained 13.79 MB (4,096
    # rows coded to 1.90 MB, 7.24 bits each): too close to 16 MB (the CPU preflight of barely trained
    # weights: 16.55 MB), so int7 (~15.2 MB expected trained).
    "vocab2048": ["vocab_size=2048"],
    "vocab8192_int4": ["vocab_size=8192", "recipe=" + INT4.replace("tok_emb.weight=int8", "tok_emb.weight=int7")],
}


def vocab(arm: str) -> int:
    """The tokenizer size ``arm`` trains with (h200's 4096 unless it sets ``vocab_size``)."""
    sets = dict(kv.split("=", 1) for kv in ARMS[arm])
    return int(sets.get("vocab_size", 4096))


def set_args(arm: str) -> list[str]:
    """``["--set", "k=v", ...]`` of ``arm``; a KeyError names the known arms."""
    if arm not in ARMS:
        raise KeyError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return [a for kv in ARMS[arm] for a in ("--set", kv)]


if __name__ == "__main__":
    try:
        if sys.argv[1] == "--vocab":
            print(vocab(sys.argv[2]))
        else:
            print(" ".join(set_args(sys.argv[1])))
    except (KeyError, IndexError) as e:
        print(f"ablation_arms.py ARM: {e}", file=sys.stderr)
        sys.exit(2)
