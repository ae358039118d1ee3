"""Equal loss curves with and without the trainer's fused kernels: same seed, same data, N steps.

    python benchmarks/fused_loss_check.py --data DIR [--config h200] [--steps 200] [--fused ce,rope]
        [--sdpa ""] [--out FILE]

Three runs of the trainer's step (``train_step``) from the same initial weights and data stream:
``reference`` (no fusions), ``fused`` (``--fused`` / ``--sdpa``), and ``reference_seed+1`` (no
fusions, the next seed: how far two equally good runs drift apart, the noise the fused run's
difference is judged against). LR multiplier 1 and the trainer's momentum warm-up. Writes every
step's loss and the mean |difference| over all steps and over the last 50.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pgolf_train.config import load_config
from pgolf_train.trainer import muon_momentum, set_schedule, synchronize
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, write_json  # noqa: E402
from _step import setup_step  # noqa: E402


def run(config: str, overrides: list[str], data: str, steps: int, device: torch.device | None = None) -> dict:
    st = setup_step(config, overrides, data, device)
    losses = []
    with st.attention():
        t = None
        for step in range(steps):
            if step == 5:  # the compile is behind us: time the rest
                synchronize(st.device)
                t = time.perf_counter()
            set_schedule(st.optimizers, st.muon, 1.0, muon_momentum(st.cfg, step))
            losses.append(float(st.run()))
        synchronize(st.device)
    return {"overrides": overrides, "losses": losses,
            "ms_per_step": 1000 * (time.perf_counter() - t) / (steps - 5) if t is not None else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="h200")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fused", default="ce,rope")
    ap.add_argument("--sdpa", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fused_loss_check.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fused_loss_check needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    seed = load_config(args.config, []).seed
    arms = {"reference": [], "fused": [f"fused={args.fused}", f"sdpa_backend={args.sdpa}"],
            "reference_seed+1": [f"seed={seed + 1}"]}
    out = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.datetime.now().isoformat(),
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "git_head": git("rev-parse", "HEAD"),
           "config": args.config, "steps": args.steps, "runs": {}}
    for name, overrides in arms.items():
        torch._dynamo.reset()
        out["runs"][name] = run(args.config, overrides, args.data, args.steps)
        print(f"{name:18s} {out['runs'][name]['ms_per_step']:.1f} ms/step  loss at 1/50/100/last: "
              + " ".join(f"{out['runs'][name]['losses'][i]:.4f}" for i in (0, 49, 99, -1)), flush=True)
        write_json(args.out, out)
    ref = np.array(out["runs"]["reference"]["losses"])
    for name in ("fused", "reference_seed+1"):
        d = np.array(out["runs"][name]["losses"]) - ref
        out[f"{name}_vs_reference"] = {"mean_abs_diff": float(np.abs(d).mean()),
                                       "mean_abs_diff_last50": float(np.abs(d[-50:]).mean()),
                                       "mean_diff_last50": float(d[-50:].mean()), "max_abs_diff": float(np.abs(d).max())}
        print(f"{name} - reference: " + "  ".join(f"{k} {v:+.4f}" for k, v in out[f'{name}_vs_reference'].items()))
    f, n = out["fused_vs_reference"], out["reference_seed+1_vs_reference"]
    out["within_noise"] = bool(f["mean_abs_diff_last50"] <= n["mean_abs_diff_last50"])
    out["fused_speedup"] = out["runs"]["reference"]["ms_per_step"] / out["runs"]["fused"]["ms_per_step"]
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
