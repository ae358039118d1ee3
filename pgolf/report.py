"""The run report: `report.json`, `report.md` and PNG plots, from what the stages wrote."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from pgolf.challenge import CAP_BYTES, challenge_count


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("pgolf", "torch", "numpy", "numba", "triton", "sentencepiece", "zstandard", "msgpack"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (with `-dirty` when it has local changes), or None outside git."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: the rest of the log is still good
    return rows


def _tensor_table(artifact: Path) -> tuple[list[dict], dict]:
    from pgolf_codec import read_artifact

    d = read_artifact(artifact).info.to_dict()
    return list(d["tensors"]), d


def ema(values: list[float], span: float) -> list[float]:
    """Exponential moving average of ``values`` over about ``span`` points, bias-corrected so the
    first points are not pulled toward 0 (span <= 1: the values themselves)."""
    beta = max(0.0, 1.0 - 2.0 / (span + 1.0))
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = beta * acc + (1.0 - beta) * v
        weight = beta * weight + (1.0 - beta)
        out.append(acc / weight)
    return out


def curve_series(log: list[dict], tokens_per_step: int | None = None) -> dict[str, dict[str, list[float]]]:
    """The plotted series of a run's ``train.jsonl`` records.

    ``{"train": {"elapsed", "tokens", "step", "loss", "loss_ema"}, "val": {"elapsed", "tokens", "step",
    "val_bpb"}}``, each a list in log order. ``tokens`` is the record's tokens seen; a log written
    before the trainer recorded it falls back to ``step * tokens_per_step`` (the config's
    ``train_batch_tokens``). ``loss_ema`` smooths the per-step noise over ~1/10 of the points.
    """
    def tokens(r: dict) -> float:
        if r.get("tokens") is not None:
            return r["tokens"]
        return r.get("step", 0) * tokens_per_step if tokens_per_step else float("nan")

    train = [r for r in log if r.get("loss") is not None and "elapsed" in r]
    val = [r for r in log if r.get("val_bpb") is not None and "elapsed" in r]
    losses = [r["loss"] for r in train]
    return {
        "train": {"elapsed": [r["elapsed"] for r in train], "tokens": [tokens(r) for r in train],
                  "step": [r.get("step", 0) for r in train], "loss": losses,
                  "loss_ema": ema(losses, span=min(max(len(losses) / 10, 1.0), 50.0))},
        "val": {"elapsed": [r["elapsed"] for r in val], "tokens": [tokens(r) for r in val],
                "step": [r.get("step", 0) for r in val], "val_bpb": [r["val_bpb"] for r in val]},
    }


def plot_curves(log: list[dict], out: Path, tokens_per_step: int | None = None) -> list[str]:
    """loss (raw points and their EMA) and val bpb against wall time and tokens; the PNG names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curve_series(log, tokens_per_step)
    train, val = series["train"], series["val"]
    if not train["loss"]:
        return []
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, key, label in ((0, "elapsed", "training time (s)"), (1, "tokens", "tokens seen")):
        ax = axes[0][col]
        ax.plot(train[key], train["loss"], ".", ms=2, alpha=0.35, color="C0", label="logged steps")
        ax.plot(train[key], train["loss_ema"], lw=1.5, color="C0", label="EMA")
        ax.set_ylabel("train loss (nats/token)")
        ax.set_xlabel(label)
        ax.legend(loc="upper right", fontsize=8)
        if val["val_bpb"]:
            axes[1][col].plot(val[key], val["val_bpb"], "o-", ms=3)
        axes[1][col].set_ylabel("val bpb")
        axes[1][col].set_xlabel(label)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return ["curves.png"]


def plot_bytes(tensors: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tensors:
        return []
    rows = sorted(tensors, key=lambda t: -t["bytes"])
    fig, ax = plt.subplots(figsize=(11, max(3, 0.18 * len(rows))))
    ax.barh([t["name"] for t in rows][::-1], [t["bytes"] for t in rows][::-1])
    ax.set_xlabel("bytes in the artifact")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(out / "bytes_per_tensor.png", dpi=110)
    plt.close(fig)
    return ["bytes_per_tensor.png"]


def write_report(out: Path, *, cfg, summary: dict, evals: dict, stages: dict, manifest: dict,
                 data_dir: Path, tokenizer: Path) -> dict:
    """Write report.json, report.md and the plots into `out`; return the report dict."""
    artifact = Path(summary["artifact"])
    tensors, info = _tensor_table(artifact)
    log = read_jsonl(out / "train" / "train.jsonl")
    final_mode = "plain"
    for mode in ("ttt", "sliding"):
        if mode in evals:
            final_mode = mode
            break
    report = {
        "val_bpb": evals[final_mode]["val_bpb"],
        "val_bpb_mode": final_mode,
        "val_bpb_ci95": (evals[final_mode].get("docs") or {}).get("bpb_ci95"),
        "ttt": ttt_summary(evals.get("ttt")),
        "comparisons": comparisons(evals),
        "val_bpb_prequant": summary.get("val_bpb_prequant"),
        "val_bpb_qat": summary.get("val_bpb_qat"),
        "val_bpb_postquant_plain": evals["plain"]["val_bpb"],
        "recipe_artifact": summary.get("recipe_artifact"),
        "quantize": summary.get("quantize"),
        "evals": evals,
        "artifact": str(artifact),
        "artifact_bytes": int(info.get("total_bytes", artifact.stat().st_size)),
        "model_bytes": int(info.get("model_bytes", summary.get("model_bytes", 0))),
        "code_bytes": int(info.get("code_bytes", summary.get("code_bytes", 0))),
        "headroom_bytes": CAP_BYTES - int(info.get("total_bytes", artifact.stat().st_size)),
        "challenge": (challenge_count(cfg, int(info.get("total_bytes", artifact.stat().st_size)))
                      if hasattr(cfg, "__dataclass_fields__") else None),  # a TrainConfig: the bundle's input
        "params": summary.get("params"),
        "train_seconds": summary.get("train_seconds"),
        "steps": summary.get("steps"),
        "tokens_seen": summary.get("tokens_seen"),
        "train_tokens": summary.get("train_tokens"),
        "stages": stages,
        "tensors": tensors,
        "seed": getattr(cfg, "seed", None),
        "config": asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg),
        "data": {"dir": str(data_dir), "tokenizer": str(tokenizer), "manifest": manifest},
        "versions": package_versions(),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    plots = []
    try:
        plots = plot_curves(log, out, getattr(cfg, "train_batch_tokens", None)) + plot_bytes(tensors, out)
    except ImportError:
        print("pgolf run: matplotlib is not installed; no plots (pip install 'pgolf[report]')")
    report["plots"] = plots
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(render_markdown(report))
    return report


def ttt_summary(ev: dict | None) -> dict | None:
    """How much of the stream a TTT evaluation adapted, with the note the report and CLI print."""
    if not ev or "ttt" not in (ev.get("extra") or {}):
        return None
    from pgolf_eval.ttt import adaptation_note

    info = ev["extra"]["ttt"]
    note, warn = adaptation_note(info)
    return {"adapted_fraction": info.get("adapted_fraction"), "note": note, "warning": warn,
            "scope": info.get("scope"), "warmup_s": info.get("warmup_s"), "seconds": ev.get("seconds")}


COMPARED = (("sliding", "plain"), ("ttt", "sliding"), ("ttt", "plain"))


def comparisons(evals: dict) -> dict:
    """Paired per-document differences between the evaluation modes that were run (new − old bpb)."""
    from pgolf_eval.breakdown import compare

    out = {}
    for new, old in COMPARED:
        a, b = evals.get(new) or {}, evals.get(old) or {}
        if a.get("per_doc") and b.get("per_doc"):
            try:
                out[f"{new}-{old}"] = compare(a, b)
            except ValueError:  # scored different documents (e.g. a truncated plain pass)
                continue
    return out


def _length_section(r: dict) -> list[str]:
    """Markdown: bpb per document-length bucket and mode, the intervals, and the paired differences."""
    modes = [(m, e) for m, e in r["evals"].items() if (e.get("docs") or {}).get("buckets")]
    if not modes:
        return []
    first = modes[0][1]["docs"]
    lines = ["## By document length", "",
             f"bpb per bucket of documents by length in tokens ({first['documents']} documents); the interval is "
             f"a 95% bootstrap over documents. A difference whose interval holds 0 is a tie, not a gain.", "",
             "| bucket | documents | token share | " + " | ".join(m for m, _ in modes) + " |",
             "|---|---|---|" + "---|" * len(modes)]
    for i, b in enumerate(first["buckets"]):
        cells = [f"{e['docs']['buckets'][i]['bpb']:.4f}" if e["docs"]["buckets"][i]["bpb"] is not None else "—"
                 for _, e in modes]
        lines.append(f"| {b['bucket']} | {b['documents']} | {b['token_share']:.1%} | " + " | ".join(cells) + " |")
    cis = [e["docs"].get("bpb_ci95") for _, e in modes]
    lines.append("| all, 95% interval | | | " + " | ".join(f"{c[0]:.4f}–{c[1]:.4f}" if c else "—" for c in cis) + " |")
    for name, c in (r.get("comparisons") or {}).items():
        lines += ["", f"**{name.replace('-', ' − ')}** (paired, per document): "
                  f"{c['overall']['delta']:+.4f} {_ci(c['overall'])} → {c['overall']['verdict']}", "",
                  "| bucket | Δ bpb | 95% interval | verdict |", "|---|---|---|---|"]
        lines += [f"| {b['bucket']} | {b['delta']:+.4f} | {_ci(b)} | {b['verdict']} |" for b in c["buckets"]]
        if "under_2k" in c:
            u = c["under_2k"]
            lines.append(f"| < 2K (all short) | {u['delta']:+.4f} | {_ci(u)} | {u['verdict']} |")
    return lines + [""]


def _ci(d: dict) -> str:
    return f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d.get("ci95") else "—"


def render_markdown(r: dict) -> str:
    def f(x, spec=".4f"):
        return "—" if x is None else format(x, spec)

    ci = r.get("val_bpb_ci95")
    ttt = r.get("ttt")
    lines = [
        "# pgolf run report", "",
        f"**val bpb {f(r['val_bpb'])}**{f' (95% interval {ci[0]:.4f}–{ci[1]:.4f})' if ci else ''} "
        f"({r['val_bpb_mode']} evaluation of the artifact)"
        f"{' · ' + ttt['note'] if ttt else ''} · "
        f"artifact **{r['artifact_bytes']:,} bytes** (headroom {r['headroom_bytes']:,} under 16,000,000)"
        + (f" · challenge count **{ch['total_bytes']:,} bytes** = train_gpt.py {ch['code_bytes']:,} + artifact "
           f"(headroom {ch['headroom_bytes']:,})" if (ch := r.get("challenge")) else ""), "",
        *([f"> **Warning:** {ttt['note']}: the TTT score is mostly the unadapted model's.", ""]
          if ttt and ttt["warning"] else []),
        "| measure | value |", "|---|---|",
        f"| val bpb before quantization | {f(r['val_bpb_prequant'])} |",
        *([f"| val bpb as trained (QAT fake-quant on; the quantization gap counts from here) | {f(r['val_bpb_qat'])} |"]
          if r.get("val_bpb_qat") is not None else []),
        f"| val bpb after quantization (plain) | {f(r['val_bpb_postquant_plain'])} |",
    ]
    for mode, e in r["evals"].items():
        if mode != "plain":
            lines.append(f"| val bpb after quantization ({mode}) | {f(e['val_bpb'])} |")
    if r.get("recipe_artifact"):  # the allocator's artifact is scored; the recipe's for comparison
        ra = r["recipe_artifact"]
        lines.append(f"| the recipe's artifact instead (plain; {ra['artifact_bytes']:,} bytes) | {f(ra['val_bpb'])} |")
    lines += [
        f"| model bytes | {r['model_bytes']:,} |",
        f"| code bytes | {r['code_bytes']:,} |",
        f"| total artifact bytes | {r['artifact_bytes']:,} |",
        *([f"| challenge count: train_gpt.py + artifact (`pgolf submit`) | {r['challenge']['code_bytes']:,} + "
           f"{r['challenge']['model_bytes']:,} = {r['challenge']['total_bytes']:,} |"] if r.get("challenge") else []),
        f"| parameters | {r['params']:,} |" if r.get("params") else "| parameters | — |",
        f"| steps | {r['steps']} |",
        f"| training time (s) | {f(r['train_seconds'], '.1f')} |",
        f"| tokens seen | {r['tokens_seen']:,} |" if r.get("tokens_seen") else "| tokens seen | — |",
        *([f"| passes over the training set ({r['train_tokens']:,} tokens) | {r['tokens_seen'] / r['train_tokens']:.2f} |"]
          if r.get("train_tokens") and r.get("tokens_seen") else []),
        f"| seed | {r['seed']} |",
        f"| git commit | {r['git_commit']} |", "",
        "## Time per stage", "", "| stage | seconds |", "|---|---|",
    ]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in r["stages"].items()]
    if ttt and ttt.get("warmup_s") is not None:
        lines.append(f"| ttt warm-up (synthetic tokens, outside the TTT timer) | {ttt['warmup_s']:.1f} |")
    lines += [""] + _length_section(r)[:-1]
    lines += ["", "## Bytes by tensor", "", "| tensor | shape | scheme | coder | bytes | bits/param |",
              "|---|---|---|---|---|---|"]
    for t in sorted(r["tensors"], key=lambda t: -t["bytes"]):
        lines.append(f"| {t['name']} | {'×'.join(map(str, t['shape']))} | {t['scheme']} | {t['coder']} | "
                     f"{t['bytes']:,} | {t['bits_per_param']:.3f} |")
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    if r.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    return "\n".join(lines)
