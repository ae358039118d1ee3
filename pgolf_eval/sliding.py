"""Window planning: which inputs each forward pass sees and which of its targets it scores.

Index conventions. A token stream ``tokens`` of length ``N`` has ``N - 1`` targets; target ``j``
is ``tokens[j + 1]``, predicted from inputs ``tokens[..j]``. A window ``(start, length, score_from)``
feeds inputs ``tokens[start:start + length]`` with targets ``tokens[start + 1:start + length + 1]``
and scores its positions ``score_from..length - 1``, i.e. targets ``start + score_from`` to
``start + length - 1``.

Plans are built per *segment*: a half-open range of input positions whose context may not reach
before it. The whole stream is one segment; in document-isolated mode each document is one
(the segment of a document ends where the next BOS sits as an *input*, so a document's last
position predicts the next BOS from that document's context only). Windows come out in target
order, every target of every segment is scored exactly once, and the scored targets of any
contiguous run of windows form one contiguous range (which is what per-rank byte counting uses).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """Windows as three int64 arrays of shape ``(n_windows,)``, in target order."""

    starts: np.ndarray
    lengths: np.ndarray
    score_from: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def scored(self) -> int:
        """Targets scored by the plan."""
        return int((self.lengths - self.score_from).sum())

    @property
    def input_tokens(self) -> int:
        """Forward-pass positions the plan costs (scored + context recomputed)."""
        return int(self.lengths.sum())

    def target_range(self) -> tuple[int, int]:
        """``(lo, hi)``: the plan scores exactly targets ``lo..hi-1`` (empty plan: ``(0, 0)``)."""
        if len(self) == 0:
            return 0, 0
        return int(self.starts[0] + self.score_from[0]), int(self.starts[-1] + self.lengths[-1])

    def select(self, index: slice | np.ndarray) -> "WindowPlan":
        return WindowPlan(self.starts[index], self.lengths[index], self.score_from[index])

    def shard(self, rank: int, world: int) -> "WindowPlan":
        """The contiguous part of the plan for ``rank`` of ``world``, balanced by forward cost."""
        if world <= 1:
            return self
        cost = np.cumsum(self.lengths)
        total = int(cost[-1]) if len(self) else 0
        # window i goes to the rank whose share of the cumulative cost holds its midpoint
        bounds = np.searchsorted(cost - self.lengths // 2, [total * r // world for r in range(world + 1)])
        bounds[-1] = len(self)
        return self.select(slice(int(bounds[rank]), int(bounds[rank + 1])))


def document_segments(tokens: np.ndarray, bos_id: int, n_inputs: int | None = None) -> np.ndarray:
    """Segments (int64 ``(k, 2)`` of ``[begin, end)`` input positions) that start at each BOS.

    Inputs before the first BOS (a stream that starts mid-document) form their own segment.
    ``n_inputs`` (default ``len(tokens) - 1``) caps the segments: positions at or past it have no
    target to predict.
    """
    n = len(tokens) - 1 if n_inputs is None else n_inputs
    if n <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    bos = np.flatnonzero(np.asarray(tokens[:n]) == bos_id).astype(np.int64)
    begins = np.union1d([0], bos)
    ends = np.append(begins[1:], n)
    return np.stack([begins, ends], axis=1)


def segment_windows(begin: int, end: int, seq_len: int, stride: int) -> tuple[np.ndarray, ...]:
    """Windows of one segment; ``stride == seq_len`` is the plain non-overlapping layout."""
    n = end - begin
    if stride >= seq_len or n <= seq_len:
        starts = np.arange(begin, end, seq_len, dtype=np.int64)
        lengths = np.minimum(seq_len, end - starts)
        return starts, lengths, np.zeros_like(starts)
    # the first window scores all its targets; each later one the `stride` targets after the last
    # scored one, with the full `seq_len` of context ending there; the last may score fewer
    n_later = -(-(n - seq_len) // stride)
    ends = begin + seq_len + stride * np.arange(1, n_later + 1, dtype=np.int64)
    ends[-1] = end
    prev_ends = np.concatenate([[begin + seq_len], ends[:-1]])
    starts = np.concatenate([[begin], ends - seq_len])
    lengths = np.full(n_later + 1, seq_len, dtype=np.int64)
    score_from = np.concatenate([[0], seq_len - (ends - prev_ends)])
    return starts, lengths, score_from


def growing_windows(begin: int, end: int, seq_len: int, stride: int) -> tuple[np.ndarray, ...]:
    """Windows of one segment that each score ``stride`` targets from the segment's start on.

    Window ``k`` ends ``(k + 1) * stride`` inputs into the segment (the last one at ``end``) and
    holds up to ``seq_len`` of context: windows grow until they reach ``seq_len``, then slide.
    Unlike :func:`segment_windows` the first ``seq_len`` targets are not scored in one window,
    so score-first test-time training can adapt after each chunk of a document's start too.
    """
    ends = np.minimum(np.arange(begin + stride, end + stride, stride, dtype=np.int64), end)
    prev_ends = np.concatenate([[begin], ends[:-1]])
    starts = np.maximum(begin, ends - seq_len)
    lengths = ends - starts
    return starts, lengths, lengths - (ends - prev_ends)


def plan_windows(n_targets: int, seq_len: int, stride: int | None = None, *,
                 segments: np.ndarray | None = None, truncate: bool = False) -> WindowPlan:
    """Plan the windows that score targets ``0..n_targets-1``.

    ``stride`` None or ``seq_len``: plain non-overlapping windows (the challenge's evaluation);
    ``stride < seq_len``: sliding windows, each target scored once with the longest context the
    window length allows. ``segments`` (from :func:`document_segments`) keeps context inside each
    segment. ``truncate`` scores only the first ``(n_targets // seq_len) * seq_len`` targets, as the
    challenge's evaluation does; otherwise the final partial window is scored too.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if n_targets < 0:
        raise ValueError(f"n_targets must be >= 0, got {n_targets}")
    if truncate:
        if segments is not None:
            raise ValueError("truncation to whole windows is the challenge's plain layout; "
                             "it does not combine with document-isolated segments")
        n_targets = (n_targets // seq_len) * seq_len
    if segments is None:
        segments = np.array([[0, n_targets]], dtype=np.int64) if n_targets else np.zeros((0, 2), np.int64)
    segments = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
    if len(segments) and (segments[0, 0] != 0 or segments[-1, 1] != n_targets
                          or np.any(segments[1:, 0] != segments[:-1, 1]) or np.any(segments[:, 1] <= segments[:, 0])):
        raise ValueError(f"segments must tile 0..{n_targets} with non-empty consecutive ranges")
    parts = [segment_windows(int(b), int(e), seq_len, stride) for b, e in segments]
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return WindowPlan(empty, empty, empty)
    return WindowPlan(*(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3)))
