"""Window planning: every target scored exactly once, with the longest context the rules allow."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgolf_eval.sliding import WindowPlan, document_segments, growing_windows, plan_windows


def coverage(plan, n_targets: int) -> np.ndarray:
    hits = np.zeros(n_targets, dtype=np.int64)
    for s, n, f in zip(plan.starts, plan.lengths, plan.score_from):
        hits[s + f:s + n] += 1
    return hits


@st.composite
def streams(draw):
    n = draw(st.integers(2, 300))
    bos = draw(st.lists(st.integers(0, n - 1), max_size=12))
    tokens = np.full(n, 7, dtype=np.uint16)
    tokens[bos] = 1
    seq_len = draw(st.integers(1, 40))
    stride = draw(st.integers(1, seq_len))
    return tokens, seq_len, stride


@given(streams(), st.booleans())
def test_each_target_once_with_longest_context(case, isolated):
    tokens, seq_len, stride = case
    n = len(tokens) - 1
    segs = document_segments(tokens, 1) if isolated else None
    plan = plan_windows(n, seq_len, stride, segments=segs)
    assert np.all(coverage(plan, n) == 1)
    assert plan.scored == n and plan.target_range() == (0, n)
    assert np.all(plan.lengths <= seq_len) and np.all(plan.score_from < plan.lengths)
    seg_of = np.zeros(n, dtype=np.int64) if segs is None else np.searchsorted(segs[:, 0], np.arange(n), "right") - 1
    begin = np.array([0]) if segs is None else segs[:, 0]
    for s, ln, f in zip(plan.starts, plan.lengths, plan.score_from):
        # context stays inside one segment, and is as long as the window length permits
        assert seg_of[s] == seg_of[s + ln - 1]
        if stride < seq_len:
            assert ln == min(seq_len, s + ln - begin[seg_of[s]])
        if f > 0:
            assert ln - f <= stride
    # target order: scored ranges are consecutive, so any contiguous run covers one range
    ends = plan.starts + plan.lengths
    assert np.all(plan.starts[1:] + plan.score_from[1:] == ends[:-1])


@given(st.integers(0, 50), st.integers(1, 300), st.integers(1, 40), st.integers(1, 40))
def test_growing_windows_score_every_chunk_from_the_start(begin, n, seq_len, stride):
    stride = min(stride, seq_len)
    plan = WindowPlan(*growing_windows(begin, begin + n, seq_len, stride))
    hits = coverage(plan, begin + n)
    assert np.all(hits[begin:] == 1) and not hits[:begin].any()
    assert len(plan) == -(-n // stride) and np.all(plan.lengths - plan.score_from <= stride)
    ends = plan.starts + plan.lengths
    assert np.all(plan.starts[1:] + plan.score_from[1:] == ends[:-1])  # in target order
    # every window holds the longest context inside the segment, up to seq_len
    assert np.all(plan.starts >= begin) and np.all(plan.lengths == np.minimum(seq_len, ends - begin))


@given(st.integers(1, 500), st.integers(1, 64), st.integers(1, 5))
def test_shards_partition_the_plan(n, seq_len, world):
    plan = plan_windows(n, seq_len, max(1, seq_len // 3))
    parts = [plan.shard(r, world) for r in range(world)]
    assert sum(len(p) for p in parts) == len(plan)
    ranges = [p.target_range() for p in parts if len(p)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_plain_layout_and_truncation():
    plan = plan_windows(10, 4)
    assert plan.starts.tolist() == [0, 4, 8] and plan.lengths.tolist() == [4, 4, 2]
    assert plan_windows(10, 4, 4).starts.tolist() == plan.starts.tolist()
    trunc = plan_windows(10, 4, truncate=True)
    assert trunc.lengths.tolist() == [4, 4] and trunc.scored == 8
    slide = plan_windows(10, 4, 3)
    # tail window ends at the last target with full context and scores only what is left
    assert list(zip(slide.starts, slide.lengths, slide.score_from)) == [(0, 4, 0), (3, 4, 1), (6, 4, 1)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError, match="seq_len"):
        plan_windows(10, 0)
    with pytest.raises(ValueError, match="tile"):
        plan_windows(10, 4, segments=np.array([[0, 5]]))
