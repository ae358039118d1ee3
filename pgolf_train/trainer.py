"""The training run (`pgolf train`, registered in pgolf/training.py): wall-clock-bounded training, then
export to an artifact and exact bpb on it.

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

import contextlib
import copy
import datetime
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from pgolf_train.config import ConfigError, TrainConfig, load_recipe
from pgolf_train.ema import EMA
from pgolf_train.loader import DistributedTokenLoader
from pgolf_train.model import GPT
from pgolf_train.scoring import Scorer
from pgolf_train.shards import read_header
from pgolf_train.source import model_source
from pgolf_train.build import autocast_ctx, build_model, build_optimizers, compile_model, count_params  # noqa: F401
from pgolf_train.checkpoint import (CHECKPOINT_VERSION, PREVIOUS_RUN, RESUME_MUTABLE, RUN_FILES, _to_cpu,  # noqa: F401
                                    check_resume_config, gather_optimizer_states, load_checkpoint, prepare_out_dir,
                                    save_checkpoint, save_safetensors)
from pgolf_train.distributed import (DistInfo, dist_world, init_distributed, leave_group,  # noqa: F401
                                     resolve_grad_accum, synchronize)
from pgolf_train.runlog import RunLog, _atomic_write_text, code_hash, device_name, git_commit, package_versions  # noqa: F401
from pgolf_train.schedule import (budget_fraction, lr_multiplier, muon_momentum, muon_wd_multiplier,  # noqa: F401
                                  set_schedule)

ARTIFACT_LIMIT = 16_000_000


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# model, optimizers, schedule
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# evaluation and export
# ---------------------------------------------------------------------------------------------

def evaluate(model: nn.Module, val_tokens, byte_source, cfg: TrainConfig, device: torch.device, scorer: Scorer):
    """Exact bpb of ``model`` on the validation stream (split across ranks), by ``scorer``."""
    was_training = model.training
    result = scorer.score(model, val_tokens, byte_source, seq_len=cfg.train_seq_len,
                          batch_tokens=max(cfg.val_batch_tokens // max(dist_world(), 1), cfg.train_seq_len),
                          device=device)
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, data_dir: str | os.PathLike, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
          *, scorer: Scorer, resume: bool = False, force: bool = False, echo: bool = True,
          stop_at_step: int | None = None, export: bool = True) -> dict[str, Any]:
    """Train ``cfg`` on ``data_dir``'s shards, export ``out_dir/model.pgolf``, evaluate it; the summary.

    ``scorer`` (:class:`pgolf_eval.scorer.Scorer`, from the caller: the evaluator sits above this
    package) loads the val stream, scores the model in-run and before/after quantization, and
    decodes the artifact for the score that counts.

    ``stop_at_step`` ends the loop early without the export (the state stays in the checkpoint);
    it exists to test resuming. ``export=False`` stops at ``final_model.safetensors`` and the
    pre-quantization score (a distillation teacher). With ``distill_teacher_frac > 0`` the teacher
    phase (``pgolf_train.distill``) runs first, on its share of the budget, and this model trains on
    the rest with the soft-target loss.
    """
    # Contexts open over the compile and the steps (a pinned SDPA backend, which is process-global)
    # close on the way out whatever happens; the run itself closes them before the export.
    with contextlib.ExitStack() as steps_ctx:
        return _train(cfg, data_dir, tokenizer, out_dir, scorer=scorer, resume=resume, force=force, echo=echo,
                      stop_at_step=stop_at_step, export=export, steps_ctx=steps_ctx)


def _check_optional_kernels(cfg: TrainConfig, device: torch.device) -> None:
    """A ConfigError naming the fusion and the reason when ``cfg.fused`` asks for kernels of an
    optional dependency (``mlp``: quack; ``fa4``: flash-attn-4) that cannot run on ``device``."""
    names = {f.strip() for f in cfg.fused.split(",")}
    if "mlp" in names:
        from pgolf_train.fused_mlp import unavailable as mlp_unavailable

        if (why := mlp_unavailable(device)) is not None:
            raise ConfigError(f"fused: 'mlp' cannot run here: {why}")
    if "fa4" in names:
        from pgolf_train.fa4_attn import unavailable as fa4_unavailable

        if (why := fa4_unavailable(device)) is not None:
            raise ConfigError(f"fused: 'fa4' cannot run here: {why}")


def _train(cfg: TrainConfig, data_dir: str | os.PathLike, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
           *, scorer: Scorer, resume: bool, force: bool, echo: bool, stop_at_step: int | None, export: bool,
           steps_ctx: contextlib.ExitStack) -> dict[str, Any]:
    data_dir, tokenizer, out_dir = Path(data_dir), Path(tokenizer), Path(out_dir)
    t_start = time.perf_counter()
    di = init_distributed(cfg.device)
    device = di.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe(cfg.recipe)  # fail on a bad recipe now, not after ten minutes of training
    _check_optional_kernels(cfg, device)  # and on fused kernels this machine cannot run, before any file is written
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
                                                     resume=resume, force=force, echo=echo,
                                                     train=functools.partial(train, scorer=scorer))
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
    options: dict = {}
    if cfg.fused or cfg.sdpa_backend:
        from pgolf_train.fused import apply_fusions, compile_options, dynamo_context, parse_fusions, sdpa_context

        names = parse_fusions(cfg.fused)
        apply_fusions(base_model, cfg.fused, cfg.train_seq_len, device)
        options = compile_options(cfg.fused)
        steps_ctx.enter_context(sdpa_context(cfg.sdpa_backend))
        steps_ctx.enter_context(dynamo_context(cfg.fused))
        attention = ("flash varlen (documents)" if "varlen" in names else "FlashAttention 4" if "fa4" in names
                     else cfg.sdpa_backend or "torch's choice")
        log(f"fused kernels: {cfg.fused or 'none'}  attention: {attention}")
    model: nn.Module = compile_model(base_model, extra=options) if cfg.compile else base_model
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[di.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizers, muon = build_optimizers(cfg, base_model, device)
    params = list(base_model.parameters())
    val_tokens, byte_source = scorer.load_val(data_dir, tokenizer, cfg.vocab_size, cfg.val_max_tokens or None)
    train_files = DistributedTokenLoader(data_dir, 0, 1, 'cpu').stream.files
    train_tokens = sum(read_header(f) for f in train_files)
    log(f"data: {len(train_files)} train shards ({train_tokens:,} tokens), {val_tokens.size:,} val tokens")
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
            warm_mul = lr_multiplier(cfg, step, training_ms)
            set_schedule(optimizers, muon, warm_mul, muon_momentum(cfg, step),
                         muon_wd_multiplier(cfg, warm_mul, budget_fraction(cfg, step, training_ms)))
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
            res = evaluate(base_model, val_tokens, byte_source, cfg, device, scorer)
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
        set_schedule(optimizers, muon, mul, muon_momentum(cfg, step),
                     muon_wd_multiplier(cfg, mul, budget_fraction(cfg, step, elapsed_ms)))
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
    steps_ctx.close()
    base_model.head_loss = base_model.rope_cache = None  # the exported model and its scores take the reference path
    log(f"training done: {step} steps in {training_ms / 1000:.1f}s "
        f"({step * tokens_per_step / max(training_ms / 1000, 1e-9):,.0f} tok/s, "
        f"{training_ms / max(step, 1):.1f} ms/step; {step * tokens_per_step / max(train_tokens, 1):.1f} passes "
        "over the training tokens)")  # above 1 the same text comes round again: more steps may not pay
    if device.type == "cuda":
        log(f"peak memory: {torch.cuda.max_memory_allocated(device) // 2**20} MiB allocated")
    write_checkpoint()
    if stop_at_step is not None:
        if di.owns_group:
            leave_group()
        return {"steps": step, "train_seconds": training_ms / 1000}

    summary = finish(cfg, base_model, ema, recipe, di, log, out_dir, tokenizer, val_tokens, byte_source, scorer,
                     step=step, training_ms=training_ms, n_params=n_params, grad_accum=grad_accum, export=export)
    if teacher_summary is not None:
        from pgolf_train.distill import phase_summary

        summary.update(phase_summary(run_cfg, teacher_summary, summary))
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["train_tokens"] = train_tokens  # the training set; tokens_seen / train_tokens = its passes
    if di.master:
        _atomic_write_text(out_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(out_dir / PREVIOUS_RUN, ignore_errors=True)  # this run is complete
    if di.owns_group:
        leave_group()
    return summary


def finish(cfg: TrainConfig, base_model: GPT, ema: EMA | None, recipe, di: DistInfo, log: RunLog, out_dir: Path,
           tokenizer: Path, val_tokens, byte_source, scorer: Scorer, *, step: int, training_ms: float, n_params: int,
           grad_accum: int, export: bool = True) -> dict[str, Any]:
    """Export the final (EMA or raw) weights, evaluate them before and after quantization; the summary.

    ``export=False``: only ``final_model.safetensors`` and the pre-quantization score (no artifact)."""
    from pgolf_codec.container import write_artifact
    from pgolf_train.qat import qat_enabled, set_qat
    from pgolf_train.tokenizer import tokenizer_info

    device = di.device
    trained_qat = qat_enabled(base_model)
    set_qat(base_model, recipe, False)  # the pre-quantization numbers are of the plain weights
    if ema is not None:
        ema.copy_to(base_model)
        log(f"using EMA weights ({ema.updates} updates)")
    pre = evaluate(base_model, val_tokens, byte_source, cfg, device, scorer)
    log(f"pre-quantization: val_loss:{pre.val_loss:.4f} val_bpb:{pre.val_bpb:.4f} "
        f"({pre.tokens:,} tokens, {pre.seconds:.1f}s)")
    log.record(step=step, val_loss_prequant=pre.val_loss, val_bpb_prequant=pre.val_bpb, elapsed=training_ms / 1000,
               tokens=step * cfg.train_batch_tokens)
    # A model that ended training under QAT learned the fake-quantized function, not its float weights
    # (a ternary model's float weights alone scored 3.66 bpb against its 1.67): its own score is with QAT on,
    # and the quantization gap is measured from there.
    qat = None
    if trained_qat:
        set_qat(base_model, recipe, True)
        qat = evaluate(base_model, val_tokens, byte_source, cfg, device, scorer)
        set_qat(base_model, recipe, False)
        log(f"as trained (QAT fake-quant): val_loss:{qat.val_loss:.4f} val_bpb:{qat.val_bpb:.4f} "
            f"({qat.tokens:,} tokens, {qat.seconds:.1f}s)")
    trained = pre if qat is None else qat

    run = {"val_bpb_prequant": pre.val_bpb, "val_loss_prequant": pre.val_loss,
           "val_bpb_qat": None if qat is None else qat.val_bpb, "val_loss_qat": None if qat is None else qat.val_loss,
           "steps": step,
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
    qmodel = scorer.load_artifact(artifact, device)
    post = evaluate(qmodel, val_tokens, byte_source, cfg, device, scorer)
    log(f"post-quantization (artifact): val_loss:{post.val_loss:.4f} val_bpb:{post.val_bpb:.4f} "
        f"({post.val_bpb - trained.val_bpb:+.4f} from quantization{', against the QAT forward' if qat else ''})")
    log.record(step=step, val_loss=post.val_loss, val_bpb=post.val_bpb, elapsed=training_ms / 1000,
               tokens=step * cfg.train_batch_tokens)
    return {
        **run, "val_bpb": post.val_bpb, "val_loss": post.val_loss, "val_tokens": post.tokens, "val_bytes": post.bytes,
        "val_docs": post.docs, "val_per_doc": post.per_doc,  # length buckets, interval; per document
        "artifact_bytes": sizes[0], "model_bytes": sizes[1], "code_bytes": sizes[2],
        "limit_bytes": cfg.max_artifact_bytes, "fits": sizes[0] <= cfg.max_artifact_bytes,
        "artifact": str(artifact), "qat_start": cfg.qat_start, "recipe": str(recipe),
    }
