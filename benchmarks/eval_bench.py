"""Evaluator throughput: non-overlapping, stride-64 sliding and LoRA-TTT evaluation.

Speed runs the baseline-size model (GPTConfig defaults) with random weights on random tokens;
with --artifact/--data/--tokenizer it also reports each mode's bpb and its delta to plain on a
prefix of the real val stream. Prints a table, writes benchmarks/results/eval_bench.json.

    python3 benchmarks/eval_bench.py                       # H200: well under 3 minutes
    python3 benchmarks/eval_bench.py --tiny --tokens 4096  # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pgolf_eval.evaluate import DEFAULT_BATCH_TOKENS, evaluate_artifact, evaluate_tokens
from pgolf_eval.ttt import TTTConfig
from pgolf_train.model import GPT, GPTConfig
from pgolf_train.tokenizer import ByteTables

RESULTS = Path(__file__).resolve().parent / "results"


def modes(seq_len: int, n: int) -> list[tuple[str, dict, int]]:
    """(name, evaluate_tokens keywords, tokens to evaluate): costlier modes get fewer tokens."""
    stride = min(64, seq_len)
    return [("plain", {}, n), (f"sliding s={stride}", {"stride": stride}, max(n // 4, 2 * seq_len)),
            ("ttt lora r8 q,v c256", {"ttt": TTTConfig(chunk=min(256, seq_len), rank=8, lr=1e-3, targets=("q", "v"),
                                                       from_start=False)}, max(n // 16, 2 * seq_len)),
            ("ttt default", {"ttt": TTTConfig(chunk=min(TTTConfig.chunk, seq_len))}, max(n // 16, 2 * seq_len))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4_194_304, help="tokens for plain (sliding: /4, TTT: /16)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_bench.json")
    args = ap.parse_args(argv)

    cfg = GPTConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1) if args.tiny else GPTConfig()
    seq_len = min(args.seq_len, 64) if args.tiny else args.seq_len
    torch.manual_seed(0)
    model = GPT(cfg).to(args.device)
    with torch.no_grad():  # random weights everywhere (zero-init projections would make blocks no-ops)
        for p in model.parameters():
            p.normal_(0, 0.02)
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, cfg.vocab_size, args.tokens + 1).astype(np.uint16)
    tokens[:: 2 * seq_len] = 1  # documents of 2·seq_len tokens
    v = cfg.vocab_size
    tables = ByteTables(np.full(v, 3, np.int16), np.zeros(v, bool), np.zeros(v, bool))

    rows = []
    for name, kw, n in modes(seq_len, args.tokens):
        evaluate_tokens(model, tokens[: 2 * seq_len + 1], tables, seq_len=seq_len, device=args.device,
                        batch_tokens=args.batch_tokens, compile=args.compile, log=None, **kw)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        res = evaluate_tokens(model, tokens[: n + 1], tables, seq_len=seq_len, device=args.device,
                              batch_tokens=args.batch_tokens, compile=args.compile, log=None, **kw)
        rows.append({"mode": name, "tokens": res.tokens, "seconds": res.seconds,
                     "tokens_per_s": res.tokens / res.seconds})
        print(f"  {name:<20} {res.tokens:>10,} tokens  {res.seconds:8.2f} s  {res.tokens / res.seconds:>12,.0f} tok/s",
              file=sys.stderr)

    quality = []
    if args.artifact and args.data and args.tokenizer:
        for name, kw, _ in modes(seq_len, args.tokens):
            res = evaluate_artifact(args.artifact, args.data, args.tokenizer, device=args.device, seq_len=seq_len,
                                    max_tokens=args.tokens + 1, batch_tokens=args.batch_tokens, log=None, **kw)
            quality.append({"mode": name, "val_bpb": res.val_bpb, "tokens": res.tokens, "seconds": res.seconds})
        for q in quality:
            q["delta_vs_plain"] = q["val_bpb"] - quality[0]["val_bpb"]

    print(f"\n{'mode':<20} {'tokens':>10} {'seconds':>9} {'tokens/s':>14}")
    for r in rows:
        print(f"{r['mode']:<20} {r['tokens']:>10,} {r['seconds']:>9.2f} {r['tokens_per_s']:>14,.0f}")
    if quality:
        print(f"\n{'mode':<20} {'val_bpb':>10} {'Δ vs plain':>11}")
        for q in quality:
            print(f"{q['mode']:<20} {q['val_bpb']:>10.5f} {q['delta_vs_plain']:>+11.5f}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    out = {"command": "python3 " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
           "torch": torch.__version__, "params": model.num_params(), "seq_len": seq_len,
           "batch_tokens": args.batch_tokens, "speed": rows, "quality": quality}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
