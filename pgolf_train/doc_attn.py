"""Document-isolated attention without a mask (``TrainConfig.fused`` "varlen", with ``doc_attention``).

The model's ``doc_attention`` gives SDPA a boolean [B, 1, T, T] mask, which no flash kernel takes:
on CUDA it runs the memory-efficient or math kernel. Here the batch is one packed row of B·T tokens
cut into segments, one at every row start and every BOS, and FlashAttention's variable-length
kernel attends causally within each segment: the same attention (each token sees its own document
from its BOS on, or from its row start), and a segment of L tokens costs L²/2, not a row's T²/2.
On an H200 (torch 2.11) that kernel is FlashAttention 2: 1.6x cuDNN's causal one per layer at h200's
shape, so document isolation still costs 14% of the step (``benchmarks/results/doc_attn_*``).

``segments`` makes the cut points inside the compiled graph (a ``nonzero``: one device sync per
forward; ``dynamo_config`` lets the compiler trace its data-dependent length); ``varlen_attention``
is a custom op pair (forward, backward) that ``torch.compile`` calls as opaque kernels. On CUDA it
is ``aten._flash_attention_forward/backward``; elsewhere the same arithmetic in torch, segment by
segment (for the tests: slow, exact).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def segments(idx: Tensor, bos: int) -> Tensor:
    """idx [B, T] token ids → int32 [S + 1]: the offsets, in the batch flattened row-major, of the
    S segments (a segment starts at every row start and every ``bos``), then B·T."""
    starts = (idx == bos).index_fill(1, idx.new_zeros(1), True).reshape(-1)
    pos = torch.nonzero(starts).reshape(-1)
    return torch.cat([pos, pos.new_full((1,), idx.numel())]).to(torch.int32)


def dynamo_config() -> contextlib.AbstractContextManager:
    """The compiler setting ``segments`` needs under ``fullgraph=True``: ``nonzero``'s output length
    traced as a data-dependent size (else a graph break). Open it over the compile, as ``sdpa_context``."""
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)


def _segment_scores(q: Tensor, k: Tensor, a: int, b: int, scale: float) -> tuple[Tensor, Tensor]:
    """Segment [a, b): (softmax probabilities [H, L, L], logsumexp [H, L]) of its causal scores, in
    float32 (float64 for float64 inputs)."""
    g = q.size(1) // k.size(1)
    qs, ks = _up(q[a:b]).transpose(0, 1), _up(k[a:b]).transpose(0, 1).repeat_interleave(g, 0)
    s = ((qs @ ks.transpose(1, 2)) * scale).masked_fill(
        ~torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]), lse


def _up(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _spans(cu: Tensor) -> list[tuple[int, int]]:
    return [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]


def _reference(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out [N, H, D] in q's dtype, lse [H, N] float32): causal attention within each segment,
    computed in float32 (float64 for float64 inputs)."""
    out, lse = torch.zeros_like(q), torch.zeros(q.size(1), q.size(0), dtype=torch.float32, device=q.device)
    # (lse float32 as the flash kernel's, whatever q's dtype)
    g = q.size(1) // k.size(1)
    for a, b in _spans(cu):
        p, lse[:, a:b] = _segment_scores(q, k, a, b, scale)
        out[a:b] = (p @ _up(v[a:b]).transpose(0, 1).repeat_interleave(g, 0)).transpose(0, 1).to(q.dtype)
    return out, lse


def _reference_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, cu: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``_reference``'s out given d out, computed as it is (dS = P ∘ (dP − rowsum(dO ∘ O)))."""
    H, KV = q.size(1), k.size(1)
    g = H // KV
    dq, dk, dv = (torch.zeros_like(_up(t)) for t in (q, k, v))
    for a, b in _spans(cu):
        p, _ = _segment_scores(q, k, a, b, scale)
        ks, vs = (_up(t[a:b]).transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
        dos = _up(do[a:b]).transpose(0, 1)
        dp = dos @ vs.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
        dq[a:b] = (ds @ ks).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ _up(q[a:b]).transpose(0, 1)).view(KV, g, b - a, -1).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ dos).view(KV, g, b - a, -1).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check(q: Tensor, k: Tensor, v: Tensor, cu: Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or k.size(0) != q.size(0) or q.size(1) % k.size(1):
        raise ValueError(f"varlen_attention: q [N, H, D], k and v [N, KV, D] with H a multiple of KV; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"varlen_attention: cu must be int32 [S + 1], got {cu.dtype} {tuple(cu.shape)}")


@torch.library.custom_op("pgolf::varlen_attn", mutates_args=())
def _varlen_op(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float) -> tuple[Tensor, Tensor]:
    """q [N, H, D], k/v [N, KV, D], cu int32 [S + 1] → (out [N, H, D], lse [H, N] float32)."""
    _check(q, k, v, cu)
    if not q.is_cuda:
        return _reference(q, k, v, cu, scale)
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)[:2]
    if lse.shape != (q.size(1), q.size(0)):
        raise RuntimeError(f"flash varlen returned logsumexp {tuple(lse.shape)}, expected [H, N] = "
                           f"{(q.size(1), q.size(0))}: this torch's kernel differs from the one this op wraps")
    return out, lse


@_varlen_op.register_fake
def _(q, k, v, cu, max_len, scale):
    return torch.empty_like(q), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("pgolf::varlen_attn_bwd", mutates_args=())
def _varlen_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor,
                   max_len: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``_varlen_op``'s out, given d out."""
    if not q.is_cuda:
        return _reference_backward(do, q, k, v, cu, scale)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout's seed and offset: no dropout here
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        do, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, rng, torch.empty(0, device=q.device),
        scale=scale)
    return dq, dk, dv


@_varlen_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_len, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)
    ctx.max_len, ctx.scale = max_len, scale


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(do.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_op.register_autograd(_backward, setup_context=_setup)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None) -> Tensor:
    """Causal attention within the segments ``cu`` (``segments``): q [N, H, D], k and v [N, KV, D]
    (grouped-query when KV < H), last dims contiguous → [N, H, D]. ``max_len``: no segment is longer
    (the row length T). ``scale`` None = 1/sqrt(D), as SDPA."""
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    return _varlen_op(q, k, v, cu, int(max_len), scale)[0]
