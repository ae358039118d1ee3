"""Does distillation pay inside the budget? The student with an in-run teacher vs the same student alone.

    python benchmarks/distill_bench.py --data DIR --tokenizer MODEL --out FILE.json \\
        [--config h200] [--budget 300] [--arm baseline|distill] [--teacher-frac 0.4] \\
        [--teacher "num_layers=11;model_dim=640;num_heads=10;num_kv_heads=5"] [--alpha 0.5] \\
        [--alpha-end 1.0] [--alpha-schedule constant] [--temperature 1.0] [--generations 1] [--set KEY=VALUE ...]

Each arm is one call of the trainer's ``train()`` on the same total budget of ``--budget`` seconds
of training (the teacher's share included; compile warm-ups and evaluations are outside it, as in
every pgolf run):

* ``baseline``: the student config alone for the whole budget;
* ``distill``: a teacher (``--teacher``: overrides of the student config; ``""`` = born-again, the
  student's own size) for ``--teacher-frac`` of the budget, then the student on the rest with
  ``α·CE + (1−α)·T²·KL``.

It reports the student's post-quantization bpb (the artifact's: the score that counts), its
pre-quantization bpb, the teacher's own bpb, steps and seconds per phase. The H200 protocol is one
arm per call (each fits in 10 minutes with compile and evaluation): ``--arm baseline``, then
``--arm distill --teacher-frac 0.4`` and ``--teacher-frac 0.6``. Rows accumulate in ``--out``
(keyed by arm and share, a rerun replaces its row) with the command, device and date of each;
when a baseline row is present every distill row gets ``delta_vs_baseline`` (negative = better).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from pgolf_eval.scorer import Scorer  # noqa: E402
from pgolf_train.config import load_config
from pgolf_train.trainer import device_name, train
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported, not run
from _results import write_json  # noqa: E402

# A teacher ~1.8× the baseline student's parameters: wider and deeper, still a few hundred steps
# in 40% of 300 s on one H200. Tune with --teacher.
DEFAULT_TEACHER = "num_layers=11;model_dim=640;num_heads=10;num_kv_heads=5"
ROW_KEYS = ("val_bpb", "val_bpb_prequant", "teacher_val_bpb", "steps", "train_seconds", "wall_seconds",
            "ms_per_step", "params", "artifact_bytes", "model_bytes", "fits")


def arm_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides of this call's arm (after the common ``--budget`` and ``--set`` ones)."""
    out = [f"max_wallclock_seconds={args.budget}", *args.set]
    if args.arm == "distill":
        out += [f"distill_teacher_frac={args.teacher_frac}", f"teacher_overrides={json.dumps(args.teacher)}",
                f"distill_alpha={args.alpha}", f"distill_alpha_end={args.alpha_end}",
                f"distill_alpha_schedule={json.dumps(args.alpha_schedule)}",
                f"distill_temperature={args.temperature}", f"distill_generations={args.generations}"]
    return out


def arm_label(args: argparse.Namespace) -> str:
    if args.arm == "baseline":
        return "baseline"
    kind = "born_again" if not args.teacher.strip() else "distill"
    return f"{kind}_t{round(100 * args.teacher_frac)}" + (f"_g{args.generations}" if args.generations > 1 else "")


def run_arm(args: argparse.Namespace, run_dir: Path) -> dict:
    """Train one arm; its row (scores, steps, time per phase)."""
    cfg = load_config(args.config, arm_overrides(args))
    summary = train(cfg, args.data, args.tokenizer, run_dir, scorer=Scorer(), force=True, echo=not args.quiet)
    row = {k: summary.get(k) for k in ROW_KEYS}
    row["distill"] = summary.get("distill")
    row["overrides"] = arm_overrides(args)
    row["run_dir"] = str(run_dir)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory with fineweb_train_*.bin / fineweb_val_*.bin shards")
    ap.add_argument("--tokenizer", required=True, help="the SentencePiece .model of the shards")
    ap.add_argument("--out", required=True, help="results JSON (rows of earlier calls are kept)")
    ap.add_argument("--config", default="h200", help="the student's config (name or .toml)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of training in all (teacher included)")
    ap.add_argument("--arm", choices=("baseline", "distill"), default="distill")
    ap.add_argument("--teacher-frac", type=float, default=0.4, help="share of the budget for the teacher")
    ap.add_argument("--teacher", default=DEFAULT_TEACHER, help="'k=v;k=v' teacher overrides ('' = born-again)")
    ap.add_argument("--alpha", type=float, default=0.5, help="hard-label weight at the student's start")
    ap.add_argument("--alpha-end", type=float, default=1.0, help="hard-label weight at its end (linear/cosine)")
    ap.add_argument("--alpha-schedule", default="constant", choices=("constant", "linear", "cosine"))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--generations", type=int, default=1, help="teachers in turn within the share (born-again chain)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of the student config")
    ap.add_argument("--run-dir", help="where the runs go (default: a temporary directory)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the training logs")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)

    label = arm_label(args)
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="distill_bench_"))
    t = time.perf_counter()
    row = run_arm(args, root / label)
    want = load_config(args.config, arm_overrides(args)).device
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = device_name(torch.device("cuda", 0) if cuda else torch.device("cpu"))
    row.update(label=label, arm=args.arm, budget_s=args.budget, command=shlex.join(["python3", "benchmarks/distill_bench.py", *argv]),
               device=device, date=datetime.datetime.now().isoformat(timespec="seconds"),
               bench_seconds=time.perf_counter() - t, torch=torch.__version__)
    print(f"{label}: val_bpb {row['val_bpb']:.4f} (pre-quant {row['val_bpb_prequant']:.4f})"
          + (f"  teacher {row['teacher_val_bpb']:.4f}" if row.get("teacher_val_bpb") is not None else "")
          + f"  {row['steps']} student steps, {row['train_seconds']:.1f}s of training", flush=True)

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    result["rows"][label] = row
    base = result["rows"].get("baseline")
    for r in result["rows"].values():
        if base is not None and r["arm"] == "distill":
            r["delta_vs_baseline"] = r["val_bpb"] - base["val_bpb"]
    result.update(command=row["command"], device=device, date=row["date"],
                  protocol=f"{args.budget:g} s of training per arm (teacher included), config {args.config}")
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
