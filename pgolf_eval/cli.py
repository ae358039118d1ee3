"""`pgolf eval ARTIFACT --data DIR --tokenizer MODEL ...`: exact val bpb of an artifact.

Under ``torchrun`` every rank runs the same command; windows (or TTT documents) are split across
ranks and rank 0 prints the report and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path


def register(sub) -> None:
    from pgolf_codec.argtypes import float_range, int_range, nonneg_int, positive_float, positive_int

    from .ngram import NgramTilt
    from .ttt import FULL_LR, LORA_LR, TTTConfig

    p = sub.add_parser("eval", help="exact val bpb of an artifact (plain, sliding, long-context, TTT)",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", type=Path, help="the .pgolf artifact")
    p.add_argument("--data", type=Path, required=True, help="directory with fineweb_val_*.bin (and byte sidecars)")
    p.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model the shards were made with")
    p.add_argument("--seq-len", type=positive_int, default=None, help="window length (default: the model's training context)")
    p.add_argument("--stride", type=positive_int, default=None, help="sliding stride in tokens (default: = seq-len, no overlap)")
    p.add_argument("--truncate", action="store_true",
                   help="score only whole windows, as the challenge's evaluation does (default: every token)")
    p.add_argument("--doc-isolated", action="store_true", help="restart the context at every document's BOS")
    p.add_argument("--rope-scaling", choices=("ntk", "yarn"), default=None, help="RoPE scaling for long contexts")
    p.add_argument("--rope-factor", type=positive_float, default=None, help="context factor (default: seq-len / training seq-len)")
    p.add_argument("--ttt", choices=("lora", "full"), default=None, help="legal score-first test-time training")
    d = TTTConfig()  # the defaults live in one place
    p.add_argument("--ttt-rank", type=positive_int, default=d.rank, help="LoRA rank")
    p.add_argument("--ttt-lr", type=positive_float, default=None, help=f"Adam lr (default {LORA_LR:g} LoRA, {FULL_LR:g} full)")
    p.add_argument("--ttt-epochs", type=nonneg_int, default=d.epochs, help="gradient steps per chunk")
    p.add_argument("--ttt-chunk", type=positive_int, default=d.chunk, help="targets scored, then trained on, per step")
    p.add_argument("--ttt-reset", choices=("doc", "carry"), default=d.reset, help="adapted state per document or carried")
    p.add_argument("--ttt-targets", default=",".join(d.targets),
                   help="LoRA targets: q,k,v,o,up,down,mlp,attn or module-name globs")
    p.add_argument("--ttt-from-start", action=argparse.BooleanOptionalAction, default=d.from_start,
                   help="chunk each document from its first token, adapting inside its first window too "
                        "(--no-ttt-from-start: score the first window whole, as sliding evaluation does)")
    p.add_argument("--ttt-scope", choices=("doc", "phased", "both"), default=None,
                   help="doc: adapters per document; phased: one adapter carried over the stream, trained on "
                        "documents already scored; both: the carried adapter with per-document LoRA on top "
                        "(default: both for LoRA reset per document, else doc)")
    p.add_argument("--ttt-phase-tokens", type=positive_int, default=d.phase_tokens,
                   help="targets of finished documents the carried adapter waits for before each update")
    p.add_argument("--ttt-phase-epochs", type=nonneg_int, default=d.phase_epochs,
                   help="passes of the carried adapter over each scored phase")
    p.add_argument("--ttt-phase-lr", type=positive_float, default=None, help="Adam lr of the carried adapter "
                   "(default: the per-document one)")
    p.add_argument("--ttt-phase-batch", type=positive_int, default=d.phase_batch,
                   help="windows of seq-len per step of the carried adapter")
    p.add_argument("--ttt-parallel-docs", type=nonneg_int, default=d.parallel_docs,
                   help="phased scopes: documents in flight, in stream order (0: from the stream's lengths)")
    p.add_argument("--ngram-tilt", action="store_true",
                   help="tilt each target's distribution toward a causal token n-gram's confident proposal "
                        "(pgolf_eval.ngram; score-first legal, no weight changes; with --ttt the scores only)")
    p.add_argument("--ngram-order", type=int_range(1, 64), default=NgramTilt.order, help="longest n-gram context")
    p.add_argument("--ngram-threshold", type=float_range(0.0, 1.0, lo_open=True), default=NgramTilt.threshold,
                   help="least confidence that tilts")
    p.add_argument("--ngram-boost", type=positive_float, default=NgramTilt.boost,
                   help="nats added to the proposal's logit")
    p.add_argument("--ngram-min-count", type=positive_int, default=NgramTilt.min_count,
                   help="times the proposing context must have been seen")
    p.add_argument("--ngram-scope", choices=("stream", "doc"), default=NgramTilt.scope,
                   help="contexts from anywhere earlier in the stream, or only earlier in the same document")
    p.add_argument("--early-exit", type=float_range(0.0, 1.0, lo_open=True), default=None, metavar="TAU",
                   help="a model with exit heads (exit_layers) scores each token with the first exit whose top "
                        "probability reaches TAU, else its last layer; reports where the positions left "
                        "(with --ttt: the scoring forwards only; adaptation trains the last layer's loss)")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="seconds for the TTT pass: adaptation stops while the remaining chunks can still be scored within it")
    p.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="forward positions per batch; TTT adapts batch-tokens/seq-len documents at once "
                        "(default: 131072 on a GPU, 16384 on a CPU)")
    p.add_argument("--max-tokens", type=int_range(2), default=None, help="evaluate only the first N val tokens (quick checks)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: the local rank's GPU if any)")
    p.add_argument("--compile", action="store_true", help="torch.compile the scorer")
    p.add_argument("--trust-code", action="store_true", help="run the artifact's embedded model source")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a report")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.set_defaults(func=main)


def _device(arg: str | None) -> str:
    import torch

    from pgolf_train.device import check_device

    if arg:
        return check_device(arg, "--device")
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _init_distributed(device: str) -> bool:
    """Join the ``torchrun`` process group when launched by it (NCCL on CUDA, else gloo)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pgolf eval: warning: {message}", file=sys.stderr, flush=True)


def ttt_config(args: argparse.Namespace):
    """The ``--ttt*`` flags as a :class:`~pgolf_eval.ttt.TTTConfig`, or None without ``--ttt``."""
    from .ttt import TTTConfig, parse_targets

    if not args.ttt:
        return None
    if args.stride is not None:
        raise ValueError("--stride does not apply with --ttt: the chunk (--ttt-chunk) is the stride")
    return TTTConfig(kind=args.ttt, rank=args.ttt_rank, lr=args.ttt_lr, epochs=args.ttt_epochs, chunk=args.ttt_chunk,
                     reset=args.ttt_reset, targets=parse_targets(args.ttt_targets), from_start=args.ttt_from_start,
                     scope=args.ttt_scope, phase_tokens=args.ttt_phase_tokens, phase_epochs=args.ttt_phase_epochs,
                     phase_lr=args.ttt_phase_lr, phase_batch=args.ttt_phase_batch,
                     parallel_docs=args.ttt_parallel_docs)


def main(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import dist_rank_world, evaluate_artifact

    warnings.showwarning = _show_warning
    if args.stride is not None and args.seq_len is not None and args.stride > args.seq_len:
        raise ValueError(f"--stride {args.stride}: must be at most --seq-len ({args.seq_len})")
    device = _device(args.device)
    ttt = ttt_config(args)
    tilt = None
    if args.ngram_tilt:
        from .ngram import NgramTilt

        tilt = NgramTilt(order=args.ngram_order, threshold=args.ngram_threshold, boost=args.ngram_boost,
                         min_count=args.ngram_min_count, scope=args.ngram_scope)
    owns_group = _init_distributed(device)
    ok = False
    try:
        res = evaluate_artifact(args.artifact, args.data, args.tokenizer, device=device, trust_code=args.trust_code,
                                rope_scaling=args.rope_scaling, rope_factor=args.rope_factor,
                                max_tokens=args.max_tokens, seq_len=args.seq_len, stride=args.stride,
                                truncate=args.truncate, doc_isolated=args.doc_isolated, ttt=ttt,
                                time_budget=args.time_budget, compile=args.compile,
                                batch_tokens=args.batch_tokens, early_exit=args.early_exit, tilt=tilt)
        ok = True
    finally:
        if owns_group:
            if ok:  # no rank closes its sockets while a peer still works (not after an error: no hang)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    if dist_rank_world()[0] != 0 or int(os.environ.get("RANK", "0")) != 0:
        return 0
    d = res.to_dict()
    d.update(device=device, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
             command="pgolf eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(d, indent=2) + "\n")
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_report(d))
    return 0


def format_report(d: dict) -> str:
    """A short human-readable report of one evaluation (the dict of ``EvalResult.to_dict``)."""
    ex = d.get("extra", {})
    lines = [f"artifact      {ex.get('artifact', '?')} ({ex.get('artifact_bytes', 0):,} bytes)",
             f"mode          {d['mode']}  seq_len {d['seq_len']}  stride {d['stride']}  coverage {d['coverage']}"
             f"{'  doc-isolated' if d['doc_isolated'] else ''}  world {d['world_size']}"]
    if ex.get("rope_scaling"):
        lines.append(f"rope          {ex['rope_scaling']} x{ex['rope_factor']:g}")
    if "ttt" in ex:
        t = ex["ttt"]
        lines.append(f"ttt           {t['kind']} {t.get('scope', 'doc')} lr {t['lr']:g} epochs {t['epochs']} "
                     f"chunk {t['chunk']} reset {t['reset']}{' from-start' if t.get('from_start') else ''}"
                     f"  adapted {t['adapted_chunks']}/{t['chunks']} chunks"
                     + (f", {t['phases_trained']}/{t['phases']} phases" if "phases" in t else ""))
        if t.get("warmup_s") is not None:
            lines.append(f"warm-up       {t['warmup_s']:.1f} s on synthetic tokens, outside the timer")
    if "tilt" in ex:
        t = ex["tilt"]
        lines.append(f"n-gram tilt   order {t['order']} threshold {t['threshold']:g} boost {t['boost']:g} "
                     f"min-count {t['min_count']} scope {t['scope']}: {t['targets_tilted']:,} targets ({t['tilted_share']:.1%}), "
                     f"proposal right {t['proposal_right'] or 0:.1%}")
    if d.get("early_exit"):
        e = d["early_exit"]
        where = ", ".join(f"layer {x['layer']} {x['share']:.1%}" for x in e["exits"])
        lines.append(f"early exit    tau {e['threshold']:g}: {where}, final {e['final']['share']:.1%} of "
                     f"{e['positions']:,} positions; layers skipped {e['layers_skipped_frac']:.1%} "
                     f"(of {e['virtual_layers']}, an upper bound on compute saved)")
    tps = d.get("tokens_per_second") or 0
    lines += [f"tokens        {d['tokens']:,}   bytes {d['bytes']:,} ({ex.get('byte_source', '?')})",
              f"val_loss      {d['val_loss']:.6f} nats/token",
              f"val_bpb       {d['val_bpb']:.6f}",
              f"time          {d['seconds']:.1f} s  ({tps:,.0f} tokens/s)"]
    if d.get("docs"):
        from .breakdown import format_buckets

        lines += ["", *format_buckets(d["docs"])]
    if "ttt" in ex:  # last: how much of the stream was adapted, never hidden
        from .ttt import adaptation_note

        note, warn = adaptation_note(ex["ttt"])
        lines.append(("WARNING: " if warn else "") + note)
    return "\n".join(lines)
