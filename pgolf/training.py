"""`pgolf train` and `pgolf quantize`: the trainer's and quantizer's commands, handed the evaluator
(pgolf_eval sits above pgolf_train, so the commands are put together here).
``torchrun --standalone --nproc_per_node=N -m pgolf train --config NAME ...`` trains on N processes."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any


def register(sub) -> None:
    from pgolf_eval.scorer import Scorer
    from pgolf_train import quantize

    add_train_parser(sub)
    quantize.add_parser(sub, Scorer)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pgolf train``; every config field is also a ``--FIELD=VALUE`` override."""
    from pgolf_train.config import field_types

    p = subparsers.add_parser(
        "train", help="train a model within a wall-clock budget and export its artifact",
        description="Train, export model.pgolf through the codec recipe, and report exact bpb of the artifact. "
                    "Any config field can be overridden as --FIELD=VALUE (see --dry-run --json for the list).")
    p.add_argument("--config", default="baseline", help="config name (pgolf_train/configs/NAME.toml) or a .toml path")
    p.add_argument("--data", help="directory with fineweb_train_*.bin / fineweb_val_*.bin shards")
    p.add_argument("--tokenizer", help="the SentencePiece .model the shards were made with")
    p.add_argument("--out", help="run directory (train.log, train.jsonl, checkpoint.pt, model.pgolf, ...)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count; no training")
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace a previous run's files in --out (they wait in "
                   "--out/.previous-run until this run has finished)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    overrides = p.add_argument_group("config overrides")
    for name, tp in field_types().items():
        overrides.add_argument(f"--{name}", dest=f"override__{name}", metavar=_type_name(tp).upper(),
                               default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_train)
    return p


def _overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    for key, value in vars(args).items():
        if key.startswith("override__") and value is not None:
            out.append(f"{key.removeprefix('override__')}={value}")
    return out


def _run_train(args: argparse.Namespace) -> int:
    from pgolf_eval.scorer import Scorer
    from pgolf_train.build import count_params
    from pgolf_train.config import ConfigError, load_config
    from pgolf_train.distributed import resolve_grad_accum
    from pgolf_train.trainer import train

    cfg = load_config(args.config, _overrides_from_args(args))
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        info = {"config": cfg.to_dict(), "params": count_params(cfg), "world_size": world,
                "grad_accum": resolve_grad_accum(cfg, world)}
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info["config"].items():
                print(f"{k} = {v!r}")
            print(f"params = {info['params']:,}  (world_size {world}, grad_accum {info['grad_accum']})")
        return 0
    missing = [flag for flag, v in (("--data", args.data), ("--tokenizer", args.tokenizer), ("--out", args.out)) if not v]
    if missing:
        raise ConfigError(f"pgolf train needs {', '.join(missing)} (or --dry-run)")
    summary = train(cfg, args.data, args.tokenizer, args.out, scorer=Scorer(), resume=args.resume, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("val_bpb", "val_bpb_prequant", "steps", "train_seconds", "artifact_bytes", "artifact")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0
