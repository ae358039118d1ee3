"""Training configuration: one flat ``TrainConfig`` dataclass, loaded from small TOML files.

``TrainConfig`` holds every ``GPTConfig`` field (taken from ``pgolf_train.model`` so the model's
defaults live in one place) plus the trainer's own fields below, each with a default and a
comment. Named configs resolve to ``pgolf_train/configs/NAME.toml``; a TOML file only lists what
differs from the defaults. ``key=value`` overrides are applied last; unknown keys, wrong types and
out-of-range values are a :class:`ConfigError` naming the key.

Units: times in seconds, token counts in tokens (global across all ranks unless the comment says
per rank), fractions of the wall-clock budget in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf_train.model import GPTConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The challenge baseline's export: int8 per-row with a 99.99984th-percentile clip and fp16
# scales for the matrices (every ``.weight`` of the baseline has > 65,536 elements); the small
# control tensors (scales, mixes, gains, skip weights: all <= 65,536 elements) kept as fp32 as the
# baseline keeps them.
BASELINE_RECIPE = "*.weight=int8:percentile=99.99984;*=fp32"


# The trainer's fused kernels (pgolf_train/fused.py) and the attention backends it can pin.
FUSIONS = ("ce", "rope", "qkv", "qk", "xsa", "mlp", "fa4", "varlen", "epilogue", "tune")
SDPA_BACKENDS = ("", "flash", "cudnn", "efficient", "math")  # "" = torch's choice


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and the rule."""


@dataclass
class TrainFields:
    """The trainer's own fields (the model's come from ``GPTConfig``)."""

    # --- data -----------------------------------------------------------------------------
    train_seq_len: int = 1024  # tokens per training sequence
    train_batch_tokens: int = 524_288  # global tokens per optimizer step (all ranks, all micro-steps)
    grad_accum: int = 0  # micro-steps per rank per step; 0 = 8 // world_size (the baseline's rule)
    seed: int = 1337  # torch seed for the weight init

    # --- length ----------------------------------------------------------------------------
    max_wallclock_seconds: float = 600.0  # training budget in seconds (val/checkpoints excluded); 0 = no cap
    iterations: int = 20_000  # hard cap on optimizer steps (the schedule uses it when there is no time cap)
    compile_warmup_steps: int = 20  # steps run before the clock starts, then weights/optimizer/data are restored

    # --- schedule (all driven by elapsed training time when a time cap is set) --------------
    lr_warmup_steps: int = 0  # linear LR warm-up from 0 over this many steps
    warmdown_iters: int = 1200  # warm-down length in steps, converted to wall-clock via the average step time
    warmdown_frac: float = 0.0  # if > 0: warm-down over this final fraction of the budget (replaces warmdown_iters)
    schedule: str = "linear"  # warm-down shape: "linear" or "cosine"
    min_lr_frac: float = 0.0  # LR floor, as a fraction of the base LR, at the end of the warm-down

    # --- optimizers --------------------------------------------------------------------------
    embed_lr: float = 0.6  # Adam LR of the untied token embedding
    tied_embed_lr: float = 0.05  # Adam LR of the embedding when it is tied to the head
    head_lr: float = 0.008  # Adam LR of the untied lm_head
    matrix_lr: float = 0.04  # Muon LR of the 2-D block matrices
    scalar_lr: float = 0.04  # Adam LR of vectors, scalars and control tensors
    muon_momentum: float = 0.95  # Muon momentum after its warm-up
    muon_momentum_warmup_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 500  # steps of linear momentum warm-up
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_ns_coeffs: str = "quintic"  # Newton-Schulz coefficients: "quintic" (one fixed quintic) or "polar_express" (per-iteration minimax, Amsel et al. 2025)
    muon_weight_decay: float = 0.0  # decoupled weight decay of the Muon matrices (p <- p * (1 - lr * wd), lr the scheduled one)
    muon_wd_schedule: str = "constant"  # wd over the run: "constant", "lr" (wd * the LR multiplier: decay ~ mult^2) or "linear_to_zero" (wd * (1 - budget fraction))
    embed_weight_decay: float = 0.0  # decoupled weight decay of the embedding group (tok_emb, a bigram table) under Adam, p <- p * (1 - lr * wd) (AdamW), tapered by muon_wd_schedule as Muon's
    muon_row_normalize: bool = False  # normalize each row of the orthogonalized update to unit RMS
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    grad_clip_norm: float = 0.0  # global grad-norm clip; 0 = off

    # --- execution -------------------------------------------------------------------------
    compile: bool = True  # torch.compile the model (fullgraph, static shapes)
    bf16: bool = True  # bf16 autocast for the forward pass (only on CUDA)
    device: str = "auto"  # "auto" (cuda if available), "cuda" or "cpu"
    fused: str = ""  # the trainer's fused kernels, comma-separated (pgolf_train/fused.py): "ce" (head + softcap + CE in row chunks), "rope" (tables made once), "qkv" (one matmul for q, k, v), "qk" (QK-norm + rotary + gain, one kernel), "xsa" (exclusive attention, one kernel), "mlp" (the activation in the GEMM epilogues: quack, CUDA), "fa4" (causal attention by FlashAttention 4, CUDA), "varlen" (doc_attention as flash varlen over the packed documents), "epilogue" (max-autotune GEMMs), "tune" (coordinate-descent block sizes)
    sdpa_backend: str = ""  # attention kernel in training: "" (torch's choice), "flash", "cudnn", "efficient" or "math"

    # --- logging, validation, checkpoints ---------------------------------------------------
    train_log_every: int = 200  # print/log a progress line every N steps (and the first 10)
    val_loss_every: int = 0  # validate every N steps; 0 = only at the end
    val_batch_tokens: int = 524_288  # global tokens per validation batch
    val_max_tokens: int = 0  # cap on validation tokens (tests and demos); 0 = the full val split
    checkpoint_every_s: float = 0.0  # write checkpoint.pt every N seconds of training; 0 = only at the end
    checkpoint_every_steps: int = 0  # also every N steps (deterministic; used by tests); 0 = off

    # --- EMA ---------------------------------------------------------------------------------
    ema_decay: float = 0.0  # EMA decay of the weights; 0 = off. When on, the EMA is exported and evaluated
    ema_start: float = 0.0  # fraction of the budget after which the EMA starts (from the then-current weights)

    # --- QAT -----------------------------------------------------------------------------------
    qat_start: float = 1.0  # fraction of the budget at which fake-quant turns on; 0 = from the start, >= 1 = never

    # --- export --------------------------------------------------------------------------------
    recipe: str = BASELINE_RECIPE  # codec recipe (inline "glob=spec;..." or a .toml/.json path)
    coder: str = "zlib"  # entropy coder of the artifact ("auto", "zstd", "zlib", "lzma", "rans", "raw")
    max_artifact_bytes: int = 16_000_000  # the challenge limit; exceeding it is reported, not fatal
    max_bytes_count: str = "artifact"  # what max_artifact_bytes bounds: "artifact", or "challenge" (+ train_gpt.py; `pgolf run` checks it)
    quantize_budget: int = 0  # `pgolf run`: > 0 = GPTQ + the bit allocator then fill this many bytes (model + code),
    #                           and that artifact (RUNDIR/model_alloc.pgolf) is the scored one; 0 = the recipe's
    quantize_tolerance: float = 0.02  # largest bpb the allocator's artifact may lose to the trained weights

    # --- evaluation of the artifact (`pgolf run`) ------------------------------------------------
    val_docs: int = 50_000  # `pgolf run --docs`: the first N documents are validation (the challenge: 50,000)
    eval_seq_len: int = 0  # evaluation window in tokens; 0 = train_seq_len
    eval_stride: int = 0  # sliding-window stride in tokens; 0 = non-overlapping windows only
    eval_ttt: str = ""  # test-time training while scoring: "" (off), "lora" or "full"
    # TTT defaults are pgolf_eval.ttt.TTTConfig's (tests/cli/test_run.py holds them equal)
    eval_ttt_rank: int = 16  # LoRA rank of the TTT adapters
    eval_ttt_lr: float = 0.0  # TTT Adam learning rate; 0 = the evaluator's default (3e-3 LoRA, 1e-5 full)
    eval_ttt_epochs: int = 1  # TTT gradient steps per chunk
    eval_ttt_chunk: int = 64  # TTT chunk in tokens, scored then trained on (its stride); at most the eval window
    eval_ttt_targets: str = "attn,mlp"  # LoRA targets, comma-separated: q,k,v,o,up,down,mlp,attn or module globs
    eval_ttt_from_start: bool = True  # TTT chunks documents from their first token (else after their first window)
    eval_ttt_scope: str = ""  # "doc" (adapters per document), "phased" (one carried adapter), "both"; "" = the evaluator's (both for LoRA)
    eval_ttt_phase_tokens: int = 8192  # phased TTT: targets of finished documents per carried-adapter update
    eval_ttt_phase_epochs: int = 1  # phased TTT: passes of the carried adapter over each scored phase
    eval_ttt_phase_lr: float = 0.0  # phased TTT: Adam lr of the carried adapter; 0 = the per-document lr
    eval_ttt_phase_batch: int = 16  # phased TTT: windows per step of the carried adapter
    eval_ttt_parallel_docs: int = 0  # phased TTT: documents in flight, stream order; 0 = from the stream's lengths
    eval_time_budget: float = 600.0  # seconds each evaluation mode may take (the challenge allows 600)

    # --- distillation (pgolf_train/distill.py): teacher(s) first, then this model on their soft targets -----
    distill_teacher_frac: float = 0.0  # share of the budget (clock, or iterations without one) for teachers; 0 = off
    distill_generations: int = 1  # teachers trained in turn within that share, each distilled from the one before
    teacher_overrides: str = ""  # "key=value;..." turning this config into the teacher's; "" = same model (born-again)
    distill_alpha: float = 0.5  # weight of the hard-label CE at the student's start; 1 - alpha weighs T²·KL
    distill_alpha_end: float = 1.0  # the weight at the student's end, for the linear/cosine schedules
    distill_alpha_schedule: str = "constant"  # alpha over the student's budget: "constant", "linear" or "cosine"
    distill_temperature: float = 1.0  # softmax temperature T of both distributions in the KL term


def _gpt_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(GPTConfig)
    own = {f.name for f in dataclasses.fields(TrainFields)}
    out = []
    for f in dataclasses.fields(GPTConfig):
        if f.name in own:  # the trainer field wins; model_config() passes it on
            continue
        if f.default is not dataclasses.MISSING:
            dflt = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            dflt = field(default_factory=f.default_factory)
        else:
            raise TypeError(f"GPTConfig.{f.name} needs a default to be part of TrainConfig")
        out.append((f.name, hints[f.name], dflt))
    return out


def _model_config(self) -> GPTConfig:
    """The ``GPTConfig`` of this run (the model fields of this flat config)."""
    return GPTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)})


def _to_dict(self) -> dict[str, Any]:
    """Plain-JSON dict of every field (for logs, summaries and artifact provenance)."""
    return dataclasses.asdict(self)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    _gpt_fields(),
    bases=(TrainFields,),
    namespace={"model_config": _model_config, "to_dict": _to_dict,
               "__doc__": "Flat run configuration: every GPTConfig field plus the trainer's fields."},
)
TrainConfig.__module__ = __name__


def field_types() -> dict[str, Any]:
    """Name → resolved type of every TrainConfig field."""
    hints = typing.get_type_hints(TrainFields)
    hints.update(typing.get_type_hints(GPTConfig))
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: unsupported value {value!r} for type {tp}")


def _parse_override_value(text: str) -> Any:
    """An override's value: a TOML literal when it parses as one (1, 0.5, true, [1, 2]), else a string."""
    import tomllib  # here, not at import: a bundle on Python 3.10 reads no TOML

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_config_path(name_or_path: str) -> Path:
    """``NAME`` → ``pgolf_train/configs/NAME.toml``; anything with a suffix or separator is a path."""
    p = Path(name_or_path)
    if p.suffix or len(p.parts) > 1:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"unknown config {name_or_path!r}; known: {', '.join(known)} (or pass a .toml path)")
    return candidate


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
    """Load a named config or TOML file and apply ``key=value`` overrides; validated.

    Raises :class:`ConfigError` naming the offending key for unknown keys, wrong types and
    out-of-range values.
    """
    import tomllib

    path = resolve_config_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: [{key}] tables are not allowed; configs are flat key = value lists")
        values[key] = value
    values.update(parse_overrides(overrides))
    return make_config(values, source=str(path))


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["key=value", ...]`` → ``{key: value}`` (values as TOML literals when they parse as one)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        values[key] = _parse_override_value(text.strip())
    return values


def make_config(values: dict[str, Any] | None = None, *, source: str = "overrides") -> "TrainConfig":
    """Build a validated TrainConfig from a dict of field values (defaults for the rest)."""
    types = field_types()
    values = dict(values or {})
    unknown = sorted(set(values) - set(types))
    if unknown:
        import difflib
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, types, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown config key(s): {', '.join(hints)}")
    coerced = {k: _coerce(k, v, types[k]) for k, v in values.items()}
    # The model's seq_len (its RoPE reference length) follows the training length unless set.
    if "seq_len" in types and "seq_len" not in coerced and "train_seq_len" in coerced:
        coerced["seq_len"] = coerced["train_seq_len"]
    cfg = TrainConfig(**coerced)
    validate(cfg)
    return cfg


def load_recipe(spec: str):
    """The export recipe: a .toml/.json file path or the inline ``glob=spec;...`` text, parsed by
    the codec; a :class:`ConfigError` naming ``recipe`` when it does not parse."""
    from pgolf_codec.schemes import Recipe

    if spec.endswith((".toml", ".json")):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            return Recipe.load(path)
        except (ValueError, OSError) as e:
            raise ConfigError(f"recipe = {spec!r}: {e}") from None
    try:
        return Recipe.parse(spec)
    except ValueError as e:
        raise ConfigError(f"recipe = {spec!r}: {e}") from None


def validate(cfg: "TrainConfig") -> None:
    """Range checks that need no knowledge of the world size (the trainer checks divisibility)."""
    def need(cond: bool, key: str, rule: str) -> None:
        if not cond:
            raise ConfigError(f"{key} = {getattr(cfg, key)!r}: {rule}")

    for k, v in dataclasses.asdict(cfg).items():  # inf and nan pass every range check below
        if isinstance(v, float):
            need(math.isfinite(v), k, "must be a finite number")
    need(cfg.train_seq_len >= 1, "train_seq_len", "must be >= 1")
    need(cfg.train_batch_tokens >= cfg.train_seq_len, "train_batch_tokens", "must be at least one sequence")
    need(cfg.grad_accum >= 0, "grad_accum", "must be >= 0 (0 = 8 // world_size)")
    need(0.0 <= cfg.warmdown_frac <= 1.0, "warmdown_frac", "must be in [0, 1]")
    need(cfg.schedule in ("linear", "cosine"), "schedule", "must be 'linear' or 'cosine'")
    need(0.0 <= cfg.min_lr_frac <= 1.0, "min_lr_frac", "must be in [0, 1]")
    for k in ("max_wallclock_seconds", "iterations", "compile_warmup_steps", "lr_warmup_steps", "warmdown_iters",
              "grad_clip_norm",
              "muon_weight_decay", "embed_weight_decay", "muon_momentum_warmup_steps", "checkpoint_every_s", "checkpoint_every_steps",
              "max_artifact_bytes", "quantize_tolerance"):
        need(getattr(cfg, k) >= 0, k, "must be >= 0")
    for k in ("embed_lr", "tied_embed_lr", "head_lr", "matrix_lr", "scalar_lr"):
        need(0.0 <= getattr(cfg, k) <= 10.0, k, "must be in [0, 10]")
    need(0.0 < cfg.adam_eps <= 1.0, "adam_eps", "must be in (0, 1] (0 divides by zero on a parameter without gradient)")
    for k in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2"):
        need(0.0 <= getattr(cfg, k) < 1.0, k, "must be in [0, 1)")
    need(cfg.muon_backend_steps >= 1, "muon_backend_steps", "must be >= 1")
    need(cfg.muon_ns_coeffs in ("quintic", "polar_express"), "muon_ns_coeffs", "must be 'quintic' or 'polar_express'")
    need(cfg.muon_wd_schedule in ("constant", "lr", "linear_to_zero"), "muon_wd_schedule",
         "must be 'constant', 'lr' or 'linear_to_zero'")
    need(cfg.device in ("auto", "cuda", "cpu"), "device", "must be 'auto', 'cuda' or 'cpu'")
    fusions = {f.strip() for f in cfg.fused.split(",")} - {""}
    need(fusions <= set(FUSIONS), "fused", f"must be a comma-separated list of {', '.join(FUSIONS)} ('' = none)")
    need("varlen" not in fusions or cfg.doc_attention, "fused",
         "'varlen' is document attention's kernel: it needs doc_attention = true")
    need("fa4" not in fusions or not cfg.doc_attention, "fused",
         "'fa4' is causal attention over whole rows: doc_attention's documents need 'varlen' instead")
    need(cfg.sdpa_backend in SDPA_BACKENDS, "sdpa_backend",
         "must be '' (torch's choice), " + ", ".join(repr(b) for b in SDPA_BACKENDS[1:]))
    need(cfg.sdpa_backend != "efficient" or cfg.num_kv_heads == cfg.num_heads, "sdpa_backend",
         "'efficient' needs num_kv_heads == num_heads (that kernel takes no grouped-query attention)")
    need(cfg.train_log_every >= 1, "train_log_every", "must be >= 1")
    need(cfg.val_loss_every >= 0, "val_loss_every", "must be >= 0 (0 = only at the end)")
    need(cfg.val_batch_tokens >= cfg.train_seq_len, "val_batch_tokens", "must be at least one sequence")
    need(cfg.val_max_tokens >= 0, "val_max_tokens", "must be >= 0 (0 = full split)")
    need(0.0 <= cfg.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (0 = off)")
    need(0.0 <= cfg.ema_start <= 1.0, "ema_start", "must be in [0, 1]")
    need(cfg.qat_start >= 0.0, "qat_start", "must be >= 0 (0 = from the start, >= 1 = never)")
    need(bool(cfg.recipe.strip()), "recipe", "must not be empty")
    load_recipe(cfg.recipe)  # a misspelt scheme fails here (and in --dry-run), not at the export
    if cfg.coder != "auto":
        from pgolf_codec.coders import coder_by_name

        try:
            coder_by_name(cfg.coder)
        except ValueError as e:
            raise ConfigError(f"coder = {cfg.coder!r}: {e}") from None
    need(cfg.quantize_budget >= 0, "quantize_budget", "must be >= 0 (0 = the recipe's artifact)")
    need(cfg.val_docs >= 1, "val_docs", "must be >= 1")
    need(cfg.eval_seq_len >= 0, "eval_seq_len", "must be >= 0 (0 = train_seq_len)")
    need(cfg.eval_stride >= 0, "eval_stride", "must be >= 0 (0 = non-overlapping)")
    need(cfg.eval_ttt in ("", "lora", "full"), "eval_ttt", "must be '', 'lora' or 'full'")
    need(cfg.eval_ttt_rank >= 1, "eval_ttt_rank", "must be >= 1")
    need(cfg.eval_ttt_lr >= 0, "eval_ttt_lr", "must be >= 0 (0 = the evaluator's default)")
    need(cfg.eval_ttt_epochs >= 0, "eval_ttt_epochs", "must be >= 0")
    need(cfg.eval_ttt_chunk >= 1, "eval_ttt_chunk", "must be >= 1")
    need(cfg.eval_ttt_scope in ("", "doc", "phased", "both"), "eval_ttt_scope",
         "must be 'doc', 'phased', 'both' or '' (the evaluator's default)")
    need(cfg.eval_ttt_phase_tokens >= 1, "eval_ttt_phase_tokens", "must be >= 1")
    need(cfg.eval_ttt_phase_epochs >= 0, "eval_ttt_phase_epochs", "must be >= 0")
    need(cfg.eval_ttt_phase_lr >= 0, "eval_ttt_phase_lr", "must be >= 0 (0 = the per-document lr)")
    need(cfg.eval_ttt_phase_batch >= 1, "eval_ttt_phase_batch", "must be >= 1")
    need(cfg.eval_ttt_parallel_docs >= 0, "eval_ttt_parallel_docs", "must be >= 0")
    need(cfg.max_bytes_count in ("artifact", "challenge"), "max_bytes_count", "must be 'artifact' or 'challenge'")
    need(bool([t for t in cfg.eval_ttt_targets.split(",") if t.strip()]), "eval_ttt_targets", "must name a target")
    need(cfg.eval_time_budget > 0, "eval_time_budget", "must be > 0")
    need(0.0 <= cfg.distill_teacher_frac < 1.0, "distill_teacher_frac", "must be in [0, 1) (0 = no distillation)")
    need(cfg.distill_generations >= 1, "distill_generations", "must be >= 1")
    need(0.0 <= cfg.distill_alpha <= 1.0, "distill_alpha", "must be in [0, 1]")
    need(0.0 <= cfg.distill_alpha_end <= 1.0, "distill_alpha_end", "must be in [0, 1]")
    need(cfg.distill_alpha_schedule in ("constant", "linear", "cosine"), "distill_alpha_schedule",
         "must be 'constant', 'linear' or 'cosine'")
    need(cfg.distill_temperature > 0, "distill_temperature", "must be > 0")
    try:
        cfg.model_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model fields: {e}") from None
    if cfg.distill_teacher_frac > 0:
        teacher_config(cfg)  # raises a ConfigError naming the distill field that is wrong


# ---- distillation (pgolf_train/distill.py): the two phases' configs, derived from the run's ----

# Fields teacher_overrides may not set: the budget split is distill_teacher_frac's alone, the teacher
# must predict the same vocabulary on the same device, and a teacher's own distillation is
# distill_generations' job.
_FIXED = ("max_wallclock_seconds", "iterations", "vocab_size", "device", "teacher_overrides")


def teacher_iterations(cfg: TrainConfig) -> int:
    """The teacher phase's step cap: its share of ``iterations`` without a clock, else the same cap."""
    if cfg.max_wallclock_seconds > 0:
        return cfg.iterations
    return round(cfg.distill_teacher_frac * cfg.iterations)


def teacher_config(cfg: TrainConfig) -> TrainConfig:
    """The config of the teacher phase (the last teacher generation) of distillation run ``cfg``.

    Starts from ``cfg``; the budget becomes the teacher share (seconds or steps); QAT is off (the
    teacher is never quantized); with ``G = distill_generations > 1`` it is itself a distillation run
    whose teachers take ``(G−1)/G`` of the share; then ``teacher_overrides`` (``"k=v;k=v"``) apply.
    Raises :class:`ConfigError` naming the distill field at fault.
    """
    if cfg.distill_teacher_frac <= 0:
        raise ConfigError("teacher_config: distill_teacher_frac is 0 (no distillation)")
    items = [s.strip() for s in cfg.teacher_overrides.split(";") if s.strip()]
    try:
        over = parse_overrides(items)
    except ConfigError as e:
        raise ConfigError(f"teacher_overrides = {cfg.teacher_overrides!r}: {e}") from None
    bad = sorted(k for k in over if k in _FIXED or k.startswith("distill_"))
    if bad:
        raise ConfigError(f"teacher_overrides = {cfg.teacher_overrides!r}: may not set {', '.join(bad)} "
                          "(the budget split, vocabulary, device and generations are the run's)")
    gens = cfg.distill_generations
    values = cfg.to_dict()
    values.update(
        max_wallclock_seconds=cfg.max_wallclock_seconds * cfg.distill_teacher_frac,
        iterations=teacher_iterations(cfg),
        qat_start=1.0,
        distill_generations=max(gens - 1, 1),
        distill_teacher_frac=(gens - 1) / gens,  # 0 for a single generation: plain training
        teacher_overrides=cfg.teacher_overrides if gens > 1 else "",
    )
    values.update(over)
    if cfg.max_wallclock_seconds <= 0:
        student_steps = cfg.iterations - values["iterations"]
        if values["iterations"] < gens or student_steps < 1:
            raise ConfigError(f"distill_teacher_frac = {cfg.distill_teacher_frac!r}: without a clock the split of "
                              f"iterations = {cfg.iterations} gives {values['iterations']} teacher step(s) for "
                              f"{gens} generation(s) and {student_steps} student step(s); each needs >= 1")
    try:
        return make_config(values, source="teacher_overrides")
    except ConfigError as e:
        raise ConfigError(f"teacher_overrides = {cfg.teacher_overrides!r} gives a bad teacher config: {e}") from None


def student_config(cfg: TrainConfig) -> TrainConfig:
    """The student phase's config: ``cfg`` with the rest of the budget (seconds or steps).

    The trainer's schedule (LR warm-down, EMA and QAT start fractions, α) runs on this budget.
    """
    if cfg.max_wallclock_seconds > 0:
        return dataclasses.replace(cfg, max_wallclock_seconds=cfg.max_wallclock_seconds * (1 - cfg.distill_teacher_frac))
    return dataclasses.replace(cfg, iterations=cfg.iterations - teacher_iterations(cfg))
