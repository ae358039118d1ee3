"""GPT for parameter golf: the challenge baseline (U-Net skips, GQA, QK-norm, relu², tied embeddings,
softcap) plus switches. Self-contained (torch only): this file ships inside the artifact."""
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

    def __post_init__(self) -> None:
        # A config from an artifact is untrusted: check it all before anything is allocated.
        for f in dataclasses.fields(self):
            v, kind, ok = getattr(self, f.name), type(f.default), f.metadata["allowed"]
            if not (type(v) is kind or kind is float and type(v) is int) or kind is float and not math.isfinite(v):
                raise ValueError(f"GPTConfig.{f.name} must be {kind.__name__}, got {v!r}")
            if kind is float:
                setattr(self, f.name, float(v))
            if not (v in ok if kind is str else kind is bool or ok[0] <= v <= ok[1]):
                raise ValueError(f"GPTConfig.{f.name}={v!r} is not in {ok}")
        d, h, kv, hd = self.model_dim, self.num_heads, self.num_kv_heads, self.model_dim // self.num_heads
        hidden, rd = int(self.mlp_mult * d), self.rope_dims or hd
        for ok, msg in [
            (d % h == 0, f"num_heads={h} must divide model_dim={d}"),
            (h % kv == 0, f"num_kv_heads={kv} must divide num_heads={h}"),
            (rd % 2 == 0 and 4 <= rd <= hd, f"rotary dims (rope_dims or head_dim) = {rd} must be even, in [4, {hd}]"),
            (hidden >= 1, f"mlp_mult={self.mlp_mult} gives an empty MLP"),
            (self.loop_start <= self.loop_end <= self.num_layers, "need loop_start <= loop_end <= num_layers"),
            (self.loop_times == 1 or self.loop_end > self.loop_start, "loop_times > 1 needs loop_end > loop_start"),
        ]:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")
        n = self.num_layers * d * (2 * d + 2 * kv * hd + 2 * hidden) + 2 * self.vocab_size * (self.embed_dim or d)
        if n + len(self.layer_plan()) * d > 1 << 30:  # 4 GiB of fp32: far beyond a 16 MB artifact
            raise ValueError(f"GPTConfig describes ~{n:,} parameters (limit {1 << 30:,})")

    def layer_plan(self) -> list[int]:
        """Physical block run at each virtual layer: the loop span repeats in place."""
        s, e = self.loop_start, self.loop_end
        return [*range(s), *list(range(s, e)) * self.loop_times, *range(e, self.num_layers)]

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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, self.h, self.kv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.hd = d // self.h
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, self.kv * self.hd)
        self.c_v = CastedLinear(d, self.kv * self.hd)
        self.proj = CastedLinear(d, d, zero_init=True)
        # QK-norm fixes the logit scale; a learned per-head gain lets each head pick its sharpness.
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, scale: float | None) -> Tensor:
        """x: [B, T, C] -> [B, T, C]."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        q = apply_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[:, None, None]
        k = apply_rope(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc(x)  # leaky: negative pre-activations keep a gradient
        return self.proj((F.leaky_relu(x, 0.5) if self.leaky else torch.relu(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        # Per-channel mix of the residual x and the normed embedding x0: rows [x weight, x0 weight].
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.parallel = cfg.parallel_residual

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, scale: float | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        n = rms_norm(x)
        out = x + self.attn_scale.to(x.dtype) * self.attn(n, cos, sin, scale)
        if not self.parallel:
            n = rms_norm(out)
        return out + self.mlp_scale.to(x.dtype) * self.mlp(n)


class GPT(nn.Module):
    """Virtual layers follow `cfg.layer_plan()`: a looped block shares all its parameters (scales
    and mixes too) across passes; the U-Net skip weights are per virtual layer."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim or cfg.model_dim
        self.tok_emb = CastedEmbedding(cfg.vocab_size, e)
        # Factorized: tok_emb V×E, embed_proj lifts E -> model_dim; the output returns through its
        # transpose to E, then to the vocab via tok_emb (tied) or lm_head (V×E).
        self.embed_proj = CastedLinear(e, cfg.model_dim) if cfg.embed_dim else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.layer_plan = cfg.layer_plan()
        self.num_encoder = len(self.layer_plan) // 2
        n_skip = min(self.num_encoder, len(self.layer_plan) - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(n_skip, cfg.model_dim))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(e, cfg.vocab_size, zero_init=True)
        if cfg.tie_embeddings:  # small: tied output logits start near uniform
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.set_rope_scaling(cfg.rope_scaling, cfg.rope_factor)

    def set_rope_scaling(self, kind: str, factor: float) -> None:
        """For contexts beyond seq_len. ntk: base × factor^(d/(d-2)); yarn: interpolate the slow
        frequencies (ramp over 1..32 turns within seq_len), attention logits × (0.1·ln(factor)+1)²."""
        self.cfg = dataclasses.replace(self.cfg, rope_scaling=kind, rope_factor=factor)  # validates
        t = 0.1 * math.log(factor) + 1 if kind == "yarn" else 1.0
        self.softmax_scale = None if t == 1.0 else t * t / math.sqrt(self.cfg.model_dim // self.cfg.num_heads)

    def rope(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin: [T, d/2] float32, from constants (no buffer a bf16 cast could spoil)."""
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

    def logits(self, idx: Tensor) -> Tensor:
        """idx: long[B, T] -> soft-capped float32 logits [B, T, vocab_size]."""
        x = self.tok_emb(idx)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = x0 = rms_norm(x)
        cos, sin = self.rope(idx.size(1), idx.device)
        skips: list[Tensor] = []
        for i, b in enumerate(self.layer_plan):
            if i >= self.num_encoder and skips:  # decoder consumes encoder outputs, last first
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x = self.blocks[b](x, x0, cos, sin, self.softmax_scale)
            if i < self.num_encoder:
                skips.append(x)
        x = rms_norm(x)
        if self.embed_proj is not None:
            x = F.linear(x, _weight(self.embed_proj).to(x.dtype).t())
        head = self.tok_emb if self.lm_head is None else self.lm_head
        logits = F.linear(x, _weight(head).to(x.dtype)).float()
        return self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """idx, targets: long[B, T] -> logits [B, T, V] if targets is None, else the mean CE."""
        return self.logits(idx) if targets is None else self.token_losses(idx, targets).mean()

    def token_losses(self, idx: Tensor, targets: Tensor) -> Tensor:
        """idx, targets: long[B, T] -> float32[B, T] per-token cross-entropy in nats."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
