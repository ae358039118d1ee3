"""BigramHash on the CPU: a small `h200` model trained a fixed number of steps through `pgolf run`,
without the bigram table, with it as it was designed before (its term added at gain 1), and as it is
now (the term × a learned gain from 0.05), to tell a flaw in the design from a budget effect.

    python3 benchmarks/bigram_cpu.py [--data DIR] [--arms ref,bigram_gain1,bigram] [--iterations N] [--out FILE]

Every arm is ``pgolf run --config h200`` with the CPU-sized overrides below plus its own. ``bigram_gain1``
rebuilds the old design exactly: the learned gain is pinned at 1.0 and frozen (no gradient, so Adam
leaves it), and every other parameter draws as before (the gain takes no random draw). Per arm: the
pre-quantization val bpb, steps, seconds, and from the final weights the RMS of the bigram term
(gain included) against that of tok_emb over the validation tokens, the two summed before the
embedding norm. A screen: a tiny model, a fixed step count, one seed, a few thousand steps' worth
of nothing; it says which way a design leans, not what it gains on an H200.
Writes ``benchmarks/results/bigram_cpu.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402
from ablation_arms import INT7 as H200_INT7  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the H200 arm's bigram_buckets=4096, bigram_dim=128 at model_dim 512: here the same buckets, dim 1/4 of 128
BIGRAM = ["bigram_buckets=4096", "bigram_dim=32"]
ARMS: dict[str, list[str]] = {"ref": [], "bigram_gain1": BIGRAM, "bigram": BIGRAM,
                              "bigram_noproj": ["bigram_buckets=4096", "bigram_dim=0"]}


def cpu_run(iterations: int) -> list[str]:
    # relu2, no XSA, int7 after training: h200 of the H200 screen's campaign (1ba9fd6); XSA also runs ~5x
    # slower on the CPU
    return [*H200_INT7, "model_dim=128", "num_layers=4", "num_heads=4", "num_kv_heads=2", "train_seq_len=256",
            "train_batch_tokens=4096", f"iterations={iterations}", "max_wallclock_seconds=0", "compile=false",
            "compile_warmup_steps=0", "device=cpu", "bf16=false", "fused=", "xsa_layers=", "activation=relu2",
            "val_max_tokens=65536", "val_batch_tokens=16384", "eval_ttt=", "eval_stride=0",
            f"train_log_every={max(iterations // 10, 1)}"]


@contextlib.contextmanager
def gain_pinned_at_one():
    """GPT's bigram gain at 1.0 and frozen while the block runs: the pre-fix design."""
    import torch

    from pgolf_train.model import GPT

    init = GPT.__init__

    def patched(self, cfg):
        init(self, cfg)
        if getattr(self, "bigram_scale", None) is not None:
            with torch.no_grad():
                self.bigram_scale.fill_(1.0)
            self.bigram_scale.requires_grad_(False)

    GPT.__init__ = patched
    try:
        yield
    finally:
        GPT.__init__ = init


def term_rms(train: Path, data: Path) -> dict | None:
    """RMS over validation tokens of tok_emb's rows and of the bigram term, from the final weights."""
    import numpy as np
    import torch

    from pgolf_codec.safetensors_io import read_safetensors
    from pgolf_train.model import GPT, GPTConfig

    sd, meta = read_safetensors(train / "final_model.safetensors")
    if "bigram.weight" not in sd:
        return None
    m = GPT(GPTConfig.from_dict(json.loads(meta["model_config"])))
    m.load_state_dict({**m.state_dict(), **sd})  # a gain-1 checkpoint of the old code has no bigram_scale
    val = sorted(data.glob("fineweb_val_*.bin"))[0]
    tok = np.fromfile(val, dtype="<u2", offset=256 * 4)[: 16 * 256].astype(np.int64)
    idx = torch.from_numpy(tok).view(16, 256)
    with torch.no_grad():
        e = m.tok_emb(idx)
        h = m.bigram(m.bigram_hash(idx))
        h = h if m.bigram_proj is None else m.bigram_proj(h)
        gain = float(sd["bigram_scale"]) if "bigram_scale" in sd else 1.0
        h = gain * h
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    return {"tok_emb_rms": rms(e), "bigram_term_rms": rms(h), "ratio": rms(h) / rms(e), "gain": gain}


def run_arm(arm: str, data: Path, out: Path, iterations: int) -> dict:
    from pgolf.cli import main as pgolf

    argv = ["run", "--config", "h200", "--data", str(data), "--tokenizer", str(data / "tokenizer.model"),
            "--out", str(out), "--force", *[a for kv in cpu_run(iterations) + ARMS[arm] for a in ("--set", kv)]]
    t = time.perf_counter()
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        if arm == "bigram_gain1":
            stack.enter_context(gain_pinned_at_one())
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(contextlib.redirect_stderr(log))
        rc = pgolf(argv)
    if rc != 0 or not (out / "report.json").is_file():
        raise SystemExit(f"{arm}: pgolf run exit {rc}\n{log.getvalue()[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    return {"arm": arm, "overrides": ARMS[arm], "seconds": round(time.perf_counter() - t, 1), "params": rep["params"],
            "steps": rep["steps"], "val_bpb_prequant": rep["val_bpb_prequant"],
            "val_bpb_postquant_plain": rep["val_bpb_postquant_plain"], "embedding_input": term_rms(out / "train", data)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / ".data" / "h200art" / "sp4096",
                    help="sp4096 shards (with tokenizer.model)")
    ap.add_argument("--arms", default="ref,bigram_gain1,bigram")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core host)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bigram_cpu.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    result = {"command": " ".join([sys.executable, *sys.argv]), "code_commit": git("rev-parse", "--short", "HEAD"),
              "code_dirty": bool(git("status", "--porcelain", "--", ":/pgolf_train", ":/pgolf", ":/pgolf_codec")),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": "CPU",
              "torch_threads": args.threads, "cpu_run": cpu_run(args.iterations),
              "note": ("A screen, not a measurement: a 4-layer 128-wide h200 model, a fixed step count, one seed, "
                       "on the CPU; it shows which way a design leans, not its effect at the H200's budget."),
              "rows": rows}
    for arm in args.arms.split(","):
        with tempfile.TemporaryDirectory() as d:
            r = run_arm(arm, args.data, Path(d) / "run", args.iterations)
        rows.append(r)
        emb = r["embedding_input"]
        print(f"{arm:<14} {r['steps']:>4} steps {r['seconds']:6.1f}s  pre-quant bpb {r['val_bpb_prequant']:.4f}"
              + (f"  bigram/tok_emb rms {emb['ratio']:.2f} gain {emb['gain']:.3f}" if emb else ""), flush=True)
        write_json(args.out, result)
    ref = next((r for r in rows if r["arm"] == "ref"), None)
    if ref:
        for r in rows:
            r["delta_vs_ref"] = r["val_bpb_prequant"] - ref["val_bpb_prequant"]
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
