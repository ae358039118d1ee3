"""Collect the architecture arms of ``benchmarks/h200_archs.sh`` into one results JSON.

Each arm's run directory (the device's ``reports.tar`` unpacked) gives steps, ms/step, pre-quant,
plain and sliding bpb, bytes; each evaluation is compared with the `h200` reference (plain and
sliding rows of a sweep JSON holding per-document losses of the same documents) by length bucket,
with a paired bootstrap interval over documents. The early-exit arm adds its threshold sweep.

    python3 benchmarks/archs_collect.py --arm ssm=DIR --arm moe=DIR --arm early_exit=DIR \\
        --exit-sweep DIR_WITH_exit_TAU_sSTRIDE.json --reference benchmarks/results/ttt_sweep_h200_stream.json \\
        --code-commit C --out benchmarks/results/archs_h200.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402

from pgolf_eval.breakdown import compare, summarize  # noqa: E402

OVERRIDES = {  # what each arm sets on top of `h200` (benchmarks/h200_archs.sh)
    "ssm": ["ssm_layers=1,3,5,7"],
    "moe": ["moe_experts=4", "moe_top_k=2", "mlp_mult=0.5"],
    "early_exit": ["exit_layers=3,5"],
    "fused": ["fused=ce,rope"],  # the trainer's fused kernels (same model): what the extra steps buy
}


def arm_row(name: str, run: Path, ref: dict[str, dict], overrides: list[str] | None = None) -> dict:
    """One run directory (``report.json``, ``train_summary.json``) as a row, compared with ``ref``
    (``{"plain": eval, "sliding": eval}``, each with its ``per_doc``) by bucket, paired."""
    rep = json.loads((run / "report.json").read_text())
    summ = json.loads((run / "train_summary.json").read_text())
    steps, secs = rep["steps"], rep["train_seconds"]
    row = {"arm": name, "overrides": OVERRIDES.get(name, []) if overrides is None else overrides, "argv": rep["argv"][1:], "params": rep["params"],
           "steps": steps, "train_seconds": secs, "ms_per_step": 1000 * secs / steps,
           "tokens_seen": rep["tokens_seen"], "val_bpb_prequant": rep["val_bpb_prequant"],
           "val_bpb_qat": rep.get("val_bpb_qat"),  # a model trained under QAT, scored with it on
           "val_bpb_plain": rep["evals"]["plain"]["val_bpb"], "val_bpb_sliding": rep["evals"]["sliding"]["val_bpb"],
           "artifact_bytes": rep["artifact_bytes"], "code_bytes": rep["code_bytes"],
           "challenge_bytes": rep["challenge"]["total_bytes"] if rep.get("challenge") else None,
           "device_commit": rep["git_commit"], "final_train_loss": summ.get("final_train_loss")}
    for mode in ("plain", "sliding"):
        ev = rep["evals"][mode]
        row[f"{mode}_breakdown"] = summarize(ev["per_doc"])
        row[f"{mode}_vs_h200"] = compare(ev, ref[mode])
    return row


def _exit_sweep(folder: Path, ref: dict[str, dict]) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("exit_*_s*.json")):
        m = re.fullmatch(r"exit_([0-9.]+)_s(\d+)\.json", f.name)
        if not m:
            continue
        d = json.loads(f.read_text())
        mode = "plain" if d["stride"] in (None, d["seq_len"]) else "sliding"
        e = d["early_exit"]
        rows.append({"threshold": float(m.group(1)), "mode": mode, "stride": d["stride"], "val_bpb": d["val_bpb"],
                     "exit_shares": {str(x["layer"]): x["share"] for x in e["exits"]}, "final_share": e["final"]["share"],
                     "layers_skipped_frac": e["layers_skipped_frac"], "vs_h200": compare(d, ref[mode])})
    return sorted(rows, key=lambda r: (r["mode"], -r["threshold"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", required=True, help="NAME=RUNDIR")
    ap.add_argument("--exit-sweep", type=Path, help="folder of the early-exit arm's exit_TAU_sSTRIDE.json")
    ap.add_argument("--reference", type=Path, required=True, help="sweep JSON with the h200 plain and sliding rows")
    ap.add_argument("--code-commit", required=True)
    ap.add_argument("--device", default="NVIDIA H200")
    ap.add_argument("--note", default="")
    ap.add_argument("--command", default="ARM=<arm> bash benchmarks/h200_archs.sh (carrying .data/{wikipedia,fineweb,tok,tokenizers}, .whl)",
                    help="how the runs were made (recorded)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    sweep = json.loads(args.reference.read_text())
    rows = {r["variant"]: r for r in sweep["rows"]}  # the sweep's references: "plain" and "sliding s=64"
    ref = {"plain": rows["plain"], "sliding": rows["sliding s=64"]}
    arms = [arm_row(name, Path(d), ref) for name, d in (a.split("=", 1) for a in args.arm)]
    result = {
        "command": args.command + "; then python3 benchmarks/archs_collect.py " + " ".join(sys.argv[1:]),
        "code_commit": args.code_commit, "date": date.today().isoformat(), "device": args.device,
        "protocol": "H200-300: one H200, 300 s of training on the 62 Wikipedia shards (sp4096 tokenizer of "
                    ".data/tok/sp4096.model), the 200 FineWeb documents for validation; TTT off",
        "reference": {"what": "h200 (no architecture switch): plain and sliding of " + sweep["artifact"]
                              + f" (trained at 8c84de3; evaluated at {sweep['code_commit'][:7]}, {sweep['device']})",
                      "val_bpb_plain": ref["plain"]["val_bpb"], "val_bpb_sliding": ref["sliding"]["val_bpb"],
                      "steps": 4452, "ms_per_step": 1000 * 300.128 / 4452, "val_bpb_prequant": 1.5890,
                      "source": "e2e_h200.json history.h200_8c84de3_doc_ttt",
                      "other_runs": "e2e_h200.json runs.h200 (c2bd6e6): 4,403 steps, plain 1.5947, sliding 1.5539"},
        "arms": arms, "note": args.note,
    }
    if args.exit_sweep:
        result["early_exit_sweep"] = _exit_sweep(args.exit_sweep, ref)
    write_json(args.out, result)
    print_arms(arms)


def print_arms(rows: list[dict], width: int = 11) -> None:
    """The arms' table: steps, ms/step, pre/plain/sliding bpb, Δ sliding against h200, bytes, buckets.
    ``pre`` is the model as trained: with its fake-quant on when it ended training under QAT (its float
    weights alone are not the function it learned), marked ``q``."""
    print(f"{'arm':<{width}} {'steps':>5} {'ms/step':>7} {'pre':>7} {'plain':>7} {'sliding':>7} "
          f"{'Δ sliding [95%]':>26} {'bytes':>11}")
    for r in rows:
        c = r["sliding_vs_h200"]["overall"]
        pre, mark = ((r["val_bpb_qat"], "q") if r.get("val_bpb_qat") is not None else (r["val_bpb_prequant"], " "))
        print(f"{r['arm']:<{width}} {r['steps']:>5} {r['ms_per_step']:>7.1f} {pre:>6.4f}{mark}"
              f"{r['val_bpb_plain']:>7.4f} {r['val_bpb_sliding']:>7.4f} "
              f"{c['delta']:>+8.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] {r['artifact_bytes']:>11,}")
        print(" " * (width + 1) + "by bucket: " + ", ".join(f"{b['bucket']} {b['delta']:+.4f} ({b['verdict']})"
                                                       for b in r["sliding_vs_h200"]["buckets"]))


if __name__ == "__main__":
    main()
