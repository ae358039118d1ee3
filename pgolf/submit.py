"""`pgolf submit RUNDIR`: a `pgolf run` directory becomes a challenge records folder.

    OUT/  (default records/track_10min_16mb/<date>_<name>/)
      train_gpt.py      the generated, self-contained script (pgolf/bundle.py); bytes_code = its length
      submission.json   name, author, github_id, val_bpb, val_loss, bytes_total/code/model, date, ...
      README.md         what the run is, its numbers, how to reproduce them
      requirements.txt  the packages the script needs beyond the challenge's own
      logs/             the run's report, training log and evaluation results

The scores are the run's (`pgolf run` on its device); the script re-runs the same config (its
resolved values baked in) under the challenge's `torchrun` command. The folder is built beside OUT
and renamed into place, so a failed submit leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path

LOG_FILES = ("report.md", "report.json", "train/train.log", "train/train.jsonl", "train/train_summary.json",
             "eval_sliding.json", "eval_ttt.json")


def register(sub) -> None:
    p = sub.add_parser("submit", help="a run directory -> the challenge's records folder (train_gpt.py, "
                       "submission.json, README, logs)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rundir", type=Path, help="a `pgolf run` directory (with report.json)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="the records folder to write (default records/track_10min_16mb/<date>_<name>)")
    p.add_argument("--name", default=None, help="the submission's name (default: pgolf-<config>)")
    p.add_argument("--author", default="", help="author name for submission.json")
    p.add_argument("--github", default="", help="GitHub id for submission.json")
    p.add_argument("--blurb", default=None, help="one line on what the submission is")
    p.add_argument("--hardware", default=None, help="where the run's numbers come from (default: its device)")
    p.add_argument("--encoding", choices=("base85", "latin1"), default="base85",
                   help="train_gpt.py's payload: base85 (ASCII) or latin1 (~20%% smaller)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=main)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "pgolf"


def _load_report(rundir: Path) -> dict:
    path = rundir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: submit a `pgolf run` directory (it writes report.json)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    for key in ("config", "val_bpb", "artifact_bytes"):
        if key not in report:
            raise ValueError(f"{path}: has no {key!r}; is it a `pgolf run` report?")
    return report


def _val_loss(report: dict, rundir: Path) -> float | None:
    """The headline mode's val_loss (nats/token); the plain score's is in the trainer's summary."""
    mode = report.get("val_bpb_mode") or "plain"
    loss = ((report.get("evals") or {}).get(mode) or {}).get("val_loss")
    summary = rundir / "train" / "train_summary.json"
    if loss is None and mode == "plain" and summary.is_file():
        loss = json.loads(summary.read_text(encoding="utf-8")).get("val_loss")
    return loss


def _device(rundir: Path) -> str | None:
    """The device line of the run's training log (``device: NVIDIA H200  world_size: 1 ...``)."""
    log = rundir / "train" / "train.log"
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines()[:20]:
            if line.startswith("device: "):
                return line.removeprefix("device: ").split("  world_size:")[0].strip()
    return None


def build_folder(rundir: Path, report: dict, bundle, *, name: str, author: str, github: str, blurb: str,
                 hardware: str, date: str) -> dict[str, bytes]:
    """The records folder's files: relative path -> bytes."""
    code, model = bundle.bytes, int(report["artifact_bytes"])
    submission = {
        "name": name, "author": author, "github_id": github, "blurb": blurb, "date": date,
        "val_bpb": report["val_bpb"], "val_loss": _val_loss(report, rundir), "val_bpb_mode": report.get("val_bpb_mode"),
        "bytes_total": code + model, "bytes_code": code, "bytes_model": model, "hardware": hardware,
        "pgolf": {"version": bundle_version(), "bundle_coder": bundle.coder, "bundle_encoding": bundle.encoding,
                  "modules": len(bundle.modules), "run_git_commit": report.get("git_commit")},
    }
    from pgolf.submission import EXTRA_PACKAGES  # what the script checks for at start: one list

    extra = sorted(set(EXTRA_PACKAGES) | ({"brotli"} if bundle.coder == "brotli" else set()))
    files = {
        "train_gpt.py": bundle.data,
        "submission.json": (json.dumps(submission, indent=2) + "\n").encode(),
        "requirements.txt": ("".join(f"{p}\n" for p in extra)).encode(),
        "README.md": _readme(report, submission, extra).encode(),
    }
    for rel in LOG_FILES:
        src = rundir / rel
        if src.is_file():
            files[f"logs/{Path(rel).name}"] = src.read_bytes()
    return files


def bundle_version() -> str:
    from pgolf import __version__

    return __version__


def _readme(report: dict, sub: dict, extra: list[str]) -> str:
    cfg = report["config"]
    evals = report.get("evals") or {}
    rows = "\n".join(f"| {mode} | {ev.get('val_bpb'):.4f} |" for mode, ev in evals.items()
                     if isinstance(ev, dict) and ev.get("val_bpb") is not None)
    ttt = report.get("ttt") or {}
    ttt_line = (f"\nTest-time training adapted {ttt['adapted_fraction']:.0%} of the validation stream "
                f"(score-first: every token is scored before any step trains on it).\n"
                if ttt.get("adapted_fraction") is not None else "")
    return f"""# {sub['name']}

{sub['blurb']}

**val_bpb {sub['val_bpb']:.4f}** ({sub['val_bpb_mode']}) in **{sub['bytes_total']:,} bytes**: train_gpt.py
{sub['bytes_code']:,} + model {sub['bytes_model']:,} (cap 16,000,000).

| evaluation of the artifact | val_bpb |
|---|---|
{rows}
{ttt_line}
These numbers come from `pgolf run` on {sub['hardware']} ({report.get('steps')} steps in
{report.get('train_seconds', 0):.0f} s of training; logs in `logs/`). The model: {cfg.get('num_layers')} layers,
width {cfg.get('model_dim')}, vocabulary {cfg.get('vocab_size')}, {report.get('params', 0):,} parameters;
weights stored by the recipe `{cfg.get('recipe')}` (coder `{cfg.get('coder')}`).

## Reproduce

```bash
pip install -r requirements.txt   # {', '.join(extra)}, beyond the challenge's own requirements
torchrun --standalone --nproc_per_node=8 train_gpt.py
```

`train_gpt.py` is generated by `pgolf submit` (pgolf {sub['pgolf']['version']}): the pgolf modules
this config runs ({sub['pgolf']['modules']}), minified and compressed ({sub['pgolf']['bundle_coder']} +
{sub['pgolf']['bundle_encoding']}), with the run's resolved config baked in. `DATA_PATH`,
`TOKENIZER_PATH`, `RUN_ID`, `SEED`, `ITERATIONS`, `MAX_WALLCLOCK_SECONDS`, `TRAIN_BATCH_TOKENS`,
`TRAIN_SEQ_LEN` and `VAL_LOSS_EVERY` override it. It writes `model.pgolf` in the working directory,
prints `final_pgolf_roundtrip_exact val_loss:... val_bpb:...` and the byte totals, then the
configured sliding-window and test-time-training scores.
"""


def main(args) -> int:
    from pgolf.bundle import build
    from pgolf_codec.atomic import current_umask
    from pgolf_train.config import make_config

    report = _load_report(args.rundir)
    cfg = make_config(report["config"], source=str(args.rundir / "report.json"))
    if cfg.quantize_budget:  # the script trains, exports by the recipe and scores; it has no allocator
        raise ValueError(f"{args.rundir}: its artifact came from the bit allocator (quantize_budget="
                         f"{cfg.quantize_budget}), which train_gpt.py does not run; submit a run without it")
    date = datetime.date.today().isoformat()
    name = args.name or f"pgolf-{_slug(args.rundir.resolve().name)}"
    out = args.out or Path("records") / "track_10min_16mb" / f"{date}_{_slug(name)}"
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    bundle = build(cfg, encoding=args.encoding, measure=True)
    hardware = args.hardware or _device(args.rundir) or "its device (not recorded)"
    blurb = args.blurb or (f"pgolf run {args.rundir.name}: a {cfg.num_layers}-layer, {cfg.model_dim}-wide GPT, "
                           f"scored {report.get('val_bpb_mode') or 'plain'}.")
    files = build_folder(args.rundir, report, bundle, name=name, author=args.author, github=args.github,
                         blurb=blurb, hardware=hardware, date=date)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = out.with_name(f".{out.name}.old") if out.exists() else None
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0o700; the folder follows the umask
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        if old is not None:  # the previous folder stays until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}: train_gpt.py {bundle.bytes:,} bytes + model {int(report['artifact_bytes']):,} = "
          f"{bundle.bytes + int(report['artifact_bytes']):,} bytes (cap 16,000,000)")
    print(f"{'module':<28} {'source':>8} {'minified':>9} {'lzma alone':>10}")
    for m in bundle.modules:
        print(f"{m.name:<28} {m.source_bytes:>8,} {m.minified_bytes:>9,} {m.compressed_bytes:>10,}")
    print(f"{'all, ' + bundle.coder + ' + ' + bundle.encoding:<28} {sum(m.source_bytes for m in bundle.modules):>8,} "
          f"{sum(m.minified_bytes for m in bundle.modules):>9,} {bundle.bytes:>10,}")
    return 0
