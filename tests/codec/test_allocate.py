"""The bit allocator: never over budget, optimal on small cases, sane frontiers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgolf_codec.allocate import Candidate, allocate, lower_hull

candidate = st.builds(Candidate, nbytes=st.integers(0, 2000),
                      distortion=st.floats(0, 1e3, allow_nan=False, allow_infinity=False))


def brute_force(cands: list[list[Candidate]], budget: int) -> float:
    best = np.inf
    for combo in itertools.product(*cands):
        if sum(c.nbytes for c in combo) <= budget:
            best = min(best, sum(c.distortion for c in combo))
    return best


@given(st.lists(st.lists(candidate, min_size=1, max_size=12), min_size=1, max_size=12), st.integers(0, 30_000))
def test_never_exceeds_budget(cands: list[list[Candidate]], budget: int) -> None:
    floor = sum(min(c.nbytes for c in cs) for cs in cands)
    if floor > budget:
        with pytest.raises(ValueError, match="below the smallest possible model"):
            allocate(cands, budget)
        return
    res = allocate(cands, budget, max_front=16)  # tiny front: exercise the thinned path too
    assert len(res.choice) == len(cands)
    assert res.total_bytes == sum(cs[i].nbytes for cs, i in zip(cands, res.choice)) <= budget
    assert res.total_distortion == pytest.approx(sum(cs[i].distortion for cs, i in zip(cands, res.choice)))
    assert res.lagrangian_bytes <= budget
    assert res.total_distortion <= res.lagrangian_distortion + 1e-9
    assert all(b <= budget for b, _ in res.frontier)


@given(st.lists(st.lists(candidate, min_size=1, max_size=4), min_size=1, max_size=4), st.integers(0, 8000))
def test_equals_brute_force(cands: list[list[Candidate]], budget: int) -> None:
    best = brute_force(cands, budget)
    if not np.isfinite(best):
        with pytest.raises(ValueError):
            allocate(cands, budget)
        return
    res = allocate(cands, budget)
    assert res.exact
    assert res.total_distortion == pytest.approx(best, rel=1e-12, abs=1e-9)
    # The frontier answers every smaller budget exactly too.
    for b in (budget // 3, budget // 2):
        opt = brute_force(cands, b)
        front = [d for nb, d in res.frontier if nb <= b]
        assert (min(front) if front else np.inf) == pytest.approx(opt, rel=1e-12, abs=1e-9)


@given(st.lists(st.tuples(st.integers(0, 100), st.floats(0, 100, allow_nan=False)), min_size=1, max_size=20))
def test_lower_hull_is_convex_and_minimal(points: list[tuple[int, float]]) -> None:
    b = np.array([p[0] for p in points])
    d = np.array([p[1] for p in points])
    h = lower_hull(b, d)
    hb, hd = b[h], d[h]
    assert np.all(np.diff(hb) > 0) and np.all(np.diff(hd) < 0)
    # Every point lies on or above every supporting line d + λb of the hull, for all λ ≥ 0.
    for lam in (0.0, 0.01, 0.1, 1.0, 10.0, 1e4):
        assert (hd + lam * hb).min() <= (d + lam * b).min() + 1e-9


def test_lagrangian_gap_is_closed_by_fixup() -> None:
    # Hull vertices far apart: λ alone leaves slack that the exact stage uses.
    cands = [[Candidate(10, 100.0), Candidate(100, 0.0), Candidate(30, 90.0)],
             [Candidate(10, 50.0), Candidate(40, 10.0)]]
    res = allocate(cands, 75)
    assert res.exact and res.total_bytes <= 75
    assert res.total_distortion == brute_force(cands, 75) == 100.0
    assert res.lagrangian_distortion >= res.total_distortion


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        allocate([[]], 10)
    with pytest.raises(ValueError, match="invalid distortion"):
        allocate([[Candidate(1, float("nan"))]], 10)
    with pytest.raises(ValueError, match="budget"):
        allocate([[Candidate(1, 1.0)]], -1)
    assert allocate([], 0).total_bytes == 0


def test_large_problem_is_fast_and_feasible() -> None:
    rng = np.random.default_rng(0)
    cands = []
    for _ in range(70):  # ~ a baseline model: 70 tensors × 25 candidates
        base = rng.integers(50_000, 300_000)
        cands.append([Candidate(int(base * bits / 8 * rng.uniform(0.9, 1.1)), float(2.0 ** (-2 * bits) * base * rng.uniform(0.5, 2)))
                      for bits in np.linspace(3, 8, 25)])
    budget = int(sum(min(c.nbytes for c in cs) for cs in cands) * 1.6)
    res = allocate(cands, budget)
    assert res.total_bytes <= budget
    assert res.exact  # the Pareto front stays small enough to be solved exactly
    assert res.total_distortion <= res.lagrangian_distortion
