"""The challenge's count of an entry: ``len(train_gpt.py)`` (the script `pgolf submit` generates for
the run's config) + the artifact's bytes, against 16,000,000. `pgolf run`'s report and
`pgolf inspect` state it beside the artifact's own count."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from typing import Any, Callable

CAP_BYTES = 16_000_000


def challenge_count(cfg: Any, artifact_bytes: int) -> dict:
    """``{code_bytes, model_bytes, total_bytes, headroom_bytes, ...}`` for a TrainConfig ``cfg``."""
    from pgolf.bundle import build

    b = build(cfg)
    total = b.bytes + artifact_bytes
    return {"code_bytes": b.bytes, "model_bytes": artifact_bytes, "total_bytes": total,
            "headroom_bytes": CAP_BYTES - total, "bundle_coder": b.coder, "bundle_encoding": b.encoding,
            "bundle_modules": len(b.modules)}


def artifact_count(path: str) -> dict | None:
    """The count for an artifact that records its training config (``metadata.train.config``), else None."""
    from pgolf_codec.container import read_header
    from pgolf_train.config import ConfigError, make_config

    h = read_header(path)
    config = (h.metadata.get("train") or {}).get("config") if isinstance(h.metadata.get("train"), dict) else None
    if not isinstance(config, dict):
        return None
    try:
        cfg = make_config(config, source=f"{path}: metadata train.config")
    except ConfigError:
        return None
    return challenge_count(cfg, h.info.total_bytes)


def with_challenge_count(inspect: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`pgolf inspect` (the codec's), then the challenge's count when the artifact records its config."""
    def run(args: argparse.Namespace) -> int:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = inspect(args)
        count = artifact_count(args.artifact) if rc == 0 else None
        if getattr(args, "json", False) and rc == 0:
            d = json.loads(out.getvalue())
            d["challenge"] = count
            print(json.dumps(d, indent=1))
            return rc
        print(out.getvalue(), end="")
        if rc == 0:
            print(f"challenge count: train_gpt.py {count['code_bytes']:,} + artifact {count['model_bytes']:,} = "
                  f"{count['total_bytes']:,} bytes (headroom {count['headroom_bytes']:,} under {CAP_BYTES:,})"
                  if count else "challenge count: unknown (the artifact records no training config; "
                  "`pgolf submit` a `pgolf run` directory)")
        return rc
    return run
