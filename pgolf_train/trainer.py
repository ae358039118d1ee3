"""`pgolf train`: wall-clock-bounded training, then export to an artifact and exact bpb on it.

The run, top to bottom (``train``):

1. set up: process group (``torchrun``: NCCL on GPUs, gloo on CPU), device, seed, model,
   optimizers (Muon for block matrices, Adam for the rest), ``torch.compile``, DDP;
2. compile warm-up outside the budget: a few real steps (with QAT too, if it will switch on
   later), then the initial weights, optimizer state and data stream are restored;
3. the loop: each step runs ``grad_accum`` micro-batches per rank, the LR multiplier follows
   the elapsed *training* time (validation and checkpoints pause the clock), EMA and QAT switch
   on at their fractions of the budget, a checkpoint is written every ``checkpoint_every_s``;
4. the end: EMA (or raw) weights → ``final_model.safetensors`` → codec recipe →
   ``model.pgolf`` → the artifact is decoded and evaluated → ``train_summary.json``.

Units: ``*_ms`` milliseconds, ``*_s`` seconds, tokens are global (all ranks) unless noted.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from pgolf_train.config import ConfigError, TrainConfig, field_types, load_config, load_recipe
from pgolf_train.device import check_device
from pgolf_train.ema import EMA
from pgolf_train.loader import DistributedTokenLoader
from pgolf_train.model import GPT
from pgolf_train.muon import Muon, split_params
from pgolf_train.source import model_source, module_source

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
ARTIFACT_LIMIT = 16_000_000
CHECKPOINT_VERSION = 1
# Files a run writes into its directory; --force removes exactly these (nothing else of the user's).
RUN_FILES = ("train.log", "train.jsonl", "checkpoint.pt", "final_model.safetensors", "model.pgolf",
             "train_summary.json")
PREVIOUS_RUN = ".previous-run"  # where --force keeps the replaced run's files until the new run is done
# Fields that may differ between a checkpoint and the config it is resumed with.
RESUME_MUTABLE = {"train_log_every", "val_loss_every", "val_batch_tokens", "val_max_tokens", "checkpoint_every_s",
                  "checkpoint_every_steps", "device", "val_docs", "eval_seq_len", "eval_stride", "eval_ttt",
                  "eval_ttt_rank", "eval_ttt_lr", "eval_ttt_epochs", "eval_ttt_chunk", "eval_ttt_targets",
                  "eval_ttt_from_start", "eval_time_budget", "quantize_budget", "quantize_tolerance"}


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DistInfo:
    """Where this process sits in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group if the environment names one (else a single process)."""
    # NVLink multicast (NVLS) must stay off on our machines; respect an explicit user setting.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if device_pref != "auto":
        check_device(device_pref, "device")  # ValueError: "device cuda: no CUDA device available (...)"
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    in_group = dist.is_available() and dist.is_initialized()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if in_group else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if in_group else env_world
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not in_group and world > 1:
        if use_cuda:
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        owns = True
    return DistInfo(rank, world, local_rank, device, owns)


def leave_group() -> None:
    """Barrier, then destroy the process group. A rank that closes its sockets while a peer is
    still in its last collective (or writing files rank 0 alone writes) can make the peer's gloo
    thread abort the whole process ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def code_hash() -> str:
    """sha256 over the sources of the pgolf packages (path + bytes of every .py, sorted); where they
    are no files (a generated train_gpt.py), over the loaded pgolf modules' sources (name + text)."""
    h = hashlib.sha256()
    roots = [REPO_ROOT / pkg for pkg in ("pgolf_train", "pgolf_codec", "pgolf_eval", "pgolf")]
    if not any(r.is_dir() for r in roots):
        for name in sorted(m for m in sys.modules if m.split(".")[0] in ("pgolf_train", "pgolf_codec", "pgolf_eval", "pgolf")):
            h.update(name.encode() + b"\0" + module_source(name).encode())
        return h.hexdigest()
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(REPO_ROOT)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("pgolf", "sentencepiece", "zstandard", "msgpack", "triton"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - an absent optional package is just not reported
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when there are local changes), if any."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunLog:
    """Rank-0 logging: human lines to stdout and ``train.log``, records to ``train.jsonl``."""

    def __init__(self, out_dir: Path | None, master: bool, echo: bool = True) -> None:
        self.master = master
        self.echo = echo
        self.text = out_dir / "train.log" if out_dir and master else None
        self.jsonl = out_dir / "train.jsonl" if out_dir and master else None

    def __call__(self, msg: str) -> None:
        if not self.master:
            return
        if self.echo:
            print(msg, flush=True)
        if self.text is not None:
            with open(self.text, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    def record(self, **fields: Any) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(fields) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint (the run repeats those steps)."""
        if self.jsonl is None or not self.jsonl.exists():
            return
        keep = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", 0) <= step or rec.get("event") == "resume":
                keep.append(line)
        _atomic_write_text(self.jsonl, "".join(k + "\n" for k in keep))


def _atomic_write_text(path: Path, text: str) -> None:
    from pgolf_codec.atomic import atomic_write

    atomic_write(path, text.encode("utf-8"), overwrite=True)


# ---------------------------------------------------------------------------------------------
# model, optimizers, schedule
# ---------------------------------------------------------------------------------------------

def count_params(cfg: TrainConfig) -> int:
    """Parameter count of the config's model, without allocating it (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg.model_config()).parameters())


def build_model(cfg: TrainConfig, device: torch.device) -> GPT:
    """The GPT of ``cfg`` with fp32 master weights on ``device``, seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed)
    return GPT(cfg.model_config()).to(device)


def compile_model(model: nn.Module, exact_casts: bool = True) -> nn.Module:
    """``torch.compile`` of the whole model: one static-shape graph (no graph breaks allowed).

    ``exact_casts`` keeps every float32 → fp16/bf16 → float32 round trip that inductor would
    otherwise fold away as a no-op. QAT needs it: the codec rounds scales to their stored dtype,
    and without it the compiled fake-quant uses unrounded scales, so nearly every weight differs
    from what the artifact will hold. The trainer always compiles with it, QAT or not: on the H200
    the `h200` step was faster with it, not slower (283 vs 299 ms in `train_bench`, same machine;
    272 vs 294 ms before the QAT switch in the H200-300 runs, `results/h200_variants.json`).
    """
    options = {"emulate_precision_casts": True} if exact_casts else None
    return torch.compile(model, dynamic=False, fullgraph=True, options=options)


def build_optimizers(cfg: TrainConfig, model: GPT, device: torch.device) -> tuple[list[torch.optim.Optimizer], Muon]:
    """Adam for the embedding/head/scalars and Muon for the block matrices, as the baseline splits them.

    Every param group carries ``base_lr``; the loop sets ``lr = base_lr * lr_mul``.
    """
    groups = split_params(model)
    fused = device.type == "cuda"  # fused Adam: one kernel per step instead of one per tensor
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused, foreach=None if fused else True)
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    adam_groups = [
        {"params": groups["embed"], "lr": embed_lr, "base_lr": embed_lr},
        {"params": groups["scalar"], "lr": cfg.scalar_lr, "base_lr": cfg.scalar_lr},
        {"params": groups["head"], "lr": cfg.head_lr, "base_lr": cfg.head_lr},
    ]
    adam = torch.optim.Adam([g for g in adam_groups if g["params"]], **adam_kw)
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum_warmup_start,
                backend_steps=cfg.muon_backend_steps, weight_decay=cfg.muon_weight_decay,
                row_normalize=cfg.muon_row_normalize)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
    return [adam, muon], muon


def lr_multiplier(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """LR multiplier in [min_lr_frac, 1] for ``step`` at ``elapsed_ms`` of training time.

    With a time budget the warm-down is by the clock: over ``warmdown_frac`` of the budget, or
    over ``warmdown_iters`` steps converted to time by the average step so far (the baseline:
    ``remaining_ms / (warmdown_iters * avg_step_ms)`` once below 1). Without a budget it is by steps.
    """
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    budget_ms = 1000.0 * cfg.max_wallclock_seconds
    if budget_ms > 0:
        if cfg.warmdown_frac > 0:
            warmdown_ms = cfg.warmdown_frac * budget_ms
        else:
            warmdown_ms = cfg.warmdown_iters * (elapsed_ms / max(step, 1))
        remaining_ms = max(budget_ms - elapsed_ms, 0.0)
        r = remaining_ms / warmdown_ms if 0 < warmdown_ms and remaining_ms <= warmdown_ms else 1.0
    else:
        warmdown = cfg.warmdown_frac * cfg.iterations if cfg.warmdown_frac > 0 else cfg.warmdown_iters
        remaining = max(cfg.iterations - step, 0)
        r = remaining / warmdown if 0 < warmdown and remaining < warmdown else 1.0
    shape = 0.5 * (1.0 - math.cos(math.pi * r)) if cfg.schedule == "cosine" else r
    return warm * (cfg.min_lr_frac + (1.0 - cfg.min_lr_frac) * shape)


def muon_momentum(cfg: TrainConfig, step: int) -> float:
    """Muon momentum, warmed linearly from ``muon_momentum_warmup_start`` over the first steps."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def budget_fraction(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """How far the run is, in [0, 1]: by the clock with a budget, else by steps."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * cfg.max_wallclock_seconds)
    return step / max(cfg.iterations, 1)


def resolve_grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per rank: ``cfg.grad_accum`` or the baseline's ``8 // world_size``; validated."""
    if cfg.grad_accum:
        accum = cfg.grad_accum
    else:
        if 8 % world_size:
            raise ConfigError(f"grad_accum = 0 means 8 // world_size, but world size {world_size} does not divide 8;"
                              " set grad_accum explicitly")
        accum = 8 // world_size
    per = world_size * accum * cfg.train_seq_len
    if cfg.train_batch_tokens % per:
        raise ConfigError(f"train_batch_tokens = {cfg.train_batch_tokens} must be a multiple of world_size × grad_accum"
                          f" × train_seq_len = {world_size} × {accum} × {cfg.train_seq_len} = {per}")
    return accum


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], loader: DistributedTokenLoader,
               cfg: TrainConfig, grad_accum: int, distributed: bool, device: torch.device,
               params: list[nn.Parameter] | None = None,
               loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean loss (a device
    scalar: reading it is a host sync, so the loop only does that on log steps).

    ``loss_fn(model, x, y)`` replaces the plain ``model(x, y)`` loss (distillation's soft targets)."""
    total = torch.zeros((), device=device)
    for micro in range(grad_accum):
        if distributed:  # all-reduce gradients only after the last micro-batch
            model.require_backward_grad_sync = micro == grad_accum - 1
        x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, grad_accum)
        if loss_fn is not None:
            loss = loss_fn(model, x, y)
        else:
            with autocast_ctx(cfg, device):
                loss = model(x, y)
        total += loss.detach()
        (loss / grad_accum).backward()
    if cfg.grad_clip_norm > 0 and params is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total / grad_accum


def set_schedule(optimizers: list[torch.optim.Optimizer], muon: Muon, lr_mul: float, momentum: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mul
    for g in muon.param_groups:
        g["momentum"] = momentum


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather_optimizer_states(optimizers: list[torch.optim.Optimizer], di: DistInfo) -> list[dict] | None:
    """Optimizer state dicts of the whole run, on rank 0 (None elsewhere).

    Muon keeps the momentum of parameter ``i`` of a group only on rank ``i % world_size``; the
    merged state takes each entry from that owner (Adam state is replicated, any rank has it).
    """
    local = [_to_cpu(opt.state_dict()) for opt in optimizers]
    if not di.distributed:
        return local
    gathered: list | None = [None] * di.world_size if di.master else None
    dist.gather_object(local, gathered, dst=0)
    if not di.master:
        return None
    merged = []
    for k, sd in enumerate(gathered[0]):
        out = {"state": {}, "param_groups": sd["param_groups"]}
        for group in sd["param_groups"]:
            for pos, idx in enumerate(group["params"]):
                owner = pos % di.world_size
                order = [owner] + [r for r in range(di.world_size) if r != owner]
                for r in order:
                    entry = gathered[r][k]["state"].get(idx)
                    if entry is not None:
                        out["state"][idx] = entry
                        break
        merged.append(out)
    return merged


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save``: a temp file in the same directory, then rename."""
    from pgolf_codec.atomic import atomic_write

    atomic_write(path, lambda f: torch.save(state, f), overwrite=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a pgolf checkpoint of version {CHECKPOINT_VERSION}")
    return state


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in cfg.to_dict().items()
             if k not in RESUME_MUTABLE and saved.get(k) != v]
    if diffs:
        raise ConfigError("cannot resume with a different config: " + "; ".join(diffs))


def prepare_out_dir(out_dir: Path, resume: bool, force: bool) -> bool:
    """Create/check the run directory; returns True when there is a checkpoint to resume from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    ckpt = (out_dir / "checkpoint.pt").exists()
    if resume:
        if existing and not ckpt:
            raise FileExistsError(f"{out_dir} holds a run ({', '.join(existing)}) but no checkpoint.pt to resume")
        return ckpt
    if existing:
        if not force:
            raise FileExistsError(f"{out_dir} already holds a run ({', '.join(existing)}); "
                                  "pass --resume to continue it or --force to start over")
        # set aside, not deleted: a run that fails keeps the previous one's files (train() removes
        # them once it has written its own artifact)
        previous = out_dir / PREVIOUS_RUN
        if previous.is_dir():  # a --force run failed before: its partial files go, the run before it stays
            for name in existing:
                (out_dir / name).unlink()
        else:
            previous.mkdir()
            for name in existing:
                os.replace(out_dir / name, previous / name)
        print(f"pgolf train: --force: the previous run's files are in {previous} until this run finishes",
              file=sys.stderr, flush=True)
    return False


# ---------------------------------------------------------------------------------------------
# evaluation and export
# ---------------------------------------------------------------------------------------------

def load_val(cfg: TrainConfig, data_dir: Path, tokenizer: Path):
    """Validation tokens (uint16, the ``fineweb_val_*`` split, capped by ``val_max_tokens``) and the
    byte source (a per-token sidecar when the data has one, else the tokenizer's tables)."""
    from pgolf_eval.evaluate import load_val_stream

    return load_val_stream(data_dir, tokenizer, cfg.vocab_size, cfg.val_max_tokens or None)


def evaluate(model: nn.Module, val_tokens, byte_source, cfg: TrainConfig, device: torch.device):
    """Exact bpb of ``model`` on the validation stream (split across ranks); an ``EvalResult``."""
    from pgolf_eval.evaluate import evaluate_tokens

    was_training = model.training
    result = evaluate_tokens(model, val_tokens, byte_source, seq_len=cfg.train_seq_len,
                             batch_tokens=max(cfg.val_batch_tokens // max(dist_world(), 1), cfg.train_seq_len),
                             device=device, log=None)
    model.train(was_training)
    return result


def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], model_config: dict | None = None) -> None:
    """Write the pre-quantization weights (fp32) with the codec's safetensors writer; the model
    config goes into its metadata (JSON), so that `pgolf pack` carries it into the artifact."""
    from pgolf_codec.safetensors_io import write_safetensors

    meta = None if model_config is None else {"model_config": json.dumps(model_config, sort_keys=True)}
    write_safetensors(path, tensors, meta, overwrite=True)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, data_dir: str | os.PathLike, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
          *, resume: bool = False, force: bool = False, echo: bool = True,
          stop_at_step: int | None = None, export: bool = True) -> dict[str, Any]:
    """Train ``cfg`` on ``data_dir``'s shards, export ``out_dir/model.pgolf``, evaluate it; the summary.

    ``stop_at_step`` ends the loop early without the export (the state stays in the checkpoint);
    it exists to test resuming. ``export=False`` stops at ``final_model.safetensors`` and the
    pre-quantization score (a distillation teacher). With ``distill_teacher_frac > 0`` the teacher
    phase (``pgolf_train.distill``) runs first, on its share of the budget, and this model trains on
    the rest with the soft-target loss.
    """
    data_dir, tokenizer, out_dir = Path(data_dir), Path(tokenizer), Path(out_dir)
    t_start = time.perf_counter()
    di = init_distributed(cfg.device)
    device = di.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe(cfg.recipe)  # fail on a bad recipe now, not after ten minutes of training
    grad_accum = resolve_grad_accum(cfg, di.world_size)
    if not tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer}")
    has_ckpt = False
    if di.master:
        has_ckpt = prepare_out_dir(out_dir, resume, force)
    if di.distributed:
        flag = [has_ckpt]
        dist.broadcast_object_list(flag, src=0)
        has_ckpt = bool(flag[0])
    log = RunLog(out_dir, di.master, echo)

    # ---- header: what exactly is running ----
    n_params = count_params(cfg)
    log(f"pgolf train  {datetime.datetime.now().isoformat(timespec='seconds')}")
    log(f"code_sha256: {code_hash()}  git: {git_commit()}")
    log(f"versions: {json.dumps(package_versions())}")
    log(f"device: {device_name(device)}  world_size: {di.world_size}  grad_accum: {grad_accum}"
        f"  tokens/step: {cfg.train_batch_tokens}  micro-batch/rank: "
        f"{cfg.train_batch_tokens // (di.world_size * grad_accum * cfg.train_seq_len)}×{cfg.train_seq_len}")
    log(f"params: {n_params:,}")
    log(f"config: {json.dumps(cfg.to_dict(), sort_keys=True)}")

    # ---- distillation: the teacher phase on its share, then this model on the rest of the budget ----
    distiller, teacher_summary, run_cfg = None, None, cfg
    if cfg.distill_teacher_frac > 0:
        from pgolf_train.distill import Distiller, run_teacher_phase, student_config

        teacher, teacher_summary = run_teacher_phase(cfg, data_dir, tokenizer, out_dir, log, device,
                                                     resume=resume, force=force, echo=echo)
        cfg = student_config(cfg)
        distiller = Distiller(teacher, cfg)
        log("distillation: student phase on " + (f"{cfg.max_wallclock_seconds:.1f}s" if cfg.max_wallclock_seconds > 0
                                                   else f"{cfg.iterations} steps")
            + f"; alpha {cfg.distill_alpha}"
            + (f" -> {cfg.distill_alpha_end} ({cfg.distill_alpha_schedule})" if cfg.distill_alpha_schedule != "constant"
               else "") + f", T {cfg.distill_temperature}")
        log.record(event="phase", phase="student", step=0, budget_s=cfg.max_wallclock_seconds,
                   iterations=cfg.iterations)

    # ---- model, optimizers, data ----
    base_model = build_model(cfg, device)
    model: nn.Module = compile_model(base_model) if cfg.compile else base_model
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[di.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizers, muon = build_optimizers(cfg, base_model, device)
    params = list(base_model.parameters())
    val_tokens, byte_source = load_val(cfg, data_dir, tokenizer)
    log(f"data: {len(DistributedTokenLoader(data_dir, 0, 1, 'cpu').stream.files)} train shards, "
        f"{val_tokens.size:,} val tokens")
    from pgolf_train.qat import qat_enabled, set_qat

    step, training_ms, ema, qat_on, loader_state = 0, 0.0, None, False, None
    if has_ckpt:
        ckpt = load_checkpoint(out_dir / "checkpoint.pt")
        check_resume_config(cfg, ckpt["config"])
        base_model.load_state_dict(ckpt["model"])
        for opt, sd in zip(optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(sd)
        step, training_ms, loader_state = int(ckpt["step"]), float(ckpt["training_ms"]), ckpt["loader"]
        if ckpt["ema"] is not None:
            ema = EMA(base_model, cfg.ema_decay)
            ema.load_state_dict(ckpt["ema"])
        qat_on = bool(ckpt["qat_on"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log.truncate_after(step)
        log(f"resumed from checkpoint.pt at step {step}, {training_ms / 1000:.1f}s of training done")
        log.record(event="resume", step=step, elapsed=training_ms / 1000)

    # ---- compile warm-up, outside the budget: then restore weights, optimizer state and data ----
    if cfg.compile_warmup_steps > 0:
        t_warm = time.perf_counter()
        saved_model = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        warm_loader = DistributedTokenLoader(data_dir, di.rank, di.world_size, device, cfg.vocab_size)
        # If QAT switches on mid-run, warm its graph too so the switch costs no compile in the budget.
        qat_later = not qat_on and cfg.qat_start < 1.0
        for i in range(cfg.compile_warmup_steps):
            warm_qat = qat_on or cfg.qat_start == 0.0 or (qat_later and i >= cfg.compile_warmup_steps // 2)
            if warm_qat != qat_enabled(base_model):
                set_qat(base_model, recipe, warm_qat)
            set_schedule(optimizers, muon, lr_multiplier(cfg, step, training_ms), muon_momentum(cfg, step))
            train_step(model, optimizers, warm_loader, cfg, grad_accum, di.distributed, device, params, distiller)
        synchronize(device)
        base_model.load_state_dict(saved_model)
        for opt, sd in zip(optimizers, saved_opts, strict=True):
            opt.load_state_dict(sd)
        del saved_model, saved_opts, warm_loader
        log(f"compile warm-up: {cfg.compile_warmup_steps} steps in {time.perf_counter() - t_warm:.1f}s (not counted)")
    set_qat(base_model, recipe, qat_on or cfg.qat_start == 0.0)
    qat_on = qat_enabled(base_model)
    loader = DistributedTokenLoader(data_dir, di.rank, di.world_size, device, cfg.vocab_size)
    if loader_state is not None:
        loader.load_state_dict(loader_state)

    def checkpoint_state() -> dict[str, Any] | None:
        opt_states = gather_optimizer_states(optimizers, di)
        if not di.master:
            return None
        return {
            "version": CHECKPOINT_VERSION, "step": step, "training_ms": training_ms, "config": cfg.to_dict(),
            "model_config": cfg.model_config().to_dict(),  # `pgolf pack checkpoint.pt` stores it
            "model": _to_cpu(base_model.state_dict()), "optimizers": opt_states,
            "ema": ema.state_dict() if ema is not None else None, "qat_on": qat_on,
            "loader": loader.state_dict(), "world_size": di.world_size,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    def write_checkpoint() -> float:
        t = time.perf_counter()
        state = checkpoint_state()
        if di.master:
            save_checkpoint(out_dir / "checkpoint.pt", state)
        return time.perf_counter() - t

    # ---- the training loop ----
    budget_ms = 1000.0 * cfg.max_wallclock_seconds
    tokens_per_step = cfg.train_batch_tokens
    last_ckpt_ms = training_ms
    stop_after: int | None = None
    ckpt_requested = False
    pending: torch.Tensor | None = None  # ranks' clock decisions (see the loop's end), read a step late
    qat_timer: float | None = None
    qat_due = False  # (QAT from step 0 was switched on above)
    ema_due = cfg.ema_decay > 0 and budget_fraction(cfg, step, training_ms) >= cfg.ema_start
    last_log_t, last_log_step = time.perf_counter(), step
    synchronize(device)
    t0 = time.perf_counter()
    while True:
        last_step = step >= cfg.iterations or (stop_after is not None and step >= stop_after)
        if stop_at_step is not None and step >= stop_at_step:
            last_step = True

        # Validation and checkpoints pause the training clock (as the baseline's validation does);
        # the end-of-run validation happens after the loop, on the exported weights.
        if cfg.val_loss_every > 0 and step > 0 and step % cfg.val_loss_every == 0 and not last_step:
            synchronize(device)
            training_ms += 1000.0 * (time.perf_counter() - t0)
            res = evaluate(base_model, val_tokens, byte_source, cfg, device)
            log(f"step:{step} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                f"train_time:{training_ms / 1000:.1f}s eval:{res.seconds:.1f}s")
            log.record(step=step, val_loss=res.val_loss, val_bpb=res.val_bpb, elapsed=training_ms / 1000,
                       tokens=step * tokens_per_step)
            synchronize(device)
            t0 = time.perf_counter()
        if not last_step and (ckpt_requested or (cfg.checkpoint_every_steps > 0 and step > 0
                                                 and step % cfg.checkpoint_every_steps == 0)):
            synchronize(device)
            training_ms += 1000.0 * (time.perf_counter() - t0)
            secs = write_checkpoint()
            last_ckpt_ms, ckpt_requested = training_ms, False
            if pending is not None:  # the in-flight decision predates this checkpoint
                pending[1] = 0
            log(f"step:{step} checkpoint written in {secs:.2f}s (not counted)")
            log.record(event="checkpoint", step=step, seconds=secs, elapsed=training_ms / 1000)
            t0 = time.perf_counter()
        if last_step:
            break

        elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - t0)
        if qat_due and not qat_on:
            set_qat(base_model, recipe, True)
            qat_on = True
            synchronize(device)
            qat_timer = time.perf_counter()
            log(f"step:{step} QAT on (fake-quant with the export recipe) at "
                f"{budget_fraction(cfg, step, elapsed_ms):.1%} of the budget")
        if ema_due and ema is None:
            ema = EMA(base_model, cfg.ema_decay)
            log(f"step:{step} EMA on: decay {cfg.ema_decay}, warmed up as min(decay, (1+t)/(10+t))")

        mul = lr_multiplier(cfg, step, elapsed_ms)
        set_schedule(optimizers, muon, mul, muon_momentum(cfg, step))
        if distiller is not None:
            distiller.set_progress(budget_fraction(cfg, step, elapsed_ms))
        loss = train_step(model, optimizers, loader, cfg, grad_accum, di.distributed, device, params, distiller)
        if ema is not None:
            ema.update()
        step += 1

        if qat_timer is not None:  # the first QAT step: a recompile unless the warm-up primed it
            synchronize(device)
            secs = time.perf_counter() - qat_timer
            avg = elapsed_ms / 1000 / max(step - 1, 1)
            log(f"step:{step} first QAT step took {secs:.2f}s (average step {avg:.3f}s; "
                f"the difference is the recompile)")
            log.record(event="qat_switch", step=step, first_step_seconds=secs, avg_step_seconds=avg)
            qat_timer = None

        # Progress: reading the loss syncs with the device, so only on log steps.
        if step <= 10 or step % cfg.train_log_every == 0:
            loss_value = float(loss.item())
            now = time.perf_counter()
            elapsed_s = (training_ms + 1000.0 * (now - t0)) / 1000
            tok_s = (step - last_log_step) * tokens_per_step / max(now - last_log_t, 1e-9)
            last_log_t, last_log_step = now, step
            eta = (max(budget_ms / 1000 - elapsed_s, 0.0) if budget_ms > 0
                   else (cfg.iterations - step) * elapsed_s / max(step, 1))
            log(f"step:{step}/{cfg.iterations} loss:{loss_value:.4f} lr:{mul:.3f} tok/s:{tok_s:,.0f} "
                f"elapsed:{elapsed_s:.1f}s eta:{eta:.1f}s")
            extra = distiller.stats() if distiller is not None else {}
            if extra:
                log(f"step:{step} " + " ".join(f"{k}:{v:.4f}" for k, v in extra.items()))
            log.record(step=step, loss=loss_value, lr=mul, tokens_per_s=tok_s, elapsed=elapsed_s,
                       tokens=step * tokens_per_step, **extra)

        # Decisions by the clock: stop at the budget, timed checkpoint, QAT and EMA start. Ranks
        # must agree, so with several ranks the flags go through an all-reduce whose result is read
        # one step later: the host never waits on the device mid-run, and every switch happens on
        # the same step on every rank (at most one step after its time).
        now_ms = training_ms + 1000.0 * (time.perf_counter() - t0)
        frac_now = budget_fraction(cfg, step, now_ms)
        flags = [int(budget_ms > 0 and now_ms >= budget_ms),
                 int(cfg.checkpoint_every_s > 0 and now_ms - last_ckpt_ms >= 1000.0 * cfg.checkpoint_every_s),
                 int(cfg.qat_start < 1.0 and frac_now >= cfg.qat_start),
                 int(cfg.ema_decay > 0 and frac_now >= cfg.ema_start)]
        if di.distributed:
            previous = pending.tolist() if pending is not None else [0, 0, 0, 0]
            pending = torch.tensor(flags, device=device)
            dist.all_reduce(pending, op=dist.ReduceOp.MAX)
            flags = previous
        if flags[0] and stop_after is None:
            stop_after = step
        ckpt_requested = ckpt_requested or bool(flags[1])
        qat_due, ema_due = qat_due or bool(flags[2]), ema_due or bool(flags[3])
    synchronize(device)
    training_ms += 1000.0 * (time.perf_counter() - t0)
    log(f"training done: {step} steps in {training_ms / 1000:.1f}s "
        f"({step * tokens_per_step / max(training_ms / 1000, 1e-9):,.0f} tok/s, "
        f"{training_ms / max(step, 1):.1f} ms/step)")
    if device.type == "cuda":
        log(f"peak memory: {torch.cuda.max_memory_allocated(device) // 2**20} MiB allocated")
    write_checkpoint()
    if stop_at_step is not None:
        if di.owns_group:
            leave_group()
        return {"steps": step, "train_seconds": training_ms / 1000}

    summary = finish(cfg, base_model, ema, recipe, di, log, out_dir, tokenizer, val_tokens, byte_source,
                     step=step, training_ms=training_ms, n_params=n_params, grad_accum=grad_accum, export=export)
    if teacher_summary is not None:
        from pgolf_train.distill import phase_summary

        summary.update(phase_summary(run_cfg, teacher_summary, summary))
    summary["wall_seconds"] = time.perf_counter() - t_start
    if di.master:
        _atomic_write_text(out_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(out_dir / PREVIOUS_RUN, ignore_errors=True)  # this run is complete
    if di.owns_group:
        leave_group()
    return summary


def finish(cfg: TrainConfig, base_model: GPT, ema: EMA | None, recipe, di: DistInfo, log: RunLog, out_dir: Path,
           tokenizer: Path, val_tokens, byte_source, *, step: int, training_ms: float, n_params: int,
           grad_accum: int, export: bool = True) -> dict[str, Any]:
    """Export the final (EMA or raw) weights, evaluate them before and after quantization; the summary.

    ``export=False``: only ``final_model.safetensors`` and the pre-quantization score (no artifact)."""
    from pgolf_codec.container import write_artifact
    from pgolf_eval.loader import model_from_artifact
    from pgolf_train.qat import set_qat
    from pgolf_train.tokenizer import tokenizer_info

    device = di.device
    set_qat(base_model, recipe, False)  # the pre-quantization numbers are of the plain weights
    if ema is not None:
        ema.copy_to(base_model)
        log(f"using EMA weights ({ema.updates} updates)")
    pre = evaluate(base_model, val_tokens, byte_source, cfg, device)
    log(f"pre-quantization: val_loss:{pre.val_loss:.4f} val_bpb:{pre.val_bpb:.4f} "
        f"({pre.tokens:,} tokens, {pre.seconds:.1f}s)")
    log.record(step=step, val_loss_prequant=pre.val_loss, val_bpb_prequant=pre.val_bpb, elapsed=training_ms / 1000,
               tokens=step * cfg.train_batch_tokens)

    run = {"val_bpb_prequant": pre.val_bpb, "val_loss_prequant": pre.val_loss, "steps": step,
           "train_seconds": training_ms / 1000, "tokens_seen": step * cfg.train_batch_tokens,
           "ms_per_step": training_ms / max(step, 1),
           "tokens_per_s": step * cfg.train_batch_tokens / max(training_ms / 1000, 1e-9),
           "params": n_params, "world_size": di.world_size, "grad_accum": grad_accum, "ema": ema is not None,
           "config": cfg.to_dict()}
    artifact = out_dir / "model.pgolf"
    tensors: dict[str, torch.Tensor] = {}
    if di.master:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in base_model.state_dict().items()}
        save_safetensors(out_dir / "final_model.safetensors", tensors, cfg.model_config().to_dict())
    if not export:
        if di.distributed:  # every rank may read the weights once this returns
            dist.barrier()
        return run
    if di.master:
        metadata = {
            "model_config": cfg.model_config().to_dict(),
            "model_code": "model.py",
            "tokenizer": tokenizer_info(tokenizer),
            "train": {"config": cfg.to_dict(), "seed": cfg.seed, "steps": step, "train_seconds": training_ms / 1000,
                      "world_size": di.world_size, "git_commit": git_commit(), "code_sha256": code_hash(),
                      "versions": package_versions(), "ema": ema is not None,
                      "qat_start": cfg.qat_start},
        }
        t = time.perf_counter()
        # overwrite=True: the run directory was checked (or --force'd) at the start; a file here is ours
        info = write_artifact(artifact, tensors, recipe, metadata=metadata,
                              code={"model.py": model_source()},
                              coder=cfg.coder, overwrite=True)
        fits = info.total_bytes <= cfg.max_artifact_bytes
        log(f"artifact: {artifact}  {info.total_bytes:,} bytes = model {info.model_bytes:,} + code "
            f"{info.code_bytes:,} (+ container)  limit {cfg.max_artifact_bytes:,}: "
            f"{'fits' if fits else 'OVER by %d' % (info.total_bytes - cfg.max_artifact_bytes)}"
            f"  ({time.perf_counter() - t:.1f}s)")
        sizes = [info.total_bytes, info.model_bytes, info.code_bytes]
    else:
        sizes = [0, 0, 0]
    if di.distributed:
        dist.barrier()
        obj = [sizes]
        dist.broadcast_object_list(obj, src=0)
        sizes = obj[0]

    # The score that counts: decode the artifact, build the model from it, evaluate.
    qmodel, _ = model_from_artifact(artifact, device=str(device))
    post = evaluate(qmodel, val_tokens, byte_source, cfg, device)
    log(f"post-quantization (artifact): val_loss:{post.val_loss:.4f} val_bpb:{post.val_bpb:.4f} "
        f"(+{post.val_bpb - pre.val_bpb:.4f} from quantization)")
    log.record(step=step, val_loss=post.val_loss, val_bpb=post.val_bpb, elapsed=training_ms / 1000,
               tokens=step * cfg.train_batch_tokens)
    return {
        **run, "val_bpb": post.val_bpb, "val_loss": post.val_loss, "val_tokens": post.tokens, "val_bytes": post.bytes,
        "val_docs": post.docs, "val_per_doc": post.per_doc,  # length buckets, interval; per document
        "artifact_bytes": sizes[0], "model_bytes": sizes[1], "code_bytes": sizes[2],
        "limit_bytes": cfg.max_artifact_bytes, "fits": sizes[0] <= cfg.max_artifact_bytes,
        "artifact": str(artifact), "qat_start": cfg.qat_start, "recipe": str(recipe),
    }


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pgolf train``; every config field is also a ``--FIELD=VALUE`` override."""
    p = subparsers.add_parser(
        "train", help="train a model within a wall-clock budget and export its artifact",
        description="Train, export model.pgolf through the codec recipe, and report exact bpb of the artifact. "
                    "Any config field can be overridden as --FIELD=VALUE (see --dry-run --json for the list).")
    p.add_argument("--config", default="baseline", help="config name (pgolf_train/configs/NAME.toml) or a .toml path")
    p.add_argument("--data", help="directory with fineweb_train_*.bin / fineweb_val_*.bin shards")
    p.add_argument("--tokenizer", help="the SentencePiece .model the shards were made with")
    p.add_argument("--out", help="run directory (train.log, train.jsonl, checkpoint.pt, model.pgolf, ...)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count; no training")
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace a previous run's files in --out (they wait in "
                   "--out/.previous-run until this run has finished)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    overrides = p.add_argument_group("config overrides")
    for name, tp in field_types().items():
        overrides.add_argument(f"--{name}", dest=f"override__{name}", metavar=_type_name(tp).upper(),
                               default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_cli)
    return p


def _overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    for key, value in vars(args).items():
        if key.startswith("override__") and value is not None:
            out.append(f"{key.removeprefix('override__')}={value}")
    return out


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides_from_args(args))
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        info = {"config": cfg.to_dict(), "params": count_params(cfg), "world_size": world,
                "grad_accum": resolve_grad_accum(cfg, world)}
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info["config"].items():
                print(f"{k} = {v!r}")
            print(f"params = {info['params']:,}  (world_size {world}, grad_accum {info['grad_accum']})")
        return 0
    missing = [flag for flag, v in (("--data", args.data), ("--tokenizer", args.tokenizer), ("--out", args.out)) if not v]
    if missing:
        raise ConfigError(f"pgolf train needs {', '.join(missing)} (or --dry-run)")
    summary = train(cfg, args.data, args.tokenizer, args.out, resume=args.resume, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("val_bpb", "val_bpb_prequant", "steps", "train_seconds", "artifact_bytes", "artifact")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pgolf_train`` / ``torchrun -m pgolf_train``: the ``train`` command."""
    parser = argparse.ArgumentParser(prog="pgolf_train")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):  # `torchrun -m pgolf_train --config ...` means train
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"pgolf train: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
