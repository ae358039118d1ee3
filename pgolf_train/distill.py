"""Knowledge distillation inside the training budget: teacher(s) first, then the student on soft targets.

One run, no external data. With ``distill_teacher_frac = f`` the budget ``B`` (the clock, or the
iterations when there is no clock) is split in two phases, each run by the trainer's own loop,
optimizers and schedule (each with its own warm-down and its own compile warm-up outside the
budget):

1. teacher phase, ``f·B``: ``train()`` of ``teacher_config(cfg)`` into ``OUT/teacher/`` without an
   export (the teacher is never quantized nor written into an artifact). Its pre-quantization bpb
   is the run's ``teacher_val_bpb``. With ``distill_generations = G > 1`` that phase is itself a
   distillation run (recursively): G teachers in turn, each on ``f·B/G`` and each distilled from the
   one before — born-again networks when ``teacher_overrides`` is empty (same model as the student);
2. student phase, ``(1−f)·B``: ``cfg`` trained with the per-micro-batch loss

       loss = α·CE(student, hard targets) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))

   where ``t``, ``s`` are the teacher's and student's logits ``[B, T, V]`` (soft-capped, float32),
   the KL is summed over the vocabulary and averaged over tokens (nats), and α follows
   ``distill_alpha_schedule`` over the student's share. The teacher runs on the fly on the
   student's own micro-batch (eval mode, no grad, bf16 autocast on CUDA, compiled like the student):
   on several ranks each rank runs it on its own shard, so teacher and student see the same split.

The student's artifact is the only output that counts; QAT, EMA, depth recurrence and DDP apply
to the student unchanged (this module only replaces the loss of ``train_step``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_train.config import (TrainConfig, student_config, teacher_config,  # noqa: F401 (the phases' configs live in config)
                                teacher_iterations)
from pgolf_train.model import GPT

TEACHER_DIR = "teacher"  # the teacher phase's run directory, inside the run's
def alpha_at(cfg: TrainConfig, frac: float) -> float:
    """The hard-label weight α at fraction ``frac`` ∈ [0, 1] of the student's budget."""
    f = min(max(frac, 0.0), 1.0)
    a, b = cfg.distill_alpha, cfg.distill_alpha_end
    if cfg.distill_alpha_schedule == "linear":
        return a + (b - a) * f
    if cfg.distill_alpha_schedule == "cosine":
        return a + (b - a) * 0.5 * (1.0 - math.cos(math.pi * f))
    return a


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------

def distill_losses(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """Hard-label CE and KL(teacher_T ‖ student_T), both mean nats per token (float32 scalars).

    ``student_logits``, ``teacher_logits``: ``[B, T, V]``; ``targets``: long ``[B, T]``. The CE is
    computed exactly as ``GPT.token_losses(...).mean()`` is, so that α = 1 trains bit for bit like
    the plain trainer. The KL is not multiplied by T² here (the caller weighs it).
    """
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets).mean()
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return ce, kl


class Distiller:
    """The student's loss function for ``train_step``: ``loss_fn(model, x, y) -> scalar``.

    Holds the frozen teacher (eval mode, ``requires_grad=False``, compiled when ``cfg.compile``)
    and the current α (``set_progress`` once per step). Per step it accumulates the CE and KL on the
    device; ``stats()`` reads them (a host sync: call it on log steps only).
    """

    def __init__(self, teacher: GPT, cfg: TrainConfig) -> None:
        from pgolf_train.build import compile_model

        if teacher.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.cfg.vocab_size} != student's {cfg.vocab_size}")
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_forward = compile_model(self.teacher) if cfg.compile else self.teacher
        self.losses = (torch.compile(distill_losses, dynamic=False, fullgraph=True) if cfg.compile
                       else distill_losses)
        self.temperature = cfg.distill_temperature
        self.alpha = alpha_at(cfg, 0.0)
        self._sums: list[Tensor] | None = None
        self._micro = 0

    def set_progress(self, frac: float) -> float:
        """Start a step at fraction ``frac`` of the student's budget; returns its α."""
        self.alpha = alpha_at(self.cfg, frac)
        self._sums, self._micro = None, 0
        return self.alpha

    def teacher_logits(self, x: Tensor) -> Tensor:
        """x: long ``[B, T]`` → the teacher's float32 logits ``[B, T, V]`` (no autograd graph)."""
        from pgolf_train.build import autocast_ctx

        with torch.no_grad(), autocast_ctx(self.cfg, x.device):
            return self.teacher_forward(x)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """One micro-batch: x, y long ``[B, T]`` → α·CE + (1 − α)·T²·KL (scalar, differentiable)."""
        from pgolf_train.build import autocast_ctx

        t_logits = self.teacher_logits(x)
        with autocast_ctx(self.cfg, x.device):
            s_logits = model(x)
        ce, kl = self.losses(s_logits, t_logits, y, self.temperature)
        parts = torch.stack((ce.detach(), kl.detach()))
        self._sums = parts if self._sums is None else self._sums + parts
        self._micro += 1
        # α and T are Python floats applied outside the compiled graph: a changing α never recompiles.
        return self.alpha * ce + (1.0 - self.alpha) * (self.temperature ** 2) * kl

    def stats(self) -> dict[str, float]:
        """This step's mean CE and KL over its micro-batches (nats/token) and α; syncs with the device."""
        if self._sums is None:
            return {"alpha": self.alpha}
        ce, kl = (self._sums / self._micro).tolist()
        return {"ce": ce, "kl": kl, "alpha": self.alpha}


# ---------------------------------------------------------------------------------------------
# the teacher phase
# ---------------------------------------------------------------------------------------------

def load_teacher(tcfg: TrainConfig, weights: Path, device: torch.device) -> GPT:
    """The teacher of config ``tcfg`` with the weights of ``weights`` (safetensors), frozen on ``device``."""
    from pgolf_codec.safetensors_io import read_safetensors

    tensors, _ = read_safetensors(weights)
    model = GPT(tcfg.model_config())
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval().requires_grad_(False)


def run_teacher_phase(cfg: TrainConfig, data_dir: Path, tokenizer: Path, out_dir: Path, log: Any,
                      device: torch.device, *, resume: bool, force: bool, echo: bool,
                      train: Callable[..., dict[str, Any]]) -> tuple[GPT, dict[str, Any]]:
    """Train the teacher(s) of distillation run ``cfg`` on their share; the frozen teacher and its summary.

    The phase is ``train`` (the trainer's, passed in: this module sits below it) of
    ``teacher_config(cfg)`` in ``out_dir/teacher`` without an
    export. On ``resume`` a finished teacher (its ``train_summary.json`` exists) is loaded, not
    retrained; an unfinished one resumes from its own checkpoint. ``log`` is the run's ``RunLog``:
    the phase boundaries, the teacher's bpb and the phase times are recorded there (step 0).
    """
    tcfg = teacher_config(cfg)
    tdir = out_dir / TEACHER_DIR
    done = tdir / "train_summary.json"
    t0 = time.perf_counter()
    log(f"distillation: teacher phase ({cfg.distill_generations} generation(s)) on "
        + (f"{tcfg.max_wallclock_seconds:.1f}s" if cfg.max_wallclock_seconds > 0 else f"{tcfg.iterations} steps")
        + f" in {tdir}; teacher overrides {cfg.teacher_overrides!r}")
    log.record(event="phase", phase="teacher", step=0, budget_s=tcfg.max_wallclock_seconds,
               iterations=tcfg.iterations, generations=cfg.distill_generations)
    if resume and done.is_file():
        summary = json.loads(done.read_text(encoding="utf-8"))
        log(f"teacher already trained in {tdir}: loading it")
    else:
        summary = train(tcfg, data_dir, tokenizer, tdir, resume=resume, force=force, echo=echo, export=False)
    teacher = load_teacher(tcfg, tdir / "final_model.safetensors", device)
    if cfg.compile:  # the teacher's training graphs are done with; keep the recompile cache for the student
        torch._dynamo.reset()
    wall = time.perf_counter() - t0
    log(f"distillation: teacher done: {summary['steps']} steps, {summary['train_seconds']:.1f}s of training "
        f"({wall:.1f}s wall), {summary['params']:,} params, teacher val_bpb {summary['val_bpb_prequant']:.4f}")
    log.record(event="teacher_done", step=0, teacher_val_bpb=summary["val_bpb_prequant"],
               teacher_steps=summary["steps"], teacher_train_seconds=summary["train_seconds"],
               teacher_params=summary["params"], teacher_phase_wall_seconds=wall)
    return teacher, summary


def phase_summary(run_cfg: TrainConfig, teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """Summary fields of a distillation run: the teacher's bpb, time per phase and the whole budget.

    ``train_seconds`` becomes the run's total (teacher + student phases): that is what the budget
    counts. ``student`` is the student phase's summary from ``trainer.finish``.
    """
    return {
        "teacher_val_bpb": teacher["val_bpb_prequant"],
        "train_seconds": teacher["train_seconds"] + student["train_seconds"],
        "distill": {
            "teacher_frac": run_cfg.distill_teacher_frac, "generations": run_cfg.distill_generations,
            "teacher_overrides": run_cfg.teacher_overrides, "alpha": run_cfg.distill_alpha,
            "alpha_end": run_cfg.distill_alpha_end, "alpha_schedule": run_cfg.distill_alpha_schedule,
            "temperature": run_cfg.distill_temperature,
            "budget_seconds": run_cfg.max_wallclock_seconds, "iterations": run_cfg.iterations,
            "teacher_train_seconds": teacher["train_seconds"], "teacher_steps": teacher["steps"],
            "teacher_params": teacher["params"], "student_train_seconds": student["train_seconds"],
            "student_steps": student["steps"],
        },
    }
