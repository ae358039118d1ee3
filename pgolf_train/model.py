"""GPT for parameter golf: the challenge baseline (U-Net skips, GQA, QK-norm, relu², tied embeddings,
softcap) plus switches: state-space mixer layers, a routed mixture-of-experts MLP, early-exit heads, and the
field's tricks (XSA, SmearGate, BigramHash, attention output gates, LN scale, gated skips, document
masking). Self-contained (torch only): this file ships inside the artifact."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # QAT is training-only; the artifact's copy of this file runs on torch alone
    from pgolf_codec.schemes import fake_quant_ste
except ImportError:
    fake_quant_ste = None


def _f(default: object, *allowed: object) -> dataclasses.Field:
    """A config field with its allowed values: (lo, hi) inclusive for numbers, a tuple of choices for str."""
    return dataclasses.field(default=default, metadata={"allowed": allowed})


@dataclasses.dataclass
class GPTConfig:
    # Bounds are generous for research yet keep a hostile config from allocating absurd sizes.
    vocab_size: int = _f(1024, 2, 1 << 18)  # tokenizer vocabulary
    num_layers: int = _f(9, 1, 256)  # physical (unique) blocks
    model_dim: int = _f(512, 4, 16384)  # residual width
    num_heads: int = _f(8, 1, 1024)  # query heads; head_dim = model_dim / num_heads
    num_kv_heads: int = _f(4, 1, 1024)  # key/value heads (GQA)
    mlp_mult: float = _f(2.0, 0.0, 64.0)  # MLP hidden = int(mlp_mult * model_dim)
    activation: str = _f("relu2", "relu2", "leaky_relu2")  # relu(x)² or leaky_relu(x, 0.5)²
    embed_dim: int = _f(0, 0, 16384)  # factorized embedding width E (0 = off)
    tie_embeddings: bool = _f(True)  # logits through tok_emb, else a zero-init lm_head
    tied_embed_init_std: float = _f(0.005, 0.0, 10.0)  # tok_emb init std when tied
    loop_start: int = _f(0, 0, 256)  # depth recurrence: blocks [loop_start, loop_end) ...
    loop_end: int = _f(0, 0, 256)  # ... (end exclusive) ...
    loop_times: int = _f(1, 1, 64)  # ... run loop_times times in a row (1 = off)
    parallel_residual: bool = _f(False)  # attention and MLP read the same input
    rope_dims: int = _f(0, 0, 16384)  # rotate only the first rope_dims dims of each head (0 = all)
    rope_base: float = _f(10000.0, 2.0, 1e12)  # RoPE base
    seq_len: int = _f(1024, 1, 1 << 22)  # training context (YaRN's original length)
    rope_scaling: str = _f("none", "none", "ntk", "yarn")  # to evaluate beyond seq_len
    rope_factor: float = _f(1.0, 1.0, 1024.0)  # context extension factor for rope_scaling
    logit_softcap: float = _f(30.0, 1e-3, 1e6)  # logits = c·tanh(logits / c)
    qk_gain_init: float = _f(1.5, -1e3, 1e3)  # initial per-head gain on normalized queries
    ssm_layers: str = _f("", "layers")  # blocks whose mixer is the SSM, not attention: "1,3", "all"
    ssm_state: int = _f(64, 1, 1024)  # SSM state size N per head
    ssm_head_dim: int = _f(64, 1, 16384)  # SSM head width P (heads = inner width / P)
    ssm_expand: float = _f(1.0, 0.0, 8.0)  # SSM inner width = int(ssm_expand * model_dim)
    ssm_conv: int = _f(4, 1, 64)  # causal depthwise convolution width
    ssm_chunk: int = _f(64, 1, 4096)  # scan chunk length (matmuls within, a recurrence between)
    moe_experts: int = _f(0, 0, 256)  # experts per MLP (0 = a dense MLP); each hidden = mlp_mult * dim
    moe_top_k: int = _f(1, 1, 256)  # experts per token
    moe_capacity: float = _f(1.25, 0.0, 256.0)  # training slots per expert = capacity * tokens * k / E
    moe_aux_weight: float = _f(0.01, 0.0, 1e3)  # load-balancing loss weight
    exit_layers: str = _f("", "layers")  # virtual layers with an exit head after them: "2,5"
    exit_loss_weight: float = _f(0.3, 0.0, 1e3)  # training loss += weight * mean exit cross-entropy
    bos_id: int = _f(1, 0, 1 << 18)  # the token that starts every document (pgolf_train.shards.BOS_ID)
    xsa_layers: str = _f("", "layers")  # blocks with exclusive self-attention (SSM blocks: ignored)
    smear_gate: bool = _f(False)  # x_t += sigmoid(g) * x_{t-1} after the embedding, never into a BOS
    bigram_buckets: int = _f(0, 0, 1 << 22)  # hashed (previous, current) token embedding rows (0 = off)
    bigram_dim: int = _f(0, 0, 16384)  # its width (0 = model_dim; else projected up)
    attn_out_gate: bool = _f(False)  # each head's output × sigmoid(W_g x), input-dependent
    ln_scale: bool = _f(False)  # block input norms × 1/sqrt(virtual layer + 1)
    skip_gate: bool = _f(False)  # U-Net skips as lerp(x, w·skip, sigmoid(g)) per channel
    doc_attention: bool = _f(False)  # attend only within the own document (from its BOS on)

    def __post_init__(self) -> None:
        # A config from an artifact is untrusted: check it all before anything is allocated.
        for f in dataclasses.fields(self):
            v, kind, ok = getattr(self, f.name), type(f.default), f.metadata["allowed"]
            if not (type(v) is kind or kind is float and type(v) is int) or kind is float and not math.isfinite(v):
                raise ValueError(f"GPTConfig.{f.name} must be {kind.__name__}, got {v!r}")
            if kind is float:
                setattr(self, f.name, float(v))
            if ok == ("layers",):
                continue  # index lists: checked against the layer count below
            if not (v in ok if kind is str else kind is bool or ok[0] <= v <= ok[1]):
                raise ValueError(f"GPTConfig.{f.name}={v!r} is not in {ok}")
        self.layer_set("ssm_layers", self.num_layers)  # raises on a malformed or out-of-range list
        self.layer_set("xsa_layers", self.num_layers)
        d, h, kv, hd = self.model_dim, self.num_heads, self.num_kv_heads, self.model_dim // self.num_heads
        hidden, rd, di = int(self.mlp_mult * d), self.rope_dims or hd, int(self.ssm_expand * d)
        for ok, msg in [
            (d % h == 0, f"num_heads={h} must divide model_dim={d}"),
            (h % kv == 0, f"num_kv_heads={kv} must divide num_heads={h}"),
            (rd % 2 == 0 and 4 <= rd <= hd, f"rotary dims (rope_dims or head_dim) = {rd} must be even, in [4, {hd}]"),
            (hidden >= 1, f"mlp_mult={self.mlp_mult} gives an empty MLP"),
            (self.loop_start <= self.loop_end <= self.num_layers, "need loop_start <= loop_end <= num_layers"),
            (self.loop_times == 1 or self.loop_end > self.loop_start, "loop_times > 1 needs loop_end > loop_start"),
            (self.moe_top_k <= max(self.moe_experts, 1), f"moe_top_k={self.moe_top_k} exceeds moe_experts"),
            (self.bos_id < self.vocab_size, f"bos_id={self.bos_id} must be below vocab_size"),
            (not self.ssm_layers or di >= 1 and di % self.ssm_head_dim == 0,
             f"ssm_head_dim={self.ssm_head_dim} must divide the SSM inner width int(ssm_expand * model_dim)"),
        ]:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")
        ssm = d * (3 * di + 2 * self.ssm_state + di // self.ssm_head_dim) if self.ssm_layers else 0
        n = self.num_layers * (d * (2 * d + 2 * kv * hd + 2 * hidden * max(self.moe_experts, 1)) + ssm)
        n += 2 * self.vocab_size * (self.embed_dim or d) + self.bigram_buckets * (self.bigram_dim or d) + self.bigram_dim * d
        plan = len(self.layer_plan())
        self.layer_set("exit_layers", plan)
        if n + plan * d > 1 << 30:  # 4 GiB of fp32: far beyond a 16 MB artifact
            raise ValueError(f"GPTConfig describes ~{n:,} parameters (limit {1 << 30:,})")

    def layer_plan(self) -> list[int]:
        """Physical block run at each virtual layer: the loop span repeats in place."""
        s, e = self.loop_start, self.loop_end
        return [*range(s), *list(range(s, e)) * self.loop_times, *range(e, self.num_layers)]

    def layer_set(self, name: str, n: int) -> list[int]:
        """The sorted indices of the list field ``name`` ("" none, "all", or "i,j,..." each in [0, n))."""
        text = getattr(self, name).replace(" ", "")
        if text == "all":
            return list(range(n))
        parts = text.split(",") if text else []
        if not all(t.isascii() and t.isdigit() and len(t) <= 6 for t in parts):
            raise ValueError(f"GPTConfig.{name}={text!r} must be 'all' or comma-separated layer indices")
        idx = sorted({int(t) for t in parts})
        if idx and idx[-1] >= n:
            raise ValueError(f"GPTConfig.{name}: layer {idx[-1]} is out of range (have {n})")
        return idx

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """From untrusted data (an artifact's `model_config`); unknown keys are a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict, got {type(d).__name__}")
        unknown = sorted(map(str, set(d) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _weight(m: nn.Module) -> Tensor:
    """m.weight as the forward sees it: fake-quantized (straight-through gradient) during QAT."""
    if m.qat is None:
        return m.weight
    if fake_quant_ste is None:
        raise RuntimeError("QAT needs pgolf_codec.schemes.fake_quant_ste (not importable)")
    return fake_quant_ste(m.weight, m.qat)


class CastedLinear(nn.Linear):
    """Bias-free; fp32 master weights cast to the input dtype (bf16 matmuls)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat = None  # a pgolf_codec QuantSpec during QAT
        if zero_init:  # output projections: every block starts as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _weight(self).to(x.dtype))


class CastedEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.qat = None

    def forward(self, idx: Tensor) -> Tensor:
        x = F.embedding(idx, _weight(self))
        # Under autocast the residual stream runs in the autocast dtype (bf16), as the baseline's
        # bf16 embedding makes it: fp32 activations double the traffic of every norm and add.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos, sin: [T, d/2]. Rotates the first d dims (half-split pairs)."""
    h = cos.size(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :h], x[..., h : 2 * h], x[..., 2 * h :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def doc_mask(idx: Tensor, bos: int) -> Tensor:
    """Causal attention within documents (each starts at a BOS; tokens before the first one are a
    document too), as SDPA's bool mask [B, 1, T, T]. RoPE positions stay global: its scores depend
    on q - k only, as if restarted at every BOS. (FlexAttention's block mask, built inside the
    compiled model, put logits 0.12 off eager on the H200 with torch 2.11, so it is not used.)"""
    doc, T = (idx == bos).cumsum(1), idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return (doc[:, None, :, None] == doc[:, None, None, :]) & causal


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, xsa: bool = False):
        super().__init__()
        d, self.h, self.kv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.hd = d // self.h
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, self.kv * self.hd)
        self.c_v = CastedLinear(d, self.kv * self.hd)
        self.proj = CastedLinear(d, d, zero_init=True)
        # QK-norm fixes the logit scale; a learned per-head gain lets each head pick its sharpness.
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.xsa = xsa
        # Gated attention (Qiu et al. 2025), per head. Zero init: gate 0.5, its steepest point, free to
        # open or close; the halving only rescales a path that the zero-init proj starts at nothing.
        self.gate_w = nn.Parameter(torch.zeros(self.h, d)) if cfg.attn_out_gate else None
        self.fuse_qkv = False  # a trainer's fusion: q, k, v as one matmul (pgolf_train.fused)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, scale: float | None, mask=None) -> Tensor:
        """x: [B, T, C] -> [B, T, C]; mask: None (causal) or a :func:`doc_mask`."""
        B, T, C = x.shape
        lin = (self.c_q, self.c_k, self.c_v)
        if self.fuse_qkv and not any(m._forward_hooks for m in lin):  # hooks (TTT's LoRA) need each module's call
            kvd = self.kv * self.hd
            q, k, v = F.linear(x, torch.cat([_weight(m) for m in lin]).to(x.dtype)).split([C, kvd, kvd], -1)
        else:
            q, k, v = (m(x) for m in lin)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.kv, self.hd).transpose(1, 2)
        q = apply_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[:, None, None]
        k = apply_rope(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
        if self.xsa:  # exclusive: drop each head's component along its own token's value (query head -> kv head)
            yg, vn = y.reshape(B, self.kv, -1, T, self.hd), F.normalize(v, dim=-1)[:, :, None]
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(y.shape)
        if self.gate_w is not None:
            y = y * torch.sigmoid(F.linear(x, self.gate_w.to(x.dtype))).transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def _ssd_chunks(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """The selective scan h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t B_tᵀ, y_t = h_t C_t (h_0 = 0), by chunks.

    x: [b, T, H, P]; dt: [b, T, H] (> 0); A: [H] (< 0); B, C: [b, T, N]; returns [b, T, H, P] in
    float32 (float64 for float64 x).
    Within a chunk the recurrence unrolls into a masked, decay-weighted (C Bᵀ) matmul; between chunks
    only the [H, P, N] states pass on. Zero padding to whole chunks has dt = 0: no decay, no input."""
    b, T, H, P = x.shape
    pad = -T % chunk
    f = torch.promote_types(x.dtype, torch.float32)
    x, dt, B, C = (F.pad(t.to(f), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    A = A.to(f)
    n, N = (T + pad) // chunk, B.size(-1)
    x, dt = x.view(b, n, chunk, H, P), dt.view(b, n, chunk, H)
    B, C = B.view(b, n, chunk, N), C.view(b, n, chunk, N)
    a = (dt * A).cumsum(2)  # [b, n, Q, H]: log decay from the chunk's start through step t
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((a[:, :, :, None] - a[:, :, None]).masked_fill(~causal[:, :, None], -math.inf))
    xdt = x * dt[..., None]
    w = torch.einsum("bctn,bcsn->bcts", C, B)[..., None] * decay  # [b, n, t, s, H]
    y = torch.einsum("bctsh,bcshp->bcthp", w, xdt)
    # the state each chunk leaves, then the state entering each chunk (a decayed sum of earlier ones)
    S = torch.einsum("bcsh,bcshp,bcsn->bchpn", torch.exp(a[:, :, -1:] - a), xdt, B)
    g = a[:, :, -1].cumsum(1)  # [b, n, H]: log decay from the start through the end of chunk c
    before = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    # ... through the end of chunk c - 1, as g's shifted prefix (g - a[:, :, -1] would round in chunk c's later steps)
    g0 = F.pad(g[:, :-1], (0, 0, 1, 0))
    carry = torch.exp((g0[:, :, None] - g[:, None]).masked_fill(~before[:, :, None], -math.inf))
    R = torch.einsum("bcdh,bdhpn->bchpn", carry, S)
    y = y + torch.einsum("bctn,bchpn->bcthp", C, R) * torch.exp(a)[..., None]
    return y.reshape(b, n * chunk, H, P)[:, :T]


class SSM(nn.Module):
    """Selective state-space mixer (Mamba-2 style), a drop-in for attention: x and a gate z from the
    input; x, B, C through a causal depthwise convolution and silu; an input-dependent step
    dt = softplus(·); per head a scalar decay exp(dt·A); output rms_norm(y · silu(z)) projected back.
    Causal, any length; no positional encoding (the scan's order is the position)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, self.N, self.P, self.chunk = cfg.model_dim, cfg.ssm_state, cfg.ssm_head_dim, cfg.ssm_chunk
        self.di = int(cfg.ssm_expand * d)
        self.H = self.di // self.P
        self.in_proj = CastedLinear(d, 2 * self.di)  # x, z
        self.bc_proj = CastedLinear(d, 2 * self.N + self.H)  # B, C, dt
        k = cfg.ssm_conv
        self.conv = nn.Parameter(torch.empty(self.di + 2 * self.N, k).uniform_(-k ** -0.5, k ** -0.5))
        dt = torch.exp(torch.empty(self.H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(self.H).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.H))
        self.out_proj = CastedLinear(self.di, d, zero_init=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, scale: float | None, mask=None) -> Tensor:
        """x: [B, T, C] -> [B, T, C] (cos, sin, scale, mask: unused, attention's signature; the
        state crosses BOS even under doc_attention)."""
        b, T, _ = x.shape
        u, z = self.in_proj(x).split(self.di, dim=-1)
        bc, dt = self.bc_proj(x).split([2 * self.N, self.H], dim=-1)
        xbc = torch.cat((u, bc), dim=-1)
        k = self.conv.size(1)
        padded, w = F.pad(xbc, (0, 0, k - 1, 0)), self.conv.to(xbc.dtype)
        xbc = F.silu(sum(padded[:, i:i + T] * w[:, i] for i in range(k)))
        u, Bm, Cm = xbc.split([self.di, self.N, self.N], dim=-1)
        u = u.reshape(b, T, self.H, self.P)
        with torch.autocast(x.device.type, enabled=False):  # decays and state sums in float32
            dt = F.softplus(dt.float() + self.dt_bias)
            y = _ssd_chunks(u, dt, -torch.exp(self.A_log.float()), Bm, Cm, self.chunk)
        y = (y + u.float() * self.D[:, None]).to(x.dtype).reshape(b, T, self.di)
        return self.out_proj(rms_norm(y * F.silu(z)))


def _activation(x: Tensor, leaky: bool) -> Tensor:
    return (F.leaky_relu(x, 0.5) if leaky else torch.relu(x)).square()  # leaky: negatives keep a gradient


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: Tensor, aux: list | None = None) -> Tensor:
        return self.proj(_activation(self.fc(x), self.leaky))


class MoE(nn.Module):
    """Routed experts (each an MLP): a token's output is the gate-weighted sum of its top-k experts.

    Gates: top-1 scales by the router probability (Switch), top-k>1 renormalizes over the k.
    Tokens are packed per expert into fixed slots (static shapes for torch.compile) in token order,
    a token's k choices together (so a later token never takes an earlier one's slot: causal); in
    training an expert holds capacity·tokens·k/E of them and a token past that skips the expert (the
    residual carries it). Evaluation gives every expert a slot for every token: nothing is dropped,
    and a token's output depends on that token alone. The Switch load-balancing loss E·Σ_e f_e·p_e
    (f: share of first choices, p: mean router probability) goes to ``aux``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.moe_experts))
        self.router = nn.Parameter(torch.randn(cfg.moe_experts, cfg.model_dim) * 0.02)
        self.k, self.capacity, self.leaky = cfg.moe_top_k, cfg.moe_capacity, cfg.activation == "leaky_relu2"

    def forward(self, x: Tensor, aux: list | None = None) -> Tensor:
        shape, E, k = x.shape, len(self.experts), self.k
        flat = x.reshape(-1, shape[-1])
        n = flat.size(0)
        probs = F.linear(flat.float(), self.router.float()).softmax(-1)  # [n, E]
        gate, choice = probs.topk(k, dim=-1)  # [n, k]
        if k > 1:  # top-1 keeps the router probability as its gate: the router's only task gradient
            gate = gate / gate.sum(-1, keepdim=True)
        cap = max(1, min(n, math.ceil(self.capacity * n * k / E))) if self.training else n
        onehot = F.one_hot(choice, E)  # [n, k, E]
        pos = (onehot.reshape(n * k, E).cumsum(0) - 1).view(n, k, E)
        pos = (pos * onehot).sum(-1)  # [n, k]: the token's place in its expert's queue
        slot = torch.where(pos < cap, choice * cap + pos, E * cap).flatten()  # E*cap: overflow, discarded
        buf = flat.new_zeros(E * cap + 1, shape[-1]).index_add(0, slot, flat.repeat_interleave(k, 0))
        w1 = torch.stack([_weight(e.fc) for e in self.experts]).to(x.dtype)  # [E, hidden, dim]
        w2 = torch.stack([_weight(e.proj) for e in self.experts]).to(x.dtype)  # [E, dim, hidden]
        h = _activation(torch.bmm(buf[:-1].view(E, cap, -1), w1.mT), self.leaky)
        out = torch.cat((torch.bmm(h, w2.mT).flatten(0, 1), buf.new_zeros(1, shape[-1])))
        y = (out[slot].view(n, k, -1) * gate[..., None].to(out.dtype)).sum(1)
        if aux is not None and self.training:
            aux.append(E * (onehot[:, 0].float().mean(0) * probs.mean(0)).sum())
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, ssm: bool = False, xsa: bool = False):
        super().__init__()
        d = cfg.model_dim
        if ssm:
            self.ssm = SSM(cfg)
        else:
            self.attn = CausalSelfAttention(cfg, xsa)
        self.mlp = MoE(cfg) if cfg.moe_experts else MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        # Per-channel mix of the residual x and the normed embedding x0: rows [x weight, x0 weight].
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.parallel = cfg.parallel_residual

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, scale: float | None,
                aux: list | None = None, mask=None, ln: float = 1.0) -> Tensor:
        """ln: the factor on both normed inputs (the mixer's and the MLP's), ln_scale's 1/sqrt(layer + 1)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        norm = (lambda t: rms_norm(t) * ln) if ln != 1.0 else rms_norm
        n = norm(x)
        mixer = self.attn if hasattr(self, "attn") else self.ssm
        out = x + self.attn_scale.to(x.dtype) * mixer(n, cos, sin, scale, mask)
        if not self.parallel:
            n = norm(out)
        return out + self.mlp_scale.to(x.dtype) * self.mlp(n, aux)


class GPT(nn.Module):
    """Virtual layers follow `cfg.layer_plan()`: a looped block shares all its parameters (scales
    and mixes too) across passes; the U-Net skip weights are per virtual layer.

    Early exit: an exit head after virtual layer i (``exit_layers``) is the output head applied to
    that layer's state (own RMS gain), trained jointly. With ``exit_threshold`` set, evaluation
    scores each token with the first exit whose top probability reaches it, else the last layer:
    every distribution a full softmax, each decided from the token's own prefix. An exited token's
    state stays frozen for the layers above (their keys and values read it), as a depth-skipping
    decoder would compute; ``exit_counts`` tallies the tokens per exit and at the end."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim or cfg.model_dim
        self.tok_emb = CastedEmbedding(cfg.vocab_size, e)
        # Factorized: tok_emb V×E, embed_proj lifts E -> model_dim; the output returns through its
        # transpose to E, then to the vocab via tok_emb (tied) or lm_head (V×E).
        self.embed_proj = CastedLinear(e, cfg.model_dim) if cfg.embed_dim else None
        ssm, xsa = (set(cfg.layer_set(k, cfg.num_layers)) for k in ("ssm_layers", "xsa_layers"))
        self.blocks = nn.ModuleList(Block(cfg, i in ssm, i in xsa) for i in range(cfg.num_layers))
        self.layer_plan = cfg.layer_plan()
        self.exits = cfg.layer_set("exit_layers", len(self.layer_plan))
        self.exit_scales = nn.Parameter(torch.ones(len(self.exits), cfg.model_dim)) if self.exits else None
        self.exit_threshold: float | None = None
        self.head_loss = None  # (features, head weight, targets, softcap) -> mean CE in training: a trainer's fused kernel
        self.rope_cache: dict | None = None  # (T, device) -> rope(T, device), filled eagerly by a trainer
        self.doc_segments = None  # (idx, bos) -> the mask doc_attention hands attention: a trainer's (pgolf_train.doc_attn)
        self.exit_counts = torch.zeros(len(self.exits) + 1, dtype=torch.long)
        self.num_encoder = len(self.layer_plan) // 2
        n_skip = min(self.num_encoder, len(self.layer_plan) - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(n_skip, cfg.model_dim))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(e, cfg.vocab_size, zero_init=True)
        if cfg.tie_embeddings:  # small: tied output logits start near uniform
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        # The techniques' parameters come last: switching one on leaves every other init as it was.
        # Gate 0 (an even mix): with the blocks the identity at init the logits equal the additive skip's.
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, cfg.model_dim)) if cfg.skip_gate else None
        # Gate logit -3 (sigmoid 0.047): starts near the plain embedding, yet the gate has a gradient.
        self.smear_gate = nn.Parameter(torch.full((cfg.model_dim,), -3.0)) if cfg.smear_gate else None
        # BigramHash: a row per hashed (previous, current) pair, added to the token embedding. Zero
        # rows start the model as without it; the projection (random init) gives them a gradient.
        b = cfg.bigram_dim or cfg.model_dim
        self.bigram = CastedEmbedding(cfg.bigram_buckets, b) if cfg.bigram_buckets else None
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.weight)
        self.bigram_proj = CastedLinear(b, cfg.model_dim) if self.bigram is not None and b != cfg.model_dim else None
        # Its term × a learned gain from 0.05 (Adam at scalar_lr), as in the field's records: Adam moves
        # a row ~lr from step 1 however rare its pair, and at gain 1 the hashed term matched tok_emb
        # before the norm and cost bpb (benchmarks/results/bigram_cpu.json). No zero-init projection:
        # with the rows zero too, neither would get a gradient.
        self.bigram_scale = nn.Parameter(torch.tensor(0.05)) if self.bigram is not None else None
        self.set_rope_scaling(cfg.rope_scaling, cfg.rope_factor)

    def set_rope_scaling(self, kind: str, factor: float) -> None:
        """For contexts beyond seq_len. ntk: base × factor^(d/(d-2)); yarn: interpolate the slow
        frequencies (ramp over 1..32 turns within seq_len), attention logits × (0.1·ln(factor)+1)²."""
        self.cfg = dataclasses.replace(self.cfg, rope_scaling=kind, rope_factor=factor)  # validates
        if getattr(self, "rope_cache", None):
            self.rope_cache = {}  # tables of the old scaling
        t = 0.1 * math.log(factor) + 1 if kind == "yarn" else 1.0
        self.softmax_scale = None if t == 1.0 else t * t / math.sqrt(self.cfg.model_dim // self.cfg.num_heads)

    def rope(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin: [T, d/2] float32, from constants (no buffer a bf16 cast could spoil), or from
        ``rope_cache`` (a trainer's: tables made once, read by the compiled graph, not recomputed)."""
        if self.rope_cache is not None and (T, device) in self.rope_cache:
            return self.rope_cache[(T, device)]
        c = self.cfg
        d = c.rope_dims or c.model_dim // c.num_heads
        base = c.rope_base * c.rope_factor ** (d / (d - 2)) if c.rope_scaling == "ntk" else c.rope_base
        inv_freq = base ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        if c.rope_scaling == "yarn":
            turns = c.seq_len * inv_freq / (2 * math.pi)  # within the training context
            keep = ((turns - 1) / 31).clamp(0, 1)  # 1: fast dims stay, 0: slow dims interpolate
            inv_freq = inv_freq * (keep + (1 - keep) / c.rope_factor)
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos(), freqs.sin()

    def _features(self, x: Tensor) -> Tensor:
        """Final-norm state [B, T, C] -> the head's input [B, T, E] (E = C unless factorized)."""
        return x if self.embed_proj is None else F.linear(x, _weight(self.embed_proj).to(x.dtype).t())

    def _head_weight(self) -> Tensor:
        return _weight(self.tok_emb if self.lm_head is None else self.lm_head)

    def _head(self, x: Tensor) -> Tensor:
        """Final-norm state [B, T, C] -> soft-capped float32 logits [B, T, vocab_size]."""
        x = self._features(x)
        logits = F.linear(x, self._head_weight().to(x.dtype)).float()
        return self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)

    def bigram_hash(self, idx: Tensor) -> Tensor:
        """Bucket of each (previous, current) pair: (prev·1000003 + cur) mod bigram_buckets, with
        prev = bos_id at position 0 and at every BOS: a document's first pair is (BOS, BOS) wherever it lies."""
        bos = self.cfg.bos_id
        prev = F.pad(idx[:, :-1], (1, 0), value=bos).masked_fill(idx == bos, bos)
        return (prev * 1000003 + idx) % self.cfg.bigram_buckets

    def _run(self, idx: Tensor, aux: list | None = None, head: bool = True) -> tuple[Tensor, list[Tensor]]:
        """Logits (the exit rule applied when ``exit_threshold`` is set outside training; the final
        normed state instead with ``head=False``) and, in training, every exit head's logits; MoE
        balancing losses append to ``aux``."""
        c = self.cfg
        x = self.tok_emb(idx)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        if self.bigram is not None:
            h = self.bigram(self.bigram_hash(idx))
            x = x + self.bigram_scale.to(x.dtype) * (h if self.bigram_proj is None else self.bigram_proj(h))
        x = x0 = rms_norm(x)
        if self.smear_gate is not None:  # position 0 and every BOS take nothing from their predecessor
            prev = F.pad(x[:, :-1], (0, 0, 1, 0)).masked_fill((idx == c.bos_id)[..., None], 0)
            x = x0 = x + torch.sigmoid(self.smear_gate).to(x.dtype) * prev
        mask = (self.doc_segments or doc_mask)(idx, c.bos_id) if c.doc_attention else None
        cos, sin = self.rope(idx.size(1), idx.device)
        skips: list[Tensor] = []
        exits: list[Tensor] = []
        tau = None if self.training else self.exit_threshold
        done = chosen = None
        for i, b in enumerate(self.layer_plan):
            before = x
            if i >= self.num_encoder and skips:  # decoder consumes encoder outputs, last first
                j = i - self.num_encoder
                s = self.skip_weights[j].to(x.dtype) * skips.pop()
                x = x + s if self.skip_gates is None else torch.lerp(x, s, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            ln = 1 / math.sqrt(i + 1) if c.ln_scale else 1.0
            x = self.blocks[b](x, x0, cos, sin, self.softmax_scale, aux, mask, ln)
            if done is not None:
                x = torch.where(done[..., None], before, x)
            if i < self.num_encoder:
                skips.append(x)
            if i in self.exits and (self.training or tau is not None):
                e = self.exits.index(i)
                logits = self._head(rms_norm(x) * self.exit_scales[e].to(x.dtype))
                if tau is None:
                    exits.append(logits)
                elif done is None:
                    done, chosen = logits.softmax(-1).amax(-1) >= tau, logits
                    self.exit_counts[e] += int(done.sum())
                else:
                    confident = (logits.softmax(-1).amax(-1) >= tau) & ~done
                    done, chosen = done | confident, torch.where(confident[..., None], logits, chosen)
                    self.exit_counts[e] += int(confident.sum())
        logits = self._head(rms_norm(x)) if head else rms_norm(x)
        if done is not None:
            self.exit_counts[-1] += int((~done).sum())
            logits = torch.where(done[..., None], chosen, logits)
        return logits, exits

    def logits(self, idx: Tensor) -> Tensor:
        """idx: long[B, T] -> soft-capped float32 logits [B, T, vocab_size]."""
        return self._run(idx)[0]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """idx, targets: long[B, T] -> logits [B, T, V] if targets is None, else the mean CE (in
        training plus the exit heads' and the MoE balancing losses, weighted)."""
        if targets is None:
            return self.logits(idx)
        aux: list[Tensor] = []
        fused = self.head_loss is not None and self.training  # the trainer's fused head + loss (pgolf_train.fused)
        logits, exits = self._run(idx, aux, head=not fused)
        ce = [F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").mean() for z in (logits, *exits)[fused:]]
        if fused:
            ce.insert(0, self.head_loss(self._features(logits), self._head_weight(), targets, self.cfg.logit_softcap))
        loss = ce[0]
        if exits:
            loss = loss + self.cfg.exit_loss_weight * sum(ce[1:]) / len(exits)
        if aux:
            loss = loss + self.cfg.moe_aux_weight * sum(aux) / len(aux)
        return loss

    def token_losses(self, idx: Tensor, targets: Tensor) -> Tensor:
        """idx, targets: long[B, T] -> float32[B, T] per-token cross-entropy in nats."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
