"""The causal n-gram tilt (pgolf_eval/ngram.py) on an artifact: the same evaluation without and with
it, paired over documents by length bucket, and how often the tilt fires and is right.

    python3 benchmarks/ngram_tilt.py --artifact A.pgolf --data DIR --tokenizer T.model \\
        [--stride 64] [--device cuda] [--max-tokens N] --out benchmarks/results/ngram_tilt_cpu.json

Plain evaluation by default (``--stride`` for sliding windows). Both passes score the same windows
with the same numerics (on the CPU fp32, on CUDA bf16 autocast), so the difference is the tilt's.
``--variants``: ``records`` is ``NgramTilt()``, the 1.0565 stack's settings as its README states them
(a context seen once proposes, with confidence 1); ``min2`` asks the proposing context to have
been seen twice (one discrete choice, from how often once-seen contexts are right on these
documents); ``doc`` proposes only from earlier in the same document (the second choice, after the
first two lost on the short documents). Nothing else is tuned here.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402

import torch  # noqa: E402

from pgolf_eval.breakdown import compare  # noqa: E402
from pgolf_eval.evaluate import evaluate_artifact  # noqa: E402
from pgolf_eval.ngram import NgramTilt  # noqa: E402

VARIANTS = {"records": NgramTilt(), "min2": NgramTilt(min_count=2), "doc": NgramTilt(scope="doc")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: plain)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--variants", default="records,min2", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    commit = git("rev-parse", "HEAD")  # at the start: the code that runs (a later commit may land meanwhile)
    rows = {}
    for name, tilt in [("untilted", None), *((v, VARIANTS[v]) for v in names)]:
        t0 = time.perf_counter()
        r = evaluate_artifact(args.artifact, args.data, args.tokenizer, device=args.device, stride=args.stride,
                              max_tokens=args.max_tokens, tilt=tilt, log=None).to_dict()
        rows[name] = r
        print(f"{name:9s} {r['mode']:8s} val_bpb {r['val_bpb']:.5f}  {r['tokens']:,} tokens  "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    comparisons = {}
    for v in names:
        d = comparisons[v] = compare(rows[v], rows["untilted"])
        o = d["overall"]
        ci = "[{:+.4f}, {:+.4f}]".format(*o["ci95"]) if o["ci95"] else "(one document: no interval)"
        print(f"{v} - untilted: {o['delta']:+.4f} {ci} ({o['verdict']}); "
              + ", ".join(f"{b['bucket']} {b['delta']:+.4f} ({b['verdict']})" for b in d["buckets"]))
        t = rows[v]["extra"]["tilt"]
        print(f"  tilted {t['tilted_share']:.1%} of the targets, proposal right {t['proposal_right'] or 0:.1%}")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, torch {torch.__version__}",
        "artifact": args.artifact,
        "rows": {k: {kk: v[kk] for kk in ("val_bpb", "val_loss", "tokens", "bytes", "seconds", "mode", "stride",
                                            "seq_len", "docs", "extra")} for k, v in rows.items()},
        "vs_untilted": comparisons,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
