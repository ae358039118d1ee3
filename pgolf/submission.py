"""What a generated ``train_gpt.py`` runs: the challenge's entry point for one pgolf config.

``torchrun --standalone --nproc_per_node=N train_gpt.py`` (or ``python train_gpt.py``) trains the
baked config under its wall clock on the challenge's shards, writes ``model.pgolf`` in the working
directory, prints the challenge's lines (``final_pgolf_roundtrip_exact val_loss:... val_bpb:...``
for the artifact's score, then the bytes as code + model), then scores the artifact with the
config's sliding-window and TTT evaluations on every rank, each within ``eval_time_budget``. The
challenge's environment variables override the baked config (:data:`ENV`). Logs go to
``logs/RUN_ID/`` (rank 0's RUN_ID, or a fresh one).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

# The challenge's environment variables -> TrainConfig fields.
ENV = {"SEED": "seed", "ITERATIONS": "iterations", "MAX_WALLCLOCK_SECONDS": "max_wallclock_seconds",
       "TRAIN_BATCH_TOKENS": "train_batch_tokens", "TRAIN_SEQ_LEN": "train_seq_len",
       "VAL_LOSS_EVERY": "val_loss_every", "VAL_BATCH_SIZE": "val_batch_tokens", "VOCAB_SIZE": "vocab_size",
       "WARMDOWN_ITERS": "warmdown_iters", "TRAIN_LOG_EVERY": "train_log_every",
       "EVAL_TIME_BUDGET": "eval_time_budget", "VAL_MAX_TOKENS": "val_max_tokens", "DEVICE": "device"}
# Packages the bundle imports beyond the challenge's own requirements (torch, numpy, sentencepiece).
EXTRA_PACKAGES = ("numba", "zstandard", "msgpack")


def missing_packages() -> list[str]:
    """The :data:`EXTRA_PACKAGES` that cannot be imported here (absent, or refused by an import hook)."""
    out = []
    for name in EXTRA_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def resolve(baked: dict[str, Any], environ: dict[str, str]) -> tuple[Any, Path, Path, str]:
    """``(config, data_dir, tokenizer, run_id)``: the baked config with the environment's overrides,
    and the challenge's default paths (``./data/datasets/fineweb10B_sp<V>``, ``./data/tokenizers/...``)."""
    from pgolf_train.config import make_config, parse_overrides

    values = dict(baked)
    values.update(parse_overrides([f"{field}={environ[var]}" for var, field in ENV.items() if var in environ]))
    cfg = make_config(values, source="train_gpt.py config + environment")
    v = cfg.vocab_size
    data = Path(environ.get("DATA_PATH", f"./data/datasets/fineweb10B_sp{v}"))
    tok = Path(environ.get("TOKENIZER_PATH", f"./data/tokenizers/fineweb_{v}_bpe.model"))
    return cfg, data, tok, environ.get("RUN_ID", str(uuid.uuid4()))


def main(baked: dict[str, Any], code_bytes: int) -> int:
    """Train, export and score the baked config; ``code_bytes`` is ``len(train_gpt.py)``."""
    missing = missing_packages()
    if missing:
        print(f"train_gpt.py needs {', '.join(missing)} beyond the challenge's requirements: "
              f"pip install -r requirements.txt (or pip install {' '.join(missing)})", file=sys.stderr)
        return 2
    try:
        cfg, data, tok, run_id = resolve(baked, dict(os.environ))
        for path, what in ((data, "DATA_PATH"), (tok, "TOKENIZER_PATH")):
            if not path.exists():
                raise FileNotFoundError(f"{what}: {path} not found (set {what})")
        return _run(cfg, data, tok, run_id, code_bytes)
    except (ValueError, OSError) as e:  # ConfigError, ShardError, FormatError are ValueErrors
        print(f"train_gpt.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _run(cfg: Any, data: Path, tok: Path, run_id: str, code_bytes: int) -> int:
    import torch.distributed as dist

    from pgolf.modes import check_eval_modes, eval_modes
    from pgolf_codec.atomic import atomic_write
    from pgolf_eval.evaluate import evaluate_artifact
    from pgolf_eval.scorer import Scorer
    from pgolf_train.trainer import init_distributed, leave_group, train

    modes = eval_modes(cfg)
    check_eval_modes(cfg, modes)
    # Joined here, not in train(): the group outlives training, so every rank scores its share.
    di = init_distributed(cfg.device)
    try:
        if di.distributed:  # one run directory for all ranks: rank 0's id
            box = [run_id]
            dist.broadcast_object_list(box, src=0)
            run_id = box[0]
        out = Path("logs") / run_id
        summary = train(cfg, data, tok, out, scorer=Scorer())
        artifact = Path(summary["artifact"])
        if di.master:
            atomic_write("model.pgolf", artifact.read_bytes(), overwrite=True)
        model_bytes = artifact.stat().st_size
        say = print if di.master else (lambda *a, **k: None)
        say(f"final_pgolf_roundtrip_exact val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f}")
        say(f"Serialized model pgolf: {model_bytes} bytes")
        say(f"Code size: {code_bytes} bytes")
        say(f"Total submission size pgolf: {model_bytes + code_bytes} bytes", flush=True)
        results = {"run_id": run_id, "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"],
                   "val_bpb_prequant": summary["val_bpb_prequant"], "steps": summary["steps"],
                   "train_seconds": summary["train_seconds"], "world_size": di.world_size,
                   "bytes_model": model_bytes, "bytes_code": code_bytes, "bytes_total": model_bytes + code_bytes,
                   "evals": {}}
        for m in modes:
            kw = {k: v for k, v in m.items() if k != "mode"}
            res = evaluate_artifact(artifact, data, tok, device=str(di.device), time_budget=cfg.eval_time_budget,
                                    seq_len=cfg.eval_seq_len or cfg.train_seq_len,
                                    max_tokens=cfg.val_max_tokens or None, log=None, **kw)
            say(f"final_pgolf_{m['mode']} val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f} "
                f"eval_time:{res.seconds * 1000:.0f}ms", flush=True)
            results["evals"][m["mode"]] = {"val_loss": res.val_loss, "val_bpb": res.val_bpb, "seconds": res.seconds,
                                           **({"ttt": res.extra["ttt"]} if "ttt" in res.extra else {})}
            if "ttt" in res.extra:
                from pgolf_eval.ttt import adaptation_note

                note, warn = adaptation_note(res.extra["ttt"])
                say(("WARNING: " if warn else "") + note)
        if di.master:
            atomic_write(out / "results.json", (json.dumps(results, indent=1) + "\n").encode(), overwrite=True)
    finally:
        if di.owns_group:
            leave_group()
    return 0
