"""Bit allocation under a byte budget: pick one quantization candidate per tensor.

Every tensor offers a few candidates (bit width × clip width × GPTQ on/off, ...), each with its
exact coded size in bytes (scales and coder overhead included) and a distortion (the
Hessian-weighted error, or a measured loss change). We minimise the total distortion subject to
``sum(bytes) <= budget`` — a multiple-choice knapsack.

Two stages:

1. **Lagrangian relaxation.** For a multiplier λ each tensor independently picks the candidate
   minimising ``distortion + λ·bytes``; only vertices of its lower convex hull can ever win.
   Sweeping λ over the hull breakpoints (where some tensor switches vertex) traces the
   convex frontier; the smallest λ whose choice fits is kept. That point is feasible and optimal
   for its own byte total, but can leave slack because hull vertices are far apart.
2. **Exact fix-up.** A dynamic programme over tensors keeps the Pareto front of
   (total bytes, total distortion) over partial assignments, pruned to the budget. While the
   front stays under ``max_front`` points this is exact; beyond that the front is thinned by
   keeping the lowest-distortion point of each byte bucket (real points only, so the result is
   still within budget, merely possibly sub-optimal; ``AllocationResult.exact`` says which).

The answer is the better of the two, so it is never worse than the Lagrangian solution and the
budget is never exceeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["Candidate", "AllocationResult", "allocate", "lower_hull"]


@dataclass(frozen=True)
class Candidate:
    """One way to store one tensor.

    ``nbytes``: exact coded size in bytes (payload + scales + per-tensor header share).
    ``distortion``: non-negative cost in the allocator's common unit (e.g. Hessian-weighted
    squared error, or measured loss change in nats/token); lower is better.
    ``label``: free-form description (e.g. the QuantSpec string); ``payload``: anything the
    caller wants back with the choice (e.g. the Quantized tensor).
    """

    nbytes: int
    distortion: float
    label: str = ""
    payload: Any = field(default=None, compare=False, repr=False)


@dataclass
class AllocationResult:
    """``choice[i]`` is the index into ``candidates[i]`` chosen for tensor ``i``.

    ``total_bytes`` ≤ budget always. ``frontier``: exact (bytes, distortion) Pareto points of the
    whole model for every budget up to ``budget`` (thinned when ``exact`` is False).
    ``hull``: the Lagrangian (convex) frontier over all budgets, as (bytes, distortion, λ).
    ``lagrangian_bytes``/``lagrangian_distortion``: the stage-1 solution, for comparison.
    """

    choice: list[int]
    total_bytes: int
    total_distortion: float
    exact: bool
    frontier: list[tuple[int, float]]
    hull: list[tuple[int, float, float]]
    lagrangian_bytes: int
    lagrangian_distortion: float


def lower_hull(nbytes: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of points (bytes, distortion), sorted by bytes ascending.

    Only points that are the unique argmin of ``d + λ·b`` for some λ ≥ 0 are kept: the hull
    starts at the smallest-bytes point and ends at the lowest-distortion point, with
    distortion strictly decreasing along it.
    """
    order = np.lexsort((dist, nbytes))  # by bytes, ties by distortion
    hull: list[int] = []
    for i in order:
        b, d = float(nbytes[i]), float(dist[i])
        if hull and float(nbytes[hull[-1]]) == b:
            continue  # same bytes, worse (or equal) distortion
        # A point with more bytes must strictly lower the distortion to be useful.
        if hull and d >= float(dist[hull[-1]]):
            continue
        while len(hull) >= 2:
            b1, d1 = float(nbytes[hull[-2]]), float(dist[hull[-2]])
            b2, d2 = float(nbytes[hull[-1]]), float(dist[hull[-1]])
            # Drop hull[-1] if it lies on or above the chord from hull[-2] to the new point.
            if (d2 - d1) * (b - b1) >= (d - d1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.asarray(hull, dtype=np.int64)


def _validate(candidates: Sequence[Sequence[Candidate]], budget: int) -> None:
    if budget < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget}")
    for t, cands in enumerate(candidates):
        if len(cands) == 0:
            raise ValueError(f"tensor {t} has no candidates")
        for c in cands:
            if c.nbytes < 0 or int(c.nbytes) != c.nbytes:
                raise ValueError(f"tensor {t}: candidate {c.label!r} has invalid size {c.nbytes}")
            if not math.isfinite(c.distortion) or c.distortion < 0:
                raise ValueError(f"tensor {t}: candidate {c.label!r} has invalid distortion {c.distortion}")


def _lagrangian(bs: list[np.ndarray], ds: list[np.ndarray], budget: int) -> tuple[list[int], list[tuple[int, float, float]]]:
    """Stage 1: λ sweep over per-tensor hulls. Returns (choice, convex frontier)."""
    hulls = [lower_hull(b, d) for b, d in zip(bs, ds)]

    def pick(lam: float) -> list[int]:
        # Ties broken towards fewer bytes so that λ → +∞ yields the minimum-size choice.
        return [int(h[np.lexsort((b[h], d[h] + lam * b[h]))[0]]) for h, b, d in zip(hulls, bs, ds)]

    def size(choice: list[int]) -> int:
        return int(sum(int(b[c]) for b, c in zip(bs, choice)))

    # The λ at which a tensor moves between adjacent hull vertices: every breakpoint of the
    # global convex frontier is one of these slopes, so sweeping them gives the whole hull.
    slopes = sorted({(float(d[h[k]]) - float(d[h[k + 1]])) / (float(b[h[k + 1]]) - float(b[h[k]]))
                     for h, b, d in zip(hulls, bs, ds) for k in range(len(h) - 1)})
    lams = [0.0] + [s * (1 + 1e-9) + 1e-300 for s in slopes]
    hull_pts: list[tuple[int, float, float]] = []
    best: list[int] | None = None
    # Total bytes are non-increasing in λ, so the first λ (ascending) whose choice fits is the
    # lowest-distortion hull point within the budget.
    for lam in lams:
        ch = pick(lam)
        nbytes = size(ch)
        if best is None and nbytes <= budget:
            best = ch
        if not hull_pts or nbytes != hull_pts[-1][0]:
            hull_pts.append((nbytes, float(sum(float(d[c]) for d, c in zip(ds, ch))), lam))
    hull_pts.sort()
    assert best is not None, "the largest λ picks the minimum-size choice, which fits"
    return best, hull_pts


def _pareto_dp(bs: list[np.ndarray], ds: list[np.ndarray], budget: int, max_front: int
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]], bool]:
    """Stage 2: Pareto-front DP. Returns final (bytes, dist), per-stage back-pointers, exact flag."""
    front_b = np.zeros(1, dtype=np.int64)
    front_d = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    exact = True
    # Bytes the remaining tensors need at least: prunes states that can never complete.
    min_rest = np.concatenate([np.cumsum([int(b.min()) for b in bs][::-1])[::-1], [0]])
    for t, (b, d) in enumerate(zip(bs, ds)):
        nb = (front_b[:, None] + b[None, :]).ravel()
        nd = (front_d[:, None] + d[None, :]).ravel()
        parent = np.repeat(np.arange(len(front_b)), len(b))
        cand = np.tile(np.arange(len(b)), len(front_b))
        ok = nb + min_rest[t + 1] <= budget
        nb, nd, parent, cand = nb[ok], nd[ok], parent[ok], cand[ok]
        order = np.lexsort((nd, nb))
        nb, nd, parent, cand = nb[order], nd[order], parent[order], cand[order]
        # Keep a point only if it strictly beats every cheaper point.
        prev_best = np.concatenate([[np.inf], np.minimum.accumulate(nd)[:-1]])
        keep = nd < prev_best
        nb, nd, parent, cand = nb[keep], nd[keep], parent[keep], cand[keep]
        if len(nb) > max_front:
            exact = False
            # Thin to the last (lowest-distortion) point of each byte bucket; endpoints survive.
            edges = np.linspace(nb[0], nb[-1] + 1, max_front + 1)
            bucket = np.searchsorted(edges, nb, side="right")
            last = np.r_[bucket[1:] != bucket[:-1], True]
            last[0] = True
            nb, nd, parent, cand = nb[last], nd[last], parent[last], cand[last]
        back.append((parent, cand))
        front_b, front_d = nb, nd
    return front_b, front_d, back, exact


def allocate(candidates: Sequence[Sequence[Candidate]], budget: int, *, max_front: int = 50_000
             ) -> AllocationResult:
    """Choose one candidate per tensor minimising total distortion with total bytes ≤ ``budget``.

    ``candidates[i]`` lists tensor ``i``'s options; ``budget`` is in bytes. Raises ``ValueError``
    when even the smallest candidate of every tensor does not fit, naming the shortfall.
    ``max_front`` bounds the DP's Pareto front (memory/time ~ ``max_front × candidates``).
    """
    _validate(candidates, budget)
    bs = [np.array([int(c.nbytes) for c in cands], dtype=np.int64) for cands in candidates]
    ds = [np.array([float(c.distortion) for c in cands], dtype=np.float64) for cands in candidates]
    floor = int(sum(int(b.min()) for b in bs))
    if floor > budget:
        raise ValueError(f"budget {budget} bytes is below the smallest possible model "
                         f"({floor} bytes, {floor - budget} over); add smaller candidates or raise the budget")
    if not candidates:
        return AllocationResult([], 0, 0.0, True, [(0, 0.0)], [(0, 0.0, 0.0)], 0, 0.0)

    lag_choice, hull_pts = _lagrangian(bs, ds, budget)
    lag_b = int(sum(int(b[c]) for b, c in zip(bs, lag_choice)))
    lag_d = float(sum(float(d[c]) for d, c in zip(ds, lag_choice)))

    front_b, front_d, back, exact = _pareto_dp(bs, ds, budget, max_front)
    best = int(np.argmin(front_d))  # front is within budget by construction
    choice = [0] * len(bs)
    k = best
    for t in range(len(bs) - 1, -1, -1):
        parent, cand = back[t]
        choice[t] = int(cand[k])
        k = int(parent[k])
    tot_b = int(sum(int(b[c]) for b, c in zip(bs, choice)))
    tot_d = float(sum(float(d[c]) for d, c in zip(ds, choice)))
    if lag_d < tot_d:  # only possible when the front was thinned
        choice, tot_b, tot_d = list(lag_choice), lag_b, lag_d
    assert tot_b <= budget
    frontier = [(int(b), float(d)) for b, d in zip(front_b, front_d)]
    return AllocationResult(choice, tot_b, tot_d, exact, frontier, hull_pts, lag_b, lag_d)
