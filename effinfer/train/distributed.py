"""Data parallelism over processes started by ``torchrun`` (PyTorch DDP, Li et al. 2020).

Every process holds the whole model and a disjoint slice of each global batch; after the
backward pass ``DistributedDataParallel`` averages the gradients, so every process takes the
same optimizer step. The backend is gloo on CPU and NCCL on GPU. A run without torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK) is a single process and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def init_distributed() -> Distributed:
    """One process, or one of WORLD_SIZE started by torchrun (which sets RANK and LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)
