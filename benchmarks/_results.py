"""Shared by the benchmarks: best-of-N wall time, writing a results JSON atomically, git queries."""
from __future__ import annotations

import json
import os
import subprocess
import time
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


def best_time(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` calls of `fn()`, in seconds of wall time."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cuda_ms(fn, iters: int) -> float:
    """Mean ms of ``fn`` over ``iters`` calls after 3 warm-up calls, timed by CUDA events."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def git(*args: str) -> str | None:
    """``git ARGS`` in the benchmarks' checkout, stripped; None without git or outside a repository."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
