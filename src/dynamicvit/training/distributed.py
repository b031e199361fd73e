"""This process's place in a torchrun job: RANK, WORLD_SIZE and LOCAL_RANK select its share of the data
and its GPU; rank 0 alone logs, shows progress and writes files."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..runtime.device import resolve_device


@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this process joined the group, so it leaves it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str) -> tuple[DistEnv, torch.device]:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun).

    The backend is NCCL on CUDA and gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), resolve_device(device_spec)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is missing; launch multi-process training with torchrun") from None
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        initialized_here = True
    return DistEnv(rank, world, local_rank, initialized_here), device
