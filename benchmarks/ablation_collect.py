"""Collect the arms of ``benchmarks/h200_ablation.sh`` into one results JSON, each against `ref`.

Every arm's run directory (its ``reports.tar`` unpacked) gives steps, ms/step, pre-quantization,
plain and sliding bpb and bytes; plain and sliding are compared with the reference arm's, document
by document, by length bucket, with a paired 95% bootstrap interval (a difference inside it is a
tie). The reference is the ``ref`` arm of the same campaign (same budget, same machine), or, with
``--reference-sweep``, the 300-s `h200` rows of a sweep JSON (as ``archs_collect.py`` uses).

    python3 benchmarks/ablation_collect.py --run ref=DIR --run xsa_all=DIR ... --budget 300 \\
        --code-commit C --out benchmarks/results/ablation_h200.json
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from ablation_arms import ARMS  # noqa: E402
from archs_collect import arm_row, print_arms  # noqa: E402


def reference_evals(args: argparse.Namespace, runs: dict[str, Path]) -> tuple[dict, str]:
    if "ref" in runs:
        rep = json.loads((runs["ref"] / "report.json").read_text())
        return {m: rep["evals"][m] for m in ("plain", "sliding")}, "the ref arm (h200) of this campaign"
    if args.reference_sweep is None:
        raise SystemExit("no reference: give --run ref=DIR (same campaign) or --reference-sweep JSON")
    rows = {r["variant"]: r for r in json.loads(args.reference_sweep.read_text())["rows"]}
    return {"plain": rows["plain"], "sliding": rows["sliding s=64"]}, f"h200 rows of {args.reference_sweep}"


RUNNER_SETS = ("max_wallclock_seconds=", "eval_ttt=")  # what h200_ablation.sh adds to every arm


def ran_overrides(argv: list[str]) -> list[str]:
    """The ``--set`` overrides a run's report says it ran with (its ``argv``), less the budget and TTT
    switch the runner gives every arm: the arm's own, and any EXTRA. From the run, not from today's
    ``ARMS``, so a run collects the same after its arm is changed or removed."""
    sets = [v for k, v in zip(argv, argv[1:]) if k == "--set"]
    return [kv for kv in sets if not kv.startswith(RUNNER_SETS)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="ARM=RUNDIR (the arm's name, as it ran)")
    ap.add_argument("--budget", type=float, required=True, help="seconds of training every arm ran")
    ap.add_argument("--reference-sweep", type=Path, help="without a ref arm: a sweep JSON with h200's rows")
    ap.add_argument("--code-commit", required=True)
    ap.add_argument("--device", default="NVIDIA H200")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs: dict[str, Path] = {}
    for item in args.run:
        name, _, d = item.partition("=")
        if not name or not d:
            raise SystemExit(f"--run {item!r}: expected ARM=RUNDIR")
        if not (Path(d) / "report.json").is_file():
            raise SystemExit(f"{name}: no report.json in {d}")
        runs[name] = Path(d)
    ref, ref_what = reference_evals(args, runs)
    rows = []
    for name, d in runs.items():
        ran = ran_overrides(json.loads((d / "report.json").read_text())["argv"])
        if name in ARMS and ARMS[name] != ran[:len(ARMS[name])]:
            print(f"{name}: ran with {ran}, not today's {ARMS[name]} (the arm changed since; "
                  "the row records what ran)", file=sys.stderr)
        rows.append(arm_row(name, d, ref, ran))
    for r in rows:
        if abs(r["train_seconds"] - args.budget) > 5:
            raise SystemExit(f"{r['arm']}: trained {r['train_seconds']:.0f} s, not the --budget {args.budget:.0f} s")
    result = {"command": f"ARMS='{' '.join(runs)}' BUDGET={args.budget:g} bash benchmarks/h200_ablation.sh; then "
                         "python3 benchmarks/ablation_collect.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "code_commit": args.code_commit, "date": date.today().isoformat(), "device": args.device,
              "protocol": f"H200-300 at {args.budget:g} s of training (one H200, the 62 Wikipedia shards with the "
                          "sp4096 tokenizer, the 200 FineWeb documents for validation); TTT off",
              "reference": ref_what, "arms": rows, "note": args.note}
    write_json(args.out, result)
    print_arms(rows, width=18)
    return result


if __name__ == "__main__":
    main()
