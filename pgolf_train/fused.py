"""The trainer's fused kernels, swapped into a model by ``apply_fusions`` (``TrainConfig.fused``).

They live here, not in ``model.py``: the model file ships in every artifact and evaluation must run
without Triton, so the model only exposes a hook (``GPT.head_loss``) and the eager path stays the
reference every fusion is tested against.

``rope``: the rotary cos/sin tables made once, eagerly, and read by the compiled graph (which
otherwise recomputes them inside every rotary kernel: 4 of them per layer in the ``h200`` profile).

``qkv``: the attention's three input projections as one matmul over the concatenated weights
(each fake-quantized as before): the block input is read once, and one larger GEMM replaces three
narrow ones (k and v are 256 wide in ``h200``, where a GEMM is bound by its memory traffic).

``qk`` and ``xsa``: the attention block's QK-norm + rotary + gain and its exclusive
self-attention, one Triton kernel each way (``pgolf_train.fused_attn``, bound to each attention
module a ``FusedAttention``).

``mlp``: the MLP's activation inside its two GEMMs' epilogues, forward and backward (quack's CuTe
DSL kernels, an optional dependency: ``pgolf_train.fused_mlp``).

``fa4``: causal attention by FlashAttention 4's kernels (CuTe DSL, an optional dependency:
``pgolf_train.fa4_attn``) instead of SDPA's.

``varlen``: ``doc_attention`` without its boolean [B, 1, T, T] mask (which no flash kernel takes):
FlashAttention's variable-length kernel over the batch packed into segments, one per document
piece (``pgolf_train.doc_attn``); needs ``doc_attention``, and ``dynamo_context`` open over the compile.
On the H200 its step is 0.90x the mask's but 1.14x causal cuDNN's (``doc_attn_bench_h200.json``).

``epilogue``: inductor's max-autotune GEMMs, so that elementwise work after a matmul can run in
its epilogue (``compile_options``).

``tune``: inductor's coordinate-descent search over the block sizes of the Triton kernels it
generates (the norms, activations and their backward: ~30% of the ``h200`` step in its profile),
timed per kernel during the compile (``compile_options``).

``ce``: the output head, its soft cap and the cross-entropy in one pass over row chunks of the
batch. Per chunk of ``CE_CHUNK`` rows: the bf16 logits (one matmul), then one kernel per row that
computes the loss and writes d loss / d logits over the logits in place, then the two matmuls of
the backward, accumulated. The batch's fp32 logits (131,072 × 4,096 × 4 bytes = 2 GiB for ``h200``)
never exist; the backward only scales the gradients the forward already made. On CUDA the row
kernel is Triton; elsewhere (or with no Triton) the same arithmetic in torch.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor

from pgolf_train import triton_env
from pgolf_train.config import FUSIONS, SDPA_BACKENDS  # the one table of the choices
from pgolf_train.triton_env import tl, triton

CE_CHUNK = 16384  # rows per chunk: 16,384 × 4,096 bf16 logits = 128 MiB live at a time


def parse_fusions(spec: str) -> tuple[str, ...]:
    """``"ce"`` → ("ce",); "" → (); an unknown name is a ValueError naming it."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    for n in names:
        if n not in FUSIONS:
            raise ValueError(f"unknown fusion {n!r}; expected a comma-separated list of {', '.join(FUSIONS)}")
    return names


def _softcap_ce_rows(logits_ptr, stride, targets_ptr, loss_ptr, V, softcap, grad_scale,
                     BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """One program per row: loss = logsumexp(z) - z[t] with z = c·tanh(l/c); the row's logits are
    overwritten with grad_scale · (softmax(z) - onehot(t)) · (1 - tanh²(l/c)) in their own dtype.
    tanh(u) = 1 - 2 / (exp(2u) + 1): exact at the extremes (exp overflows to inf → 1, underflows → -1)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    t = tl.load(targets_ptr + row)
    offs = tl.arange(0, BLOCK)
    if ONE_BLOCK:  # the row fits one block: read it once
        mask = offs < V
        th = 1.0 - 2.0 / (tl.exp(2.0 * tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) / softcap) + 1.0)
        z = tl.where(mask, softcap * th, float("-inf"))
        m = tl.max(z, 0)
        lse = m + tl.log(tl.sum(tl.exp(z - m), 0))
        zt = tl.sum(tl.where(offs == t, z, 0.0), 0)
        g = (tl.exp(z - lse) - (offs == t).to(tl.float32)) * (1.0 - th * th) * grad_scale
        tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)
    else:  # online max and sum over the blocks, then a second pass for the gradient
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        zt = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            o = start + offs
            mask = o < V
            th = 1.0 - 2.0 / (tl.exp(2.0 * tl.load(base + o, mask=mask, other=0.0).to(tl.float32) / softcap) + 1.0)
            z = tl.where(mask, softcap * th, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            zt += tl.sum(tl.where(o == t, z, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)
        for start in range(0, V, BLOCK):
            o = start + offs
            mask = o < V
            th = 1.0 - 2.0 / (tl.exp(2.0 * tl.load(base + o, mask=mask, other=0.0).to(tl.float32) / softcap) + 1.0)
            g = (tl.exp(softcap * th - lse) - (o == t).to(tl.float32)) * (1.0 - th * th) * grad_scale
            tl.store(base + o, g.to(logits_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, lse - zt)


def softcap_ce_rows(logits: Tensor, targets: Tensor, softcap: float, grad_scale: float) -> Tensor:
    """Per-row soft-capped cross-entropy of ``logits`` [n, V] (any float dtype) against ``targets``
    long[n]: returns float32 losses [n] in nats and overwrites ``logits`` with grad_scale × d loss/d logits."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    if triton_env.use_triton(logits):
        block = min(triton.next_power_of_2(V), 8192)
        triton_env.jit(_softcap_ce_rows)[(n,)](
            logits, logits.stride(0), targets, loss, V, float(softcap), float(grad_scale),
            BLOCK=block, ONE_BLOCK=block >= V, num_warps=8 if block >= 4096 else 4)
        return loss
    th = torch.tanh(logits.float() / softcap)
    z = softcap * th
    lse = torch.logsumexp(z, dim=-1)
    loss.copy_(lse - z.gather(1, targets[:, None]).squeeze(1))
    g = torch.exp(z - lse[:, None])
    g.scatter_add_(1, targets[:, None], torch.full_like(g[:, :1], -1.0))
    logits.copy_(g * (1 - th * th) * grad_scale)
    return loss


@torch.library.custom_op("pgolf::linear_softcap_ce", mutates_args=())
def _linear_softcap_ce(x: Tensor, w: Tensor, targets: Tensor, softcap: float, chunk: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D], w [V, D] (same dtype), targets long[N] → (mean loss, d/dx [N, D], d/dw [V, D])."""
    with torch.autocast(x.device.type, enabled=False):  # dtypes are the caller's: x's for every matmul
        return _chunked_ce(x, w, targets, softcap, chunk)


def _chunked_ce(x: Tensor, w: Tensor, targets: Tensor, softcap: float, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    n = x.size(0)
    dx = torch.empty_like(x)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):
        xc, tc = x[s:s + chunk], targets[s:s + chunk]
        logits = xc @ w.t()  # [c, V] in x's dtype; becomes its own gradient below
        total += softcap_ce_rows(logits, tc, softcap, 1.0 / n).sum()
        torch.mm(logits, w, out=dx[s:s + chunk])
        dw += (logits.t() @ xc).float()
    return total / n, dx, dw.to(w.dtype)


@_linear_softcap_ce.register_fake
def _(x, w, targets, softcap, chunk):
    return x.new_empty((), dtype=torch.float32), torch.empty_like(x), torch.empty_like(w)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, g, _gx, _gw):
    dx, dw = ctx.saved_tensors
    return (dx * g.to(dx.dtype), dw * g.to(dw.dtype), None, None, None)


_linear_softcap_ce.register_autograd(_backward, setup_context=_setup)


def linear_softcap_ce(x: Tensor, w: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Mean over tokens of CE(c·tanh(x·wᵀ / c), targets): x [..., D], w [V, D], targets long[...].

    Equals ``F.cross_entropy(softcap(F.linear(x, w).float()), targets)`` (the model's head and loss),
    gradients too, within rounding: the logits are made in x's dtype as the model's head makes them."""
    w = w.to(x.dtype)
    return _linear_softcap_ce(x.reshape(-1, x.size(-1)), w, targets.reshape(-1), float(softcap), CE_CHUNK)[0]


def apply_fusions(model: torch.nn.Module, fusions: str | tuple[str, ...], seq_len: int = 0,
                  device: torch.device | None = None) -> None:
    """Swap ``fusions`` (``parse_fusions``) into ``model`` (a GPT); () restores the reference path.

    ``rope`` needs the training ``seq_len`` and ``device``: the tables are made here, eagerly."""
    names = parse_fusions(fusions) if isinstance(fusions, str) else fusions
    model.head_loss = linear_softcap_ce if "ce" in names else None
    for m in model.modules():
        if hasattr(m, "fuse_qkv"):
            m.fuse_qkv = "qkv" in names
    # imported only when asked for (or to undo it): a generated train_gpt.py carries it only then
    if {"qk", "xsa", "varlen", "fa4"} & set(names) or sys.modules.get("pgolf_train.fused_attn") is not None:
        from pgolf_train import fused_attn

        fused_attn.bind(model, "qk" in names, "xsa" in names, "varlen" in names, "fa4" in names)
    if "mlp" in names or sys.modules.get("pgolf_train.fused_mlp") is not None:
        from pgolf_train import fused_mlp

        fused_mlp.bind(model, "mlp" in names)
    model.doc_segments = None
    if "varlen" in names:
        from pgolf_train import doc_attn

        model.doc_segments = doc_attn.segments
    model.rope_cache = None
    if "rope" in names and seq_len > 0:
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0": the key the batches' device matches
        model.rope_cache = {(seq_len, device): model.rope(seq_len, device)}


def compile_options(fusions: str | tuple[str, ...]) -> dict:
    """Inductor options the fusions ask for: ``epilogue`` = max-autotune GEMMs (Triton templates
    benchmarked against cuBLAS per shape; a template takes the elementwise work after it, e.g. relu²,
    into its epilogue); ``tune`` = coordinate-descent tuning of the generated kernels' block sizes.
    Compiling takes longer; the warm-up pays it, outside the budget."""
    names = parse_fusions(fusions) if isinstance(fusions, str) else fusions
    options = {"max_autotune": True, "epilogue_fusion": True} if "epilogue" in names else {}
    if "tune" in names:
        options["coordinate_descent_tuning"] = True
    return options


def dynamo_context(fusions: str | tuple[str, ...]) -> contextlib.AbstractContextManager:
    """Compiler settings the fusions need, open over the compile (the warm-up) and the steps:
    ``varlen``'s data-dependent segment count (``pgolf_train.doc_attn.dynamo_config``)."""
    names = parse_fusions(fusions) if isinstance(fusions, str) else fusions
    if "varlen" not in names:
        return contextlib.nullcontext()
    from pgolf_train import doc_attn

    return doc_attn.dynamo_config()


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """A context in which scaled_dot_product_attention uses only ``backend`` ("" = torch's choice).

    Under torch.compile the backend is fixed when the graph is traced, so the context must be open
    for the compile (the warm-up) as well as the steps."""
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r}; expected one of {', '.join(repr(b) for b in SDPA_BACKENDS)}")
    if not backend:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]])
