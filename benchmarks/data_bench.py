"""Data pipeline benchmark: SentencePiece tokenization throughput (1 and 2 processes) and the
vocabulary sweep (tokens/byte on FineWeb vs embedding bytes), on the shared FineWeb/Wikipedia data.

    python3 benchmarks/data_bench.py [--data ../shared/data] [--wiki-shards 3] [--sample-mb 8]

Writes benchmarks/results/data_bench.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from pgolf_train.prepare import read_documents, encode_documents, format_sweep, sweep

REPO = Path(__file__).resolve().parents[1]


def throughput(texts: list[str], model: Path, workers: int) -> dict:
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    t0 = time.perf_counter()
    tokens = sum(int(a.size) for a in encode_documents(texts, model, workers))
    dt = time.perf_counter() - t0
    return {"workers": workers, "text_mb": round(mb, 2), "tokens": tokens, "seconds": round(dt, 3),
            "mb_per_s": round(mb / dt, 2), "tokens_per_s": round(tokens / dt)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--wiki-shards", type=int, default=3, help="Wikipedia shards tokenized for throughput")
    ap.add_argument("--sample-mb", type=float, default=8.0, help="tokenizer training text per vocab, MB")
    ap.add_argument("--vocabs", default="256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--bits", type=float, default=6)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_bench.json"))
    args = ap.parse_args()
    data = Path(args.data)
    model = data / "tokenizers" / "fineweb_1024_bpe.model"
    wiki = [data / "wikipedia" / f"enwiki20190720_pages_{i:03d}.jsonl.xz" for i in range(args.wiki_shards)]
    texts = list(read_documents(wiki, "text", None, [0]))

    rows = [throughput(texts, model, w) for w in (1, 2)]
    print(f"{'workers':>7} {'text MB':>8} {'tokens':>11} {'seconds':>8} {'MB/s':>7} {'tokens/s':>10}   (sp1024)")
    for r in rows:
        print(f"{r['workers']:>7} {r['text_mb']:>8} {r['tokens']:>11,} {r['seconds']:>8} {r['mb_per_s']:>7} "
              f"{r['tokens_per_s']:>10,}")

    # the sweep trains on Wikipedia (later shards than the throughput ones) and measures on FineWeb
    train = [data / "wikipedia" / f"enwiki20190720_pages_{i:03d}.jsonl.xz" for i in range(3, 8)]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    sweep_rows = sweep(train, data / "fineweb" / "parameter_golf_verify_docs_200.jsonl", vocabs, bits=args.bits,
                       dim=args.dim, sample_bytes=int(args.sample_mb * 1e6), workers=os.cpu_count())
    print(format_sweep(sweep_rows, args.bits, args.dim))

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # shared machines skew the timings
        "python": platform.python_version(),
        "throughput": {"tokenizer": "fineweb_1024_bpe (sp1024)", "inputs": [p.name for p in wiki], "rows": rows},
        "sweep": {"train": [p.name for p in train], "val": "parameter_golf_verify_docs_200.jsonl",
                  "bits": args.bits, "dim": args.dim, "rows": sweep_rows},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
