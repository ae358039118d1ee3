"""Bytes of the generated train_gpt.py per config (what the challenge counts as code), against the
records' hand-made wrappers (~32-40 KB): per module source / minified / lzma alone, and the whole
bundle in each coder x encoding, side by side.

    python3 benchmarks/bundle_bench.py            # demo, h200, record; writes results/bundle.json
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402

from pgolf.bundle import ENCODINGS, _coders, build  # noqa: E402
from pgolf_train.config import load_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 40_000  # the records' hand-made wrappers: 158 KB of source -> ~32 KB (minify + brotli + base85)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="demo,h200,record")
    ap.add_argument("--out", type=Path, default=RESULTS / "bundle.json")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    rows, modules = [], {}
    for name in args.configs.split(","):
        cfg = load_config(name)
        for coder in _coders():
            for enc in ENCODINGS:
                t = time.perf_counter()
                b = build(cfg, coder=coder, encoding=enc, measure=True)
                rows.append({"config": name, "coder": coder, "encoding": enc, "bytes": b.bytes,
                             "payload_bytes": b.payload_bytes, "modules": len(b.modules),
                             "source_bytes": sum(m.source_bytes for m in b.modules),
                             "minified_bytes": sum(m.minified_bytes for m in b.modules),
                             "seconds": time.perf_counter() - t, "vs_goal": b.bytes / GOAL})
                modules[name] = [m.__dict__ for m in b.modules]
    print(f"{'config':<8} {'coder':<6} {'encoding':<8} {'modules':>7} {'source':>9} {'minified':>9} {'bytes':>8} {'/ 40 KB':>8}")
    for r in rows:
        print(f"{r['config']:<8} {r['coder']:<6} {r['encoding']:<8} {r['modules']:>7} {r['source_bytes']:>9,} "
              f"{r['minified_bytes']:>9,} {r['bytes']:>8,} {r['vs_goal']:>8.2f}")
    top = sorted(modules[rows[-1]["config"]], key=lambda m: -m["compressed_bytes"])[:10]
    print(f"\nlargest modules ({rows[-1]['config']}; lzma of each alone):")
    for m in top:
        print(f"  {m['name']:<28} {m['source_bytes']:>8,} -> {m['minified_bytes']:>8,} -> {m['compressed_bytes']:>7,}")
    write_json(args.out, {"command": "python3 " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code_commit": commit,
                          "device": "CPU (bundling is device-independent)", "goal_bytes": GOAL, "rows": rows,
                          "python": platform.python_version(),  # ast.unparse's output, so the bytes, follow it
                          "modules": modules})
    return 0


if __name__ == "__main__":
    sys.exit(main())
