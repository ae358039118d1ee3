"""Shared by the benchmarks: write a results JSON atomically (temp file + rename)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(out: str | os.PathLike, result: dict) -> Path:
    """Write `result` to `out` through a temp file in the same folder; print and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
