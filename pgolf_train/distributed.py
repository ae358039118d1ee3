"""Where a process sits in a run: joining and leaving torchrun's process group (NCCL on GPUs,
gloo on CPUs), the device, the micro-steps per rank."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from pgolf_train.config import ConfigError, TrainConfig
from pgolf_train.device import check_device


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


def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
