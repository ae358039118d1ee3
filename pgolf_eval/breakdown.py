"""Per-document statistics of an evaluation: length buckets, a bootstrap interval, paired comparisons.

The validation set is a few hundred documents of very different lengths (on FineWeb-200 the 10
longest hold 43% of the tokens), so one overall bpb hides where a method gains, and two overall
numbers differ by chance more than their digits suggest. Every evaluation therefore keeps the loss
(nats), scored targets and UTF-8 bytes of each document: the overall bpb gets a 95% bootstrap
interval over documents, each length bucket its own bpb, and two evaluations of the same stream a
paired interval for their difference (a difference whose interval holds 0 is a tie, not a gain).

A document is a :func:`~pgolf_eval.sliding.document_segments` segment: the targets predicted from
inputs ``begin..end-1``, so its length is ``end - begin`` tokens.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# (name, lower bound in tokens, upper bound or None): the buckets every result reports.
BUCKETS = (("<512", 0, 512), ("512-2K", 512, 2048), ("2K-8K", 2048, 8192), (">=8K", 8192, None))
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


class TargetLosses:
    """Each target's loss (nats, float32 on ``device``) as a pass scores it, and which were scored.

    ``add`` takes a batch's ``losses`` (B, T), its ``mask`` of scored positions and the windows'
    ``starts`` (B,): position ``t`` of row ``b`` is target ``starts[b] + t``.
    """

    def __init__(self, n_targets: int, device: torch.device) -> None:
        self.values = torch.zeros(n_targets, dtype=torch.float32, device=device)
        self.scored = torch.zeros(n_targets, dtype=torch.bool, device=device)

    def add(self, losses: torch.Tensor, mask: torch.Tensor, starts: np.ndarray) -> None:
        width = losses.shape[1]
        idx = torch.as_tensor(starts, device=losses.device)[:, None] + torch.arange(width, device=losses.device)
        idx = idx[mask]
        self.values[idx] = losses[mask].float()
        self.scored[idx] = True

    def per_doc(self, segments: np.ndarray, target_bytes: np.ndarray) -> np.ndarray:
        """float64 ``(3, k)``: loss (nats), scored targets and their UTF-8 bytes per segment, for the
        targets this process scored (``target_bytes``: int ``(n_targets,)``)."""
        scored = self.scored.cpu().numpy()
        cols = [self.values.double(), self.scored.double(),
                torch.from_numpy(np.where(scored, target_bytes, 0).astype(np.float64)).to(self.values.device)]
        out = np.zeros((3, len(segments)))
        if len(segments):
            b = torch.as_tensor(segments[:, 0], device=self.values.device)
            e = torch.as_tensor(segments[:, 1], device=self.values.device)
            for i, c in enumerate(cols):
                csum = torch.cat([torch.zeros(1, dtype=torch.float64, device=c.device), torch.cumsum(c, 0)])
                out[i] = (csum[e] - csum[b]).cpu().numpy()
        return out


def _bpb(loss: np.ndarray, nbytes: np.ndarray) -> float:
    b = float(nbytes.sum())
    return float(loss.sum()) / math.log(2) / b if b > 0 else float("nan")


def _resample_bpb(loss: np.ndarray, nbytes: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """bpb of ``samples`` bootstrap resamples of the documents (drawn with replacement)."""
    rng = np.random.default_rng(seed)
    n, out = len(loss), []
    step = max(1, 2_000_000 // max(n, 1))  # resamples per draw: bounded memory for 50,000 documents
    for i in range(0, samples, step):
        idx = rng.integers(0, n, size=(min(step, samples - i), n))
        out.append(loss[idx].sum(1) / math.log(2) / np.maximum(nbytes[idx].sum(1), 1))
    return np.concatenate(out)


def summarize(per_doc: dict[str, np.ndarray], samples: int = BOOTSTRAP_SAMPLES,
              seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Length buckets and the 95% bootstrap interval of one evaluation's per-document arrays
    (``length``, ``tokens`` scored, ``bytes``, ``loss`` in nats)."""
    length, tokens = np.asarray(per_doc["length"]), np.asarray(per_doc["tokens"])
    nbytes, loss = np.asarray(per_doc["bytes"], dtype=np.float64), np.asarray(per_doc["loss"], dtype=np.float64)
    total = max(int(tokens.sum()), 1)
    buckets = []
    for name, lo, hi in BUCKETS:
        sel = (length >= lo) & (length < (hi if hi is not None else np.inf))
        buckets.append({"bucket": name, "documents": int(sel.sum()), "tokens": int(tokens[sel].sum()),
                        "token_share": int(tokens[sel].sum()) / total, "bytes": int(nbytes[sel].sum()),
                        "bpb": _bpb(loss[sel], nbytes[sel]) if sel.any() else None})
    ci = None
    if len(loss) >= 2:
        lo, hi = np.percentile(_resample_bpb(loss, nbytes, samples, seed), [2.5, 97.5])
        ci = [float(lo), float(hi)]
    return {"documents": int(len(loss)), "buckets": buckets, "bpb_ci95": ci,
            "bootstrap": {"samples": samples, "seed": seed, "over": "documents"}}


def compare(new: dict[str, Any], old: dict[str, Any], samples: int = BOOTSTRAP_SAMPLES,
            seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """``new`` minus ``old`` in bpb, overall and per bucket, with a paired 95% bootstrap interval
    over documents; both are evaluations of the same documents (their ``per_doc`` arrays).

    The documents are matched by their bytes, not their tokens, so two tokenizers compare (bpb is
    tokenizer-agnostic); the buckets are those of ``old``'s token lengths, the same documents in
    both. ``verdict`` is "better"/"worse" only when the interval excludes 0, else "tie".
    """
    a, b = new["per_doc"], old["per_doc"]
    length = np.asarray(b["length"])
    if len(a["bytes"]) != len(b["bytes"]) or not np.array_equal(a["bytes"], b["bytes"]):
        raise ValueError("paired comparison needs two evaluations of the same documents "
                         "(their per-document byte counts differ)")
    nbytes = np.asarray(a["bytes"], dtype=np.float64)
    la, lb = np.asarray(a["loss"], dtype=np.float64), np.asarray(b["loss"], dtype=np.float64)

    def paired(sel: np.ndarray) -> dict[str, Any]:
        d = {"delta": _bpb(la[sel], nbytes[sel]) - _bpb(lb[sel], nbytes[sel]), "ci95": None, "verdict": "tie"}
        if sel.sum() >= 2:
            diff = _resample_bpb(la[sel] - lb[sel], nbytes[sel], samples, seed)
            lo, hi = np.percentile(diff, [2.5, 97.5])
            d["ci95"] = [float(lo), float(hi)]
            d["verdict"] = "better" if hi < 0 else "worse" if lo > 0 else "tie"
        return d

    out = {"overall": paired(np.ones(len(length), bool)), "buckets": []}
    for name, lo, hi in BUCKETS:
        sel = (length >= lo) & (length < (hi if hi is not None else np.inf))
        if sel.any():
            out["buckets"].append({"bucket": name, **paired(sel)})
    short = length < 2048
    if short.any():
        out["under_2k"] = paired(short)
    return out


def format_buckets(result: dict[str, Any]) -> list[str]:
    """Lines of a markdown-free table: one row per bucket, then the interval."""
    lines = [f"{'bucket':<8} {'docs':>5} {'tokens':>10} {'share':>6} {'bytes':>11} {'bpb':>8}"]
    for b in result.get("buckets") or []:
        bpb = f"{b['bpb']:.4f}" if b["bpb"] is not None else "-"
        lines.append(f"{b['bucket']:<8} {b['documents']:>5} {b['tokens']:>10,} {b['token_share']:>6.1%} "
                     f"{b['bytes']:>11,} {bpb:>8}")
    ci = result.get("bpb_ci95")
    if ci:
        lines.append(f"95% bootstrap interval over {result.get('documents', '?')} documents: "
                     f"{ci[0]:.4f} .. {ci[1]:.4f}")
    return lines
