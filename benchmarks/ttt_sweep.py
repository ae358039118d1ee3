"""Test-time-training settings side by side on one artifact: bpb and seconds per setting.

Loads the artifact once, scores the full val stream plain and sliding (stride 64) as the
references, then once per TTT setting (LoRA rank, learning rate, epochs, chunk, targets).
Prints a table with each setting's delta to sliding, writes benchmarks/results/ttt_sweep.json.

    python3 benchmarks/ttt_sweep.py --artifact A.pgolf --data DIR --tokenizer T.model   # H200: ~5 min
    python3 benchmarks/ttt_sweep.py ... --variants ref,lr3e-3 --max-tokens 20000 --device cpu
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402

from pgolf_eval.breakdown import compare  # noqa: E402
from pgolf_eval.evaluate import evaluate_tokens, load_val_stream  # noqa: E402
from pgolf_eval.loader import check_tokenizer, model_from_artifact  # noqa: E402
from pgolf_eval.ttt import TTTConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name -> TTTConfig keywords over OLD, the evaluator's first default (LoRA r8 on q,v, Adam 1e-3, chunks of
# 256, the first window scored whole); the names and the recorded sweeps are relative to it. "best" is
# TTTConfig() as it is now, the winner of these sweeps.
OLD = {"rank": 8, "lr": 1e-3, "chunk": 256, "targets": ("q", "v"), "from_start": False, "scope": "doc"}
VARIANTS: dict[str, dict] = {name: {**OLD, **kw} for name, kw in {
    "ref": {},
    "lr3e-3": {"lr": 3e-3},
    "lr1e-2": {"lr": 1e-2},
    "lr3e-3_e2": {"lr": 3e-3, "epochs": 2},
    "lr3e-3_r16": {"lr": 3e-3, "rank": 16},
    "lr3e-3_all": {"lr": 3e-3, "targets": ("attn", "mlp")},
    "lr3e-3_c128": {"lr": 3e-3, "chunk": 128},
    "lr3e-3_c64": {"lr": 3e-3, "chunk": 64},
    "lr1e-2_all": {"lr": 1e-2, "targets": ("attn", "mlp")},
    "lr3e-3_all_e2": {"lr": 3e-3, "targets": ("attn", "mlp"), "epochs": 2},
    "lr3e-3_all_c64": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 64},
    "lr3e-3_all_c64_e2": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 64, "epochs": 2},
    "lr2e-3_all_c64_e2": {"lr": 2e-3, "targets": ("attn", "mlp"), "chunk": 64, "epochs": 2},
    "lr3e-3_all_c32": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 32},
    "lr3e-3_all_c64_start": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 64, "from_start": True},
    "lr3e-3_all_c64_r16": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 64, "rank": 16},
    "lr3e-3_all_c64_r32": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 64, "rank": 32},
    "lr3e-3_all_c32_r16": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 32, "rank": 16},
    "lr3e-3_all_c64_r16_start": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 64, "rank": 16,
                                 "from_start": True},
    "lr3e-3_all_c32_start": {"lr": 3e-3, "targets": ("attn", "mlp"), "chunk": 32, "from_start": True},
}.items()}
VARIANTS["best"] = {}
# Phased (carried) adaptation, spelt over TTTConfig() (phase_tokens spelt out: its default was 32,768 when
# these were measured): "phased" alone, "both" with the per-document LoRA on top; p = targets per phase,
# e = passes per phase, lr = the carried adapter's.
VARIANTS.update({
    "phased_lr3e-3": {"scope": "phased", "phase_lr": 3e-3, "phase_tokens": 32768},
    "phased_lr1e-2": {"scope": "phased", "phase_lr": 1e-2, "phase_tokens": 32768},
    "phased_lr3e-3_e2": {"scope": "phased", "phase_lr": 3e-3, "phase_tokens": 32768, "phase_epochs": 2},
    "phased_lr1e-2_e2": {"scope": "phased", "phase_lr": 1e-2, "phase_tokens": 32768, "phase_epochs": 2},
    "phased_p8k_lr3e-3": {"scope": "phased", "phase_lr": 3e-3, "phase_tokens": 8192},
    "phased_p8k_lr1e-2": {"scope": "phased", "phase_lr": 1e-2, "phase_tokens": 8192},
    "both_lr3e-3": {"scope": "both", "phase_lr": 3e-3, "phase_tokens": 32768},
    "both_lr1e-3": {"scope": "both", "phase_lr": 1e-3, "phase_tokens": 32768},
    "both_lr1e-2": {"scope": "both", "phase_lr": 1e-2, "phase_tokens": 32768},
    "both_p8k_lr3e-3": {"scope": "both", "phase_lr": 3e-3, "phase_tokens": 8192},
})
# The three scopes spelt out, so they keep their meaning when TTTConfig's default scope changes; the
# phased ones stream documents through slots in stream order (measured in ttt_sweep_h200_stream.json;
# the phased rows of ttt_sweep_h200_phased.json are the earlier schedule: whole phases, one at a time).
VARIANTS.update({
    "doc": {"scope": "doc"},
    "phased": {"scope": "phased", "phase_tokens": 32768},
    "both": {"scope": "both", "phase_tokens": 32768},
    "both_p8k": {"scope": "both", "phase_tokens": 8192},
    "both_p128k": {"scope": "both", "phase_tokens": 131072},
    "both_wide": {"scope": "both", "phase_tokens": 32768, "parallel_docs": 128},
})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="directory with the val shards (and byte sidecar)")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only a prefix of the val stream")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trust-code", action="store_true", help="run the artifact's embedded model source")
    ap.add_argument("--out", type=Path, default=RESULTS / "ttt_sweep.json")
    ap.add_argument("--code-commit", default=None, help="the commit of the code measured (default: git HEAD)")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; have {list(VARIANTS)}")

    model, art = model_from_artifact(args.artifact, device=args.device, trust_code=args.trust_code)
    vocab = check_tokenizer(art.metadata, args.tokenizer, model_vocab=int(model.cfg.vocab_size))
    tokens, byte_source = load_val_stream(args.data, args.tokenizer, vocab, args.max_tokens)
    seq_len = int(model.cfg.seq_len)

    stride = min(64, max(1, seq_len // 4))  # 64 on any real model
    runs: list[tuple[str, dict, dict]] = [("plain", {}, {}), (f"sliding s={stride}", {"stride": stride}, {})]
    for n in names:  # a chunk longer than the model's context is the context
        setting = {**VARIANTS[n], "chunk": min(VARIANTS[n].get("chunk", TTTConfig.chunk), seq_len)}
        runs.append((n, {"ttt": TTTConfig(**setting)}, setting))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    commit = args.code_commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    head = {"command": "python3 " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "code_commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "torch": torch.__version__, "artifact": str(args.artifact), "artifact_bytes": int(art.info.total_bytes),
            "seq_len": seq_len}
    rows: list[dict] = []
    for name, kw, setting in runs:
        t = time.perf_counter()
        res = evaluate_tokens(model, tokens, byte_source, seq_len=seq_len, device=args.device, log=None, **kw)
        rows.append({"variant": name, "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
                     "val_bpb": res.val_bpb, "val_loss": res.val_loss, "tokens": res.tokens,
                     "seconds": time.perf_counter() - t, "ttt": res.extra.get("ttt"), "docs": res.docs,
                     "per_doc": res.per_doc})
        if len(rows) > 1:  # paired, per document, against sliding (row 1)
            rows[-1]["vs_sliding"] = compare(rows[-1], rows[1])
        print(f"  {name:<16} {res.val_bpb:.5f}  {rows[-1]['seconds']:7.1f} s", file=sys.stderr, flush=True)
        write_json(args.out, {**head, "tokens": rows[0]["tokens"], "rows": rows})  # partial results survive a stop
    sliding = rows[1]["val_bpb"]
    for r in rows:
        r["delta_vs_sliding"] = r["val_bpb"] - sliding

    names = [b["bucket"] for b in rows[0]["docs"]["buckets"]]
    shares = " ".join(f"{b['bucket']} {b['token_share']:.0%}" for b in rows[0]["docs"]["buckets"])
    print(f"\npaired Δ vs sliding per document-length bucket (token shares: {shares}); * = interval excludes 0")
    print(f"{'variant':<20} {'val_bpb':>9} {'Δ sliding':>10} {'95% interval':>19} "
          + " ".join(f"{n:>9}" for n in names) + f" {'<2K':>9} {'adapted':>8} {'seconds':>8}")
    for r in rows:
        c = r.get("vs_sliding")
        ci = f"[{c['overall']['ci95'][0]:+.4f},{c['overall']['ci95'][1]:+.4f}]" if c and c["overall"]["ci95"] else ""
        cells = {b["bucket"]: f"{b['delta']:+.4f}{'*' if b['verdict'] != 'tie' else ' '}" for b in (c or {}).get("buckets", [])}
        short = c["under_2k"] if c and "under_2k" in c else None
        short_s = f"{short['delta']:+.4f}{'*' if short['verdict'] != 'tie' else ' '}" if short else ""
        frac = (r.get("ttt") or {}).get("adapted_fraction")
        frac_s = f"{frac:.0%}" if frac is not None else ""
        print(f"{r['variant']:<20} {r['val_bpb']:>9.5f} {r['delta_vs_sliding']:>+10.5f} {ci:>19} "
              + " ".join(f"{cells.get(n, ''):>9}" for n in names) + f" {short_s:>9} {frac_s:>8} {r['seconds']:>8.1f}")
    write_json(args.out, {**head, "tokens": rows[0]["tokens"], "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
