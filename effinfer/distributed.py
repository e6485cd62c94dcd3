"""Process groups for tensor and pipeline parallelism over ``torch.distributed``.

Megatron-LM (Shoeybi et al. 2019) lays the ranks out with tensor parallelism innermost: global
rank = pp_rank * tp_size + tp_rank, so the ranks of one tensor-parallel group are neighbours
(one machine, the fast link) and a pipeline group takes one rank from each stage. Rank 0 is the
driver: it owns the scheduler, sampling and the API; the others are workers.

Nothing here starts processes (``engine/executor.py`` does, or ``torchrun``). In one process,
with no ``init_parallel`` call, every size is 1, every collective returns its input unchanged
and no code path pays anything. The collectives count the bytes they carry per rank
(``comm_bytes``) so the cost of a parallel layout can be measured, not guessed.
"""

from __future__ import annotations

import datetime
import pickle
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from effinfer.config import ConfigError


@dataclass(frozen=True)
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    tp_group: Any = None  # torch ProcessGroup of this rank's tensor-parallel group (None alone)
    pp_group: Any = None
    tp_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's tensor-parallel group
    pp_ranks: tuple[int, ...] = (0,)
    # Every rank, for the driver's step broadcasts: a worker may wait on it as long as the server
    # idles, so it never times out (a dead peer still ends the wait with an error).
    control_group: Any = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size


_state = ParallelState()
_comm_bytes: Counter = Counter()
# How long a collective other than the step broadcast may wait for a peer (loading included).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
IDLE_TIMEOUT = datetime.timedelta(days=365)


def init_parallel(tp_size: int, pp_size: int = 1) -> ParallelState:
    """Build the tensor- and pipeline-parallel groups over the initialised default process group.

    Every rank must call this, in the same order (``new_group`` is collective). Sizes 1 and 1
    without a process group is the single-process default.
    """
    global _state
    if tp_size < 1 or pp_size < 1:
        raise ConfigError(f"parallel sizes must be >= 1, got tensor {tp_size} and pipeline {pp_size}")
    if tp_size * pp_size == 1 and not dist.is_initialized():
        _state = ParallelState()
        return _state
    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed initialised first")
    world = dist.get_world_size()
    if world != tp_size * pp_size:
        raise ConfigError(
            f"{world} processes cannot run tensor parallel {tp_size} x pipeline parallel {pp_size} "
            f"(that needs {tp_size * pp_size})"
        )
    rank = dist.get_rank()
    tp_group = pp_group = None
    tp_ranks = pp_ranks = (rank,)
    for stage in range(pp_size):  # every rank creates every group, keeping its own
        ranks = tuple(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            tp_group, tp_ranks = group, ranks
    for tp_rank in range(tp_size):
        ranks = tuple(range(tp_rank, world, tp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            pp_group, pp_ranks = group, ranks
    control = dist.new_group(list(range(world)), timeout=IDLE_TIMEOUT)
    _state = ParallelState(tp_size, pp_size, rank, tp_group, pp_group, tp_ranks, pp_ranks, control)
    return _state


def reset_parallel() -> None:
    """Back to one process (after the process group is destroyed)."""
    global _state
    _state = ParallelState()


def parallel_state() -> ParallelState:
    return _state


def tp_size() -> int:
    return _state.tp_size


def tp_rank() -> int:
    return _state.tp_rank


def tp_group():
    return _state.tp_group


def pp_size() -> int:
    return _state.pp_size


def pp_rank() -> int:
    return _state.pp_rank


def pp_group():
    return _state.pp_group


def is_driver() -> bool:
    """Rank 0: the process that schedules, samples and answers the API."""
    return _state.rank == 0


def default_backend(device: torch.device | str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(
    device: torch.device | str,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> None:
    """The default process group: from ``init_method`` (spawned workers) or from torchrun's environment."""
    kwargs = {"timeout": COLLECTIVE_TIMEOUT}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
    dist.init_process_group(default_backend(device), **kwargs)


# ---------------------------------------------------------------- collectives that count their bytes


def _count(op: str, tensor: torch.Tensor) -> None:
    _comm_bytes[op] += tensor.numel() * tensor.element_size()


def comm_bytes() -> dict[str, int]:
    """Bytes this rank handed to each collective since the last reset (its own payload, per op)."""
    return dict(_comm_bytes)


def reset_comm_bytes() -> None:
    _comm_bytes.clear()


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the tensor-parallel group (in place); ``x`` itself when alone."""
    if _state.tp_size == 1:
        return x
    _count("all_reduce", x)
    dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim``, in tensor-parallel rank order."""
    if _state.tp_size == 1:
        return x
    _count("all_gather", x)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x, group=_state.tp_group)
    return torch.cat(parts, dim=dim)


def broadcast_object(obj: Any = None, src: int = 0, device: torch.device | str = "cpu") -> Any:
    """``obj`` from global rank ``src`` on every rank of the world, pickled (tensors inside on the CPU).

    ``device``: where the byte buffers travel (a CUDA device under NCCL).
    """
    size = torch.zeros(1, dtype=torch.long, device=device)
    if dist.get_rank() == src:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
        size[0] = payload.numel()
        _count("broadcast", payload)
    group = _state.control_group
    dist.broadcast(size, src, group=group)
    if dist.get_rank() != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src, group=group)
    if dist.get_rank() == src:
        return obj
    return pickle.loads(payload.cpu().numpy().tobytes())


def all_reduce_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest ``value`` over every rank of the world (so all ranks size their caches alike)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
