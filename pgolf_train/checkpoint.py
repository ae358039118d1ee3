"""Checkpoints and the run directory: what a run writes, resuming, --force keeping the previous
run until the new one is done, the final safetensors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pgolf_train.config import ConfigError, TrainConfig
from pgolf_train.distributed import DistInfo


CHECKPOINT_VERSION = 1


# Files a run writes into its directory; --force removes exactly these (nothing else of the user's).
RUN_FILES = ("train.log", "train.jsonl", "checkpoint.pt", "final_model.safetensors", "model.pgolf",
             "train_summary.json")


PREVIOUS_RUN = ".previous-run"  # where --force keeps the replaced run's files until the new run is done


# Fields that may differ between a checkpoint and the config it is resumed with.
RESUME_MUTABLE = {"train_log_every", "val_loss_every", "val_batch_tokens", "val_max_tokens", "checkpoint_every_s",
                  "checkpoint_every_steps", "device", "val_docs", "eval_seq_len", "eval_stride", "eval_ttt",
                  "eval_ttt_rank", "eval_ttt_lr", "eval_ttt_epochs", "eval_ttt_chunk", "eval_ttt_targets",
                  "eval_ttt_from_start", "eval_time_budget", "quantize_budget", "quantize_tolerance",
                  "fused", "sdpa_backend"}  # how the step computes, not what it computes


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


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], model_config: dict | None = None) -> None:
    """Write the pre-quantization weights (fp32) with the codec's safetensors writer; the model
    config goes into its metadata (JSON), so that `pgolf pack` carries it into the artifact."""
    from pgolf_codec.safetensors_io import write_safetensors

    meta = None if model_config is None else {"model_config": json.dumps(model_config, sort_keys=True)}
    write_safetensors(path, tensors, meta, overwrite=True)
