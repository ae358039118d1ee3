"""The trainer's fused kernels, swapped into a model by ``apply_fusions`` (``TrainConfig.fused``).

They live here, not in ``model.py``: the model file ships in every artifact and evaluation must run
without Triton, so the model only exposes a hook (``GPT.head_loss``) and the eager path stays the
reference every fusion is tested against.

``rope``: the rotary cos/sin tables made once, eagerly, and read by the compiled graph (which
otherwise recomputes them inside every rotary kernel: 4 of them per layer in the ``h200`` profile).

``qkv``: the attention's three input projections as one matmul over the concatenated weights
(each fake-quantized as before): the block input is read once, and one larger GEMM replaces three
narrow ones (k and v are 256 wide in ``h200``, where a GEMM is bound by its memory traffic).

``fp8``: the blocks' matmuls of the forward and of the input gradient in float8 (e4m3) with a
scale per row of each operand (``torch._scaled_mm``, bf16 out): on Hopper twice the tensor-core rate
of bf16 for two thirds of the block FLOPs. The weight gradient stays a bf16 matmul, so the weights
learn from unrounded activations and output gradients. The weight, fake-quantized or not, is scaled
per output row (forward) and per input column (input gradient); e4m3 keeps 3 mantissa bits, so each
operand is rounded to ~6% relative, a noise the equal-loss check must show harmless. A matrix with a
dimension not a multiple of 16 (the kernel's requirement) takes the bf16 path, and so does a model
in eval mode: the trainer's validation and pre-quantization scores are of the artifact's function.

``mlp``: the MLP's activation inside its matmuls (Triton): the up projection's kernel writes both
h = x·W_fcᵀ and a = act(h) from its accumulator, so no pass reads h back; in the backward, the kernel
of d a = d out·W_proj multiplies by act'(h) before it stores, so d a never reaches memory. That saves
three [tokens, hidden] passes per layer (1.2 GB in ``h200``). The other three matmuls stay cuBLAS's.
Without Triton (or off the GPU without the interpreter) the same arithmetic in torch. With ``fp8``
too, the MLP's matmuls are these bf16 ones (``fp8`` keeps the attention's).

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
import functools
import os

import torch
from torch import Tensor

from pgolf_train.config import FUSIONS, SDPA_BACKENDS  # the one table of the choices

try:
    import triton
    import triton.language as tl
except ImportError:  # evaluation and CPU training need no Triton
    triton = tl = None

CE_CHUNK = 16384  # rows per chunk: 16,384 × 4,096 bf16 logits = 128 MiB live at a time


def parse_fusions(spec: str) -> tuple[str, ...]:
    """``"ce"`` → ("ce",); "" → (); an unknown name is a ValueError naming it."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    for n in names:
        if n not in FUSIONS:
            raise ValueError(f"unknown fusion {n!r}; expected a comma-separated list of {', '.join(FUSIONS)}")
    return names


def _interpreter() -> bool:
    """Triton runs on the CPU (interpreted) only when it was imported under ``TRITON_INTERPRET=1``:
    its own library functions (tl.sum, tl.max) are interpreted or compiled from that moment on."""
    return triton is not None and type(tl.standard.sum).__name__ == "InterpretedFunction"


def _use_triton(t: Tensor) -> bool:
    return triton is not None and (t.is_cuda or (t.device.type == "cpu" and _interpreter()))


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


@functools.cache
def _jit(fn):
    """``fn`` wrapped by ``triton.jit`` at first use, in the mode Triton was imported in."""
    with _env("TRITON_INTERPRET", "1" if _interpreter() else "0"):
        return triton.jit(fn)


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def softcap_ce_rows(logits: Tensor, targets: Tensor, softcap: float, grad_scale: float) -> Tensor:
    """Per-row soft-capped cross-entropy of ``logits`` [n, V] (any float dtype) against ``targets``
    long[n]: returns float32 losses [n] in nats and overwrites ``logits`` with grad_scale × d loss/d logits."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    if _use_triton(logits):
        block = min(triton.next_power_of_2(V), 8192)
        _jit(_softcap_ce_rows)[(n,)](logits, logits.stride(0), targets, loss, V, float(softcap), float(grad_scale),
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


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def _rows_fp8(t: Tensor) -> tuple[Tensor, Tensor]:
    """t [M, K] -> (q float8_e4m3fn [M, K] contiguous, s float32 [M, 1]) with t ≈ q · s, each row's
    largest magnitude at the format's largest value (an all-zero row: s tiny, q zero)."""
    t = t.float()
    s = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / E4M3_MAX
    return (t / s).to(torch.float8_e4m3fn).contiguous(), s


class _FP8Linear(torch.autograd.Function):
    """x [..., K] (bf16) @ w [N, K]ᵀ -> [..., N] in x's dtype; see ``fp8`` in the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))
        xq, sx = _rows_fp8(x2)
        wq, sw = _rows_fp8(w)  # per output row
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t(), out_dtype=x.dtype)
        ctx.save_for_backward(x2, w)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.size(-1))
        gq, sg = _rows_fp8(dy2)
        wtq, swt = _rows_fp8(w.t())  # [K, N]: a scale per input column of w
        dx = torch._scaled_mm(gq, wtq.t(), scale_a=sg, scale_b=swt.t(), out_dtype=dy.dtype)
        dw = dy2.t().to(x2.dtype) @ x2  # bf16, as the reference's weight gradient
        return dx.view(ctx.x_shape), dw.to(w.dtype)


def fp8_linear(x: Tensor, w: Tensor) -> Tensor:
    """``F.linear(x, w.to(x.dtype))`` with float8 forward and input-gradient matmuls (``fp8``)."""
    if x.size(-1) % 16 or w.size(0) % 16:
        return torch.nn.functional.linear(x, w.to(x.dtype))
    return _FP8Linear.apply(x, w)


def _fp8_in_training(m: torch.nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """``fp8_linear`` while ``m`` trains; in eval mode (the trainer's validation and pre-quantization
    scores) the bf16 matmul, so those score the function the artifact computes."""
    return fp8_linear(x, w) if m.training else torch.nn.functional.linear(x, w.to(x.dtype))


def _mm_act_kernel(a_desc, b_desc, h_desc, out_desc, M, N, K, B_NK: tl.constexpr,
                   LEAKY: tl.constexpr, BACKWARD: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """acc = A[M, K] · B[K, N] (fp32 accumulate) on BM × BN tiles, then the epilogue:
    forward: h = bf16(acc) stored to h, act(h) to out (h rounded first, as the reference rounds the
    matmul's output before the activation); backward: out = bf16(acc · act'(h)), h read.
    Operands and results move by TMA descriptors (zero-filled / clipped at the edges); B is given as
    [N, K] (B_NK, a weight's own layout) or [K, N]. Each program takes the tiles pid, pid + programs,
    ... so a grid of about one program per SM keeps loading the next tile while one finishes.
    UPCAST: the tiles multiplied in fp32 (the same products, exact for bf16 inputs): the interpreter's
    dot mishandles bf16."""
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    for tile in range(tl.program_id(0), n_m * n_n, tl.num_programs(0)):
        group = tile // (GROUP_M * n_n)  # grouped order: neighbouring tiles share A's rows in L2
        first_m = group * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        om = (first_m + (tile % (GROUP_M * n_n)) % size_m) * BM
        on = ((tile % (GROUP_M * n_n)) // size_m) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = a_desc.load([om, k0])
            b = b_desc.load([on, k0]).T if B_NK else b_desc.load([k0, on])
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        if BACKWARD:  # d act / d h: 2h for h > 0; else 0.5h (leaky_relu(·, 0.5)²) or 0 (relu²)
            h = h_desc.load([om, on]).to(tl.float32)
            g = tl.where(h > 0, 2.0 * h, 0.5 * h if LEAKY else 0.0 * h)
            out_desc.store([om, on], (acc * g).to(out_desc.dtype))
        else:
            h = acc.to(h_desc.dtype)
            h_desc.store([om, on], h)
            hf = h.to(tl.float32)
            if LEAKY:
                act = tl.where(hf > 0, hf, 0.5 * hf)
            else:
                act = tl.maximum(hf, 0.0)
            out_desc.store([om, on], (act * act).to(out_desc.dtype))


# BM, BN, BK, warps, stages, programs per SM (0: one program per tile) on the GPU
# (benchmarks/fused_kernels_bench.py times the candidates)
MM_ACT_TILES = (128, 128, 64, 8, 3, 0)


def _mm_act(a: Tensor, b: Tensor, h: Tensor | None, leaky: bool) -> tuple[Tensor, Tensor]:
    """Forward (h None): a [M, K] · b [K, N] -> (h, act(h)); backward: -> (h, (a·b) ⊙ act'(h))."""
    M, K = a.shape
    N = b.size(1)
    backward = h is not None
    # TMA needs 16-byte aligned rows: K and N multiples of 8 (bf16); other shapes take the torch path
    if not _use_triton(a) or K % 8 or N % 8 or a.element_size() != 2:
        acc = a @ b  # the same arithmetic; the product rounded to a's dtype first, as cuBLAS's
        if backward:
            hf = h.float()
            return h, (acc.float() * torch.where(hf > 0, 2 * hf, 0.5 * hf if leaky else 0 * hf)).to(a.dtype)
        act = acc.float().clamp_min(0) if not leaky else torch.where(acc > 0, acc, 0.5 * acc).float()
        return acc, (act * act).to(a.dtype)
    from triton.tools.tensor_descriptor import TensorDescriptor

    a = a.contiguous()
    b_nk = b.stride(0) == 1  # b is the transpose of a row-major [N, K] (the weight as stored)
    b = b.t().contiguous() if b_nk else b.contiguous()
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    h = torch.empty(M, N, dtype=a.dtype, device=a.device) if not backward else h.contiguous()
    bm, bn, bk, warps, stages, per_sm = MM_ACT_TILES if a.is_cuda else (16, 16, 16, 4, 1, 0)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if per_sm:
        tiles = min(tiles, per_sm * torch.cuda.get_device_properties(a.device).multi_processor_count)
    desc = TensorDescriptor.from_tensor
    _jit(_mm_act_kernel)[(tiles,)](
        desc(a, [bm, bk]), desc(b, [bn, bk] if b_nk else [bk, bn]), desc(h, [bm, bn]), desc(out, [bm, bn]),
        M, N, K, B_NK=b_nk, LEAKY=leaky, BACKWARD=backward, UPCAST=not a.is_cuda, BM=bm, BN=bn, BK=bk, GROUP_M=8,
        **({"num_warps": warps, "num_stages": stages} if a.is_cuda else {}))
    return h, out


@torch.library.custom_op("pgolf::mm_act", mutates_args=())
def _mm_act_op(a: Tensor, b: Tensor, leaky: bool) -> tuple[Tensor, Tensor]:
    return _mm_act(a, b, None, leaky)


@_mm_act_op.register_fake
def _(a, b, leaky):
    return a.new_empty(a.size(0), b.size(1)), a.new_empty(a.size(0), b.size(1))


@torch.library.custom_op("pgolf::mm_act_grad", mutates_args=())
def _mm_act_grad_op(a: Tensor, b: Tensor, h: Tensor, leaky: bool) -> Tensor:
    return _mm_act(a, b, h, leaky)[1]


@_mm_act_grad_op.register_fake
def _(a, b, h, leaky):
    return torch.empty_like(h)


class _FusedMLP(torch.autograd.Function):
    """proj(act(fc(x))) with ``_mm_act`` for the up projection and for d act; see ``mlp`` above."""

    @staticmethod
    def forward(ctx, x: Tensor, w_fc: Tensor, w_proj: Tensor, leaky: bool) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))
        wf, wp = w_fc.to(x.dtype), w_proj.to(x.dtype)
        h, a = _mm_act_op(x2, wf.t(), leaky)
        out = a @ wp.t()
        ctx.save_for_backward(x2, wf, wp, h, a)
        ctx.leaky, ctx.x_shape, ctx.w_dtypes = leaky, x.shape, (w_fc.dtype, w_proj.dtype)
        return out.view(*x.shape[:-1], wp.size(0))

    @staticmethod
    def backward(ctx, dout: Tensor):
        x2, wf, wp, h, a = ctx.saved_tensors
        d2 = dout.reshape(-1, dout.size(-1)).to(x2.dtype)
        dh = _mm_act_grad_op(d2, wp, h, ctx.leaky)  # (d out · W_proj) ⊙ act'(h)
        dw_proj = d2.t() @ a
        dx = dh @ wf
        dw_fc = dh.t() @ x2
        return dx.view(ctx.x_shape), dw_fc.to(ctx.w_dtypes[0]), dw_proj.to(ctx.w_dtypes[1]), None


def fused_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, leaky: bool) -> Tensor:
    """``proj(act(fc(x)))`` of the model's MLP (weights [hidden, d] and [d, hidden], cast to x's dtype)."""
    return _FusedMLP.apply(x, w_fc, w_proj, leaky)


def apply_fusions(model: torch.nn.Module, fusions: str | tuple[str, ...], seq_len: int = 0,
                  device: torch.device | None = None) -> None:
    """Swap ``fusions`` (``parse_fusions``) into ``model`` (a GPT); () restores the reference path.

    ``rope`` needs the training ``seq_len`` and ``device``: the tables are made here, eagerly."""
    names = parse_fusions(fusions) if isinstance(fusions, str) else fusions
    model.head_loss = linear_softcap_ce if "ce" in names else None
    for m in model.modules():
        if hasattr(m, "fuse_qkv"):
            m.fuse_qkv = "qkv" in names
    for block in getattr(model, "blocks", ()):  # the blocks' matrices; the head's matmuls are the CE's
        for m in block.modules():
            if hasattr(m, "matmul"):
                m.matmul = functools.partial(_fp8_in_training, m) if "fp8" in names else None
            if hasattr(m, "fused"):  # a dense MLP (an MoE's experts are bmm'ed, not called)
                m.fused = fused_mlp if "mlp" in names else None
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
