"""`pgolf run`: text → shards → train → artifact → score, in one command, with a report.

RUNDIR layout::

    data/            shards + tokenizer (only when --docs is given)
    train/           the trainer's output: train.jsonl, checkpoint, final_model.safetensors, model.pgolf
    model_alloc.pgolf  with quantize_budget > 0: GPTQ + the bit allocator's artifact (then the scored one)
    eval_*.json      one file per evaluation mode run on the artifact
    report.json      every number below, machine-readable
    report.md        the same for people
    *.png            loss/bpb curves and bytes per tensor
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path

from pgolf.modes import check_eval_modes as _check_eval_modes, eval_modes as _eval_modes

CAP_BYTES = 16_000_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pgolf_codec.argtypes import positive_int

    p.add_argument("--config", required=True, help="config name (pgolf_train/configs/NAME.toml) or path")
    src = p.add_argument_group("data (one of)")
    src.add_argument("--docs", nargs="+", type=Path, help="documents (.jsonl/.jsonl.xz/.jsonl.zst/.txt); "
                     "the first --val-docs documents become validation")
    src.add_argument("--data", type=Path, help="a directory of existing shards (fineweb_train_*.bin, fineweb_val_*.bin)")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model; with --docs, reuse it instead of training one")
    p.add_argument("--val-docs", type=positive_int, default=None, help="validation documents taken from the head of --docs "
                   "(default: the config's val_docs)")
    p.add_argument("--out", type=Path, required=True, help="run directory (must be new or empty unless --force)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--force", action="store_true", help="reuse a run directory that already holds files")


def register(sub) -> None:
    p = sub.add_parser("run", help="data → train → artifact → score, with a report (the main job)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"run directory {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"run directory {out} is not empty; pass --force to reuse it (files inside may be replaced)")


def _replacing(args, out: Path) -> contextlib.ExitStack:
    """With --force, the previous run's data/ (when rebuilt from --docs) and train/ are moved aside
    while the new ones are made, and put back if making them fails."""
    from pgolf_train.staging import set_aside

    stack = contextlib.ExitStack()
    data = (out / "data").resolve()
    inputs = [Path(p).resolve() for p in (*(args.docs or ()), args.tokenizer, args.data) if p is not None]
    if args.docs and not any(p == data or data in p.parents for p in inputs):  # an input kept in the old data/
        stack.enter_context(set_aside(out / "data"))
    stack.enter_context(set_aside(out / "train"))
    return stack


def _resolve_data(args, cfg, out: Path) -> tuple[Path, Path, dict]:
    """Return (data_dir, tokenizer_path, prepare_manifest_or_empty)."""
    if args.docs and args.data:
        raise ValueError("give either --docs or --data, not both")
    if args.data:
        if args.tokenizer is None:
            raise ValueError("--data needs --tokenizer (the SentencePiece model the shards were made with)")
        return args.data, args.tokenizer, {}
    if not args.docs:
        raise ValueError("give --docs FILE... (raw documents) or --data DIR --tokenizer MODEL (existing shards)")
    from pgolf_train.prepare import prepare

    data_dir = out / "data"  # prepare builds beside it and swaps in only a complete dataset
    val_docs = args.val_docs if args.val_docs is not None else cfg.val_docs
    manifest = prepare(args.docs, data_dir, vocab=cfg.vocab_size, val_docs=val_docs, tokenizer=args.tokenizer,
                       force=args.force)
    tok = args.tokenizer if args.tokenizer is not None else data_dir / "tokenizer.model"
    return data_dir, tok, manifest


def _allocate(cfg, summary: dict, data_dir: Path, tokenizer: Path, out: Path, device: str) -> dict:
    """GPTQ + the bit allocator on the trained weights within ``cfg.quantize_budget`` bytes.

    Its artifact becomes the scored one (the config chose it before any score was seen); the
    recipe's artifact and plain score stay in the summary for comparison. Refuses (ValueError)
    an artifact that loses more than ``cfg.quantize_tolerance`` bpb to the trained weights.
    """
    from pgolf_codec.container import write_bytes_atomic
    from pgolf_eval.scorer import Scorer
    from pgolf_train.quantize import quantize_checkpoint

    res = quantize_checkpoint(out / "train" / "final_model.safetensors", data_dir, tokenizer, cfg.quantize_budget,
                              val_tokens=cfg.val_max_tokens or None, device=device,
                              bpb_before=summary["val_bpb_prequant"],  # the same weights, stream and windows
                              scorer=Scorer())
    print(f"allocator: {res.info.total_bytes:,} bytes within {cfg.quantize_budget:,}; val_bpb {res.bpb_before:.4f} "
          f"-> {res.bpb_after:.4f} (+{res.delta:.4f}); the recipe's artifact: {summary['val_bpb']:.4f} "
          f"in {summary['artifact_bytes']:,} bytes", flush=True)
    if res.delta > cfg.quantize_tolerance:
        raise ValueError(f"the allocator's artifact loses {res.delta:.4f} bpb to the trained weights, more than "
                         f"quantize_tolerance={cfg.quantize_tolerance}; not scoring it (the recipe's artifact is "
                         f"{summary['artifact']})")
    path = out / "model_alloc.pgolf"
    write_bytes_atomic(path, res.data, overwrite=True)
    return {**summary, "artifact": str(path), "val_bpb": res.bpb_after, "eval": None,
            "val_docs": None, "val_per_doc": None,  # they were the recipe artifact's
            "artifact_bytes": res.info.total_bytes, "model_bytes": res.info.model_bytes,
            "code_bytes": res.info.code_bytes,
            "recipe_artifact": {"path": summary["artifact"], "val_bpb": summary["val_bpb"],
                                "artifact_bytes": summary["artifact_bytes"]},
            "quantize": {"budget": cfg.quantize_budget, "val_bpb_weights": res.bpb_before, "labels": res.labels}}


def main(args) -> int:
    from pgolf_train.config import load_config

    out = args.out
    _check_out_dir(out, args.force)
    cfg = load_config(args.config, args.overrides)
    modes = _eval_modes(cfg)
    _check_eval_modes(cfg, modes)
    if cfg.device != "auto":
        from pgolf_train.device import check_device

        check_device(cfg.device, "device")  # before the data stage, not at the trainer's start
    stages: dict[str, float] = {}

    from pgolf_train.staging import make_dirs

    created = make_dirs(out)
    try:  # a failed data or train stage leaves the run directory as it was (and removes one it made)
        with _replacing(args, out):
            t0 = time.perf_counter()
            data_dir, tokenizer, manifest = _resolve_data(args, cfg, out)
            stages["prepare_s"] = time.perf_counter() - t0

            from pgolf_eval.scorer import Scorer
            from pgolf_train.trainer import train

            t0 = time.perf_counter()
            # --force covers the whole run
            summary = train(cfg, data_dir, tokenizer, out / "train", scorer=Scorer(), force=args.force)
            stages["train_total_s"] = time.perf_counter() - t0
    except BaseException:
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        raise

    import torch

    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    if cfg.quantize_budget:
        t0 = time.perf_counter()
        summary = _allocate(cfg, summary, data_dir, tokenizer, out, device)
        stages["allocate_s"] = time.perf_counter() - t0

    evals = {"plain": {"val_bpb": summary["val_bpb"], "mode": "plain", "docs": summary.get("val_docs"),
                       "per_doc": summary.get("val_per_doc")}}
    if summary.get("eval"):
        evals["plain"] = summary["eval"]
    from pgolf_eval.evaluate import evaluate_artifact

    for m in modes:
        t0 = time.perf_counter()
        kw = {k: v for k, v in m.items() if k != "mode"}
        res = evaluate_artifact(Path(summary["artifact"]), data_dir, tokenizer, device=device,
                                seq_len=cfg.eval_seq_len or cfg.train_seq_len, time_budget=cfg.eval_time_budget,
                                max_tokens=cfg.val_max_tokens or None, **kw)
        stages[f"eval_{m['mode']}_s"] = time.perf_counter() - t0
        evals[m["mode"]] = res.to_dict()
        (out / f"eval_{m['mode']}.json").write_text(json.dumps(res.to_dict(), indent=2))

    from pgolf.report import write_report

    report = write_report(out, cfg=cfg, summary=summary, evals=evals, stages=stages, manifest=manifest,
                          data_dir=data_dir, tokenizer=tokenizer)
    print((out / "report.md").read_text())
    over = report["artifact_bytes"] > CAP_BYTES
    if over:
        print(f"pgolf run: the artifact is {report['artifact_bytes']:,} bytes, over the {CAP_BYTES:,}-byte cap")
    ch = report.get("challenge")
    if cfg.max_bytes_count == "challenge" and ch and ch["total_bytes"] > cfg.max_artifact_bytes:
        print(f"pgolf run: the challenge's count, train_gpt.py {ch['code_bytes']:,} + artifact "
              f"{ch['model_bytes']:,} = {ch['total_bytes']:,} bytes, is over max_artifact_bytes "
              f"{cfg.max_artifact_bytes:,}")
        over = True
    return 1 if over else 0

