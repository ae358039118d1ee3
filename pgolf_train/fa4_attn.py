"""``fused=fa4``: causal attention by FlashAttention 4's Hopper kernels (CuTe DSL, ``flash-attn-4``).

One layer of ``h200`` forward + backward, measured alone: 1.723 ms against cuDNN's 1.846
(``fa4_probe_h200.json``); in the step, not measured yet. FlashAttention takes q, k, v as
[B, T, heads, D], the layout the projections write (k and v of grouped-query attention as they are).

The kernels sit behind a pair of custom ops (``pgolf::fa4_attn``, ``pgolf::fa4_attn_bwd``), so
``torch.compile`` keeps them opaque; off CUDA the ops compute SDPA's causal attention (float32
math), so the model and its tests run anywhere. ``flash-attn-4`` is optional: ``unavailable()``
names why it cannot run here, and the trainer refuses ``fa4`` with that reason.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pgolf_train.device import hopper_kernels_unavailable

_fa4 = None  # flash_attn.cute.interface once imported


def _interface():
    global _fa4
    if _fa4 is None:
        from flash_attn.cute import interface

        _fa4 = interface
    return _fa4


def unavailable(device: torch.device | str | None = None) -> str | None:
    """None when ``fused=fa4`` can run on ``device`` (default: the current CUDA device), else why not."""
    return hopper_kernels_unavailable(device, "FlashAttention 4's kernels", _interface, "flash-attn-4")


def _probs(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor, int]:
    """Causal attention probabilities [B, H, T, T] (float32; float64 for float64 q) of [B, T, heads, D]
    inputs, their logsumexp [B, H, T], and the query heads per K/V head."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.size(2) // k.size(2)
    s = (q.to(dt).transpose(1, 2) @ k.to(dt).transpose(1, 2).repeat_interleave(g, 1).transpose(-1, -2)) * scale
    T = s.size(-1)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (s - lse[..., None]).exp(), lse, g


def _reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The ops' CPU path: (out [B, T, H, D] in q's dtype, lse [B, H, T] float32)."""
    p, lse, g = _probs(q, k, scale)
    out = p @ v.to(p.dtype).transpose(1, 2).repeat_interleave(g, 1)
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.float()


def _reference_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``_reference``'s out given d out: dS = P ∘ (dP − rowsum(dP ∘ P)), summed over
    each K/V head's query heads for dk and dv."""
    p, _, g = _probs(q, k, scale)
    B, T, KV, D = k.shape
    kf, vf = (t.to(p.dtype).transpose(1, 2).repeat_interleave(g, 1) for t in (k, v))
    dof = do.to(p.dtype).transpose(1, 2)
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq = ds @ kf
    dk = (ds.transpose(-1, -2) @ q.to(p.dtype).transpose(1, 2)).view(B, KV, g, T, D).sum(2)
    dv = (p.transpose(-1, -2) @ dof).view(B, KV, g, T, D).sum(2)
    return tuple(t.transpose(1, 2).to(ref.dtype).contiguous() for t, ref in ((dq, q), (dk, k), (dv, v)))


@torch.library.custom_op("pgolf::fa4_attn", mutates_args=())
def _fa4_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, T, H, D], k and v [B, T, KV, D] (any strides) → (out [B, T, H, D] contiguous, lse [B, H, T]
    float32), causal. Every output of both ops is contiguous whatever the inputs' layout: the fake
    implementations say so, and torch.compile indexes the outputs by what they say."""
    if not q.is_cuda:
        return _reference(q, k, v, scale)
    out, lse = _interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
    return out, lse


@_fa4_op.register_fake
def _(q, k, v, scale):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("pgolf::fa4_attn_bwd", mutates_args=())
def _fa4_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``_fa4_op``'s out given d out (all [B, T, heads, D]; the gradients contiguous)."""
    if not q.is_cuda:
        return _reference_backward(do, q, k, v, scale)
    grads = [t.new_empty(t.shape) for t in (q, k, v)]  # its own would take q's, k's and v's strides
    _interface()._flash_attn_bwd(q, k, v, out, do, lse, scale, True, dq=grads[0], dk=grads[1], dv=grads[2])
    return tuple(grads)


@_fa4_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd_op(do, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_fa4_op.register_autograd(_backward, setup_context=_setup)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """Causal attention: q [B, T, H, D], k and v [B, T, KV, D] (grouped-query when KV < H) → [B, T, H, D].
    ``scale`` None = 1/sqrt(D), as SDPA. Any layout: the kernels take a tensor whose last stride is 1
    and whose other strides and pointer are 16-byte aligned as it is (v as a view of the qkv
    projection's output, d out as the transposed view xsa's backward hands over) and copy the rest."""
    if q.size(2) % k.size(2) or k.shape != v.shape:
        raise ValueError(f"fa4_attention: q [B, T, H, D], k and v [B, T, KV, D] with H a multiple of KV; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    return _fa4_op(q, k, v, scale)[0]
