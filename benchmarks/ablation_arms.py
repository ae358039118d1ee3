"""The one-change-at-a-time arms against `h200` (issue 22), one table for the runner and the collector.

Each arm is the `pgolf run --set` overrides on top of `h200`; `ref` is `h200` itself, run in the same
campaign at the same budget (a screening budget below 300 s needs its own reference).

    python3 benchmarks/ablation_arms.py ARM      # prints the arm's `--set k=v` arguments (for the shell)
"""
from __future__ import annotations

import sys

ARMS: dict[str, list[str]] = {
    "ref": [],
    "leaky_relu2": ["activation=leaky_relu2"],
    "xsa_all": ["xsa_layers=all"],  # as both record stacks (every block)
    "partial_rope": ["rope_dims=16"],  # as both record stacks (16 of 64 dims)
    "smear_gate": ["smear_gate=true"],
    "bigram": ["bigram_buckets=4096", "bigram_dim=128"],
    "attn_out_gate": ["attn_out_gate=true"],
    "ln_scale": ["ln_scale=true"],
    "skip_gate": ["skip_gate=true"],
    "polar_express": ["muon_ns_coeffs=polar_express"],
    "muon_wd": ["muon_weight_decay=0.04", "muon_wd_schedule=lr"],
    "doc_attention": ["doc_attention=true"],
    "parallel_residual": ["parallel_residual=true"],
}


def set_args(arm: str) -> list[str]:
    """``["--set", "k=v", ...]`` of ``arm``; a KeyError names the known arms."""
    if arm not in ARMS:
        raise KeyError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    return [a for kv in ARMS[arm] for a in ("--set", kv)]


if __name__ == "__main__":
    try:
        print(" ".join(set_args(sys.argv[1])))
    except (KeyError, IndexError) as e:
        print(f"ablation_arms.py ARM: {e}", file=sys.stderr)
        sys.exit(2)
