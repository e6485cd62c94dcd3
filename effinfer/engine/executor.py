"""The executor: the model runner in one process, or one runner per rank under tensor parallelism.

Rank 0, the driver, keeps everything that decides (scheduler, block manager, sampler, API). For
each step it prepares the flat inputs (token ids, positions, slot mappings, block tables) and
broadcasts them; every rank then runs its shard of the model on the same inputs and the
vocabulary-parallel head hands the driver the full logits. The block tables are the driver's, so
every rank's KV cache (its heads' share) is laid out identically; all ranks agree on the number
of blocks before allocating (the smallest any rank can hold).

Two ways to start (``EngineConfig.tensor_parallel_size``, ``--tensor-parallel-size N``):
- one machine: ``LLM(model, tensor_parallel_size=2)`` spawns the N-1 workers itself
  (``torch.multiprocessing``); they die with the driver (``PR_SET_PDEATHSIG``) and a dead worker
  fails the step with ``WorkerError`` instead of hanging it;
- several machines: the same command on every rank under ``torchrun`` (``--nnodes``,
  ``--rdzv-endpoint``); rank 0 owns the scheduler and the API, the other ranks serve steps
  inside the engine's constructor and exit when the driver shuts down.
Backend gloo on CPU, NCCL on CUDA (``distributed.default_backend``).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from effinfer import distributed
from effinfer.config import ConfigError, EngineConfig, ModelConfig
from effinfer.engine.pipeline import PipelineRunner, PipelineTopology
from effinfer.engine.runner import ModelRunner
from effinfer.layers.parallel import check_tensor_parallel
from effinfer.loading.checkpoint import Checkpoint, open_checkpoint
from effinfer.models.registry import model_class
from effinfer.models.stage import split_layers

logger = logging.getLogger(__name__)

_STOP, _EXECUTE = "stop", "execute"


class WorkerError(RuntimeError):
    """A tensor-parallel worker died or lost contact: the step (and the engine) cannot go on."""


def start_runner(
    checkpoint: Checkpoint, config: EngineConfig, dtype: torch.dtype, max_model_len: int
) -> ModelRunner:
    """The engine's runner: a plain ``ModelRunner``, or the driver's end of a parallel group."""
    device = torch.device(config.device)
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if world == 1:
        model = checkpoint.load_model(dtype, device, max_model_len, config.show_progress)
        return ModelRunner(model, checkpoint.model_config, config, device, dtype, max_model_len)
    check_parallel_config(checkpoint.model_config, config)
    workers: list = []
    if not dist.is_initialized():
        if _launched_by_torchrun():
            distributed.init_process_group(device)
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            workers = _spawn_workers(world, init_method, checkpoint.path, config)
            distributed.init_process_group(device, 0, world, init_method)
    try:
        if dist.get_world_size() != world:
            raise ConfigError(
                f"{dist.get_world_size()} processes were launched for tensor parallel "
                f"{config.tensor_parallel_size} x pipeline parallel {config.pipeline_parallel_size} "
                f"({world} needed)"
            )
        runner = _build_parallel_runner(checkpoint, config, dtype, max_model_len, workers)
    except BaseException:  # e.g. a shard that cannot be cut: leave no process or group behind
        _stop_processes(workers)
        _leave_group()
        raise
    if dist.get_rank() != 0:  # a torchrun worker: serve the driver's steps, then leave the process
        runner.serve_forever()
        runner.shutdown()
        sys.exit(0)
    atexit.register(runner.shutdown)
    return runner


def check_parallel_config(model_config: ModelConfig, config: EngineConfig) -> None:
    """Refuse, before any process starts, what tensor or pipeline parallelism cannot run."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    family = model_class(model_config.architecture)
    if pp > 1:
        if not family.supports_pipeline:
            raise ConfigError(
                f"{model_config.architecture} cannot be split into pipeline stages yet; "
                "use --pipeline-parallel-size 1"
            )
        split_layers(model_config.num_layers, pp)  # at least one layer per stage
    if tp == 1:
        return
    if not family.supports_tensor_parallel:
        raise ConfigError(f"{model_config.architecture} does not support tensor parallelism yet")
    check_tensor_parallel(
        model_config.num_heads, model_config.num_kv_heads, model_config.intermediate_size, tp
    )
    if config.speculative_model not in (None, "ngram"):
        raise ConfigError(
            "a draft model does not run under tensor parallelism yet; use --speculative-model ngram"
        )


class ParallelModelRunner(PipelineRunner):
    """One rank's shard of the model (its pipeline stage's layers, its tensor-parallel slice of them);
    on the driver, ``execute`` first sends the step's micro-batches to the workers."""

    def __init__(self, *args, workers: list | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers or []  # the processes this driver spawned (none under torchrun)
        self.failure: str | None = None
        self.closed = False

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    def _num_blocks(self, budget: int) -> int:
        return distributed.all_reduce_min(super()._num_blocks(budget), self._comm_device)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def execute(self, inputs: list[tuple]) -> torch.Tensor | None:
        if distributed.is_driver():
            self._check_workers()
            try:
                distributed.broadcast_object((_EXECUTE, _move(inputs, "cpu")), device=self._comm_device)
                return super().execute(inputs)
            except RuntimeError as e:  # gloo / NCCL lost a peer
                self._fail(f"a tensor-parallel worker stopped answering: {e}")
        return super().execute(inputs)

    def serve_forever(self) -> None:
        """A worker's loop: run each step the driver broadcasts until it says stop."""
        while True:
            command, inputs = distributed.broadcast_object(device=self._comm_device)
            if command == _STOP:
                return
            super().execute(_move(inputs, self.device))

    def _check_workers(self) -> None:
        if self.failure is not None:
            raise WorkerError(self.failure)
        if self.closed:
            raise WorkerError("the engine was shut down: its tensor-parallel workers are gone")
        dead = [(rank, p) for rank, p in enumerate(self.workers, start=1) if p.poll() is not None]
        if dead:
            rank, process = dead[0]
            self._fail(
                f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code {process.returncode}"
            )

    def _fail(self, message: str) -> None:
        self.failure = message
        logger.error("%s; the engine cannot run more steps", message)
        self._stop_workers()
        raise WorkerError(message)

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (the driver's end also tells the workers)."""
        if self.closed:
            return
        self.closed = True
        if distributed.is_driver() and self.failure is None and dist.is_initialized():
            with contextlib.suppress(RuntimeError):
                distributed.broadcast_object((_STOP, None), device=self._comm_device)
        self._stop_workers()

    def _stop_workers(self) -> None:
        _stop_processes(self.workers, wait_s=10 if self.failure is None else 0)
        _leave_group()
        self.closed = True


def _stop_processes(processes: list[subprocess.Popen], wait_s: float = 0) -> None:
    """Let the workers finish (they were told to stop) for ``wait_s``, then kill what is left."""
    for process in processes:
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _leave_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()
    distributed.reset_parallel()


def _build_parallel_runner(
    checkpoint: Checkpoint, config: EngineConfig, dtype: torch.dtype, max_model_len: int, workers: list
) -> ParallelModelRunner:
    distributed.init_parallel(config.tensor_parallel_size, config.pipeline_parallel_size)
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
    elif config.num_threads is None:  # the ranks share the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // dist.get_world_size()))
    show_progress = config.show_progress and distributed.is_driver()
    state = distributed.parallel_state()
    stage = split_layers(checkpoint.model_config.num_layers, state.pp_size)[state.pp_rank]
    loaded_stage = stage if state.pp_size > 1 else None
    model = checkpoint.load_model(dtype, device, max_model_len, show_progress, loaded_stage)
    distributed.reset_comm_bytes()  # count what serving moves, not the load
    topology = PipelineTopology(stage, state.tp_size, state.tp_rank, group=state.control_group)
    return ParallelModelRunner(
        model,
        checkpoint.model_config,
        config,
        device,
        dtype,
        max_model_len,
        topology=topology,
        workers=workers,
    )


def run_worker(rank: int, world: int, init_method: str, model_path: str, config: EngineConfig) -> None:
    """A spawned worker: join the group, load this rank's shard, serve steps until the driver stops."""
    distributed.init_process_group(config.device, rank, world, init_method)
    checkpoint = open_checkpoint(model_path, config.quantization)
    checkpoint = dataclasses.replace(checkpoint, model_config=config.model_layout(checkpoint.model_config))
    dtype = config.resolve_dtype(checkpoint.model_config)
    max_model_len = config.context_length(checkpoint.model_config)
    runner = _build_parallel_runner(checkpoint, config, dtype, max_model_len, [])
    runner.serve_forever()
    runner.shutdown()


def _spawn_workers(world: int, init_method: str, model_path, config: EngineConfig) -> list[subprocess.Popen]:
    """Ranks 1..world-1 as fresh interpreters (no fork of a threaded driver, no re-import of its script)."""
    workers = []
    for rank in range(1, world):
        job = pickle.dumps((rank, world, init_method, str(model_path), config))
        command = [sys.executable, "-m", "effinfer.engine.parallel_worker", base64.b64encode(job).decode()]
        workers.append(subprocess.Popen(command, preexec_fn=_die_with_parent))
    return workers


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the driver process dies, however it dies (run in the child)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _move(obj, device):
    """``obj`` (tensors, tuples, lists, dataclasses of them) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(x, device) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _move(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj
