"""Data-parallel replicas: R engines, each in its own process, behind one OpenAI-compatible API.

The idea (vLLM's and SGLang's data-parallel serving): when one engine's batch is full, a second
copy of the model on other cores or GPUs doubles what the server holds at once; no activation
crosses between replicas, only requests and their outputs. Each replica is a whole engine
(``run_replica`` in ``serve/replica.py``) that takes the engine config as it is, so a replica may
itself be tensor- or pipeline-parallel. The router picks a replica per request by load, keeping
prompts that share a prefix on the replica whose prefix cache holds it (``serve/routing.py``).

    effinfer serve --model DIR --data-parallel-size 2

``DataParallelEngine`` answers what ``AsyncLLMEngine`` answers (``add_request`` -> a
``RequestStream``, ``abort``, ``stats``, ``start``/``shutdown``), so the app serves either. A
replica that dies fails the requests it held (500, or an error event in a stream) and the server
goes on with the others. Transport: ``multiprocessing`` pipes (pickled tuples), one per replica,
read by one thread per replica that hands each message to the event loop. See docs/distributed.md.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from effinfer.config import ConfigError, EngineConfig, ModelConfig
from effinfer.engine.async_engine import EngineDeadError, EngineError, RequestStream, StreamingEngine
from effinfer.engine.engine import LLMEngine
from effinfer.engine.stats import EngineStats
from effinfer.loading.checkpoint import open_checkpoint
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import SamplingParams
from effinfer.serve.metrics import ReplicaCounts
from effinfer.serve.replica import ReplicaInfo, rebuild_error, run_replica
from effinfer.serve.routing import NoReplicaError, Router
from effinfer.tokenizer import Tokenizer

__all__ = ["DataParallelEngine", "ReplicaHandle", "ReplicaPlacement", "plan_placements"]

logger = logging.getLogger(__name__)

# Seconds a replica gets to stop after "shutdown" before it is killed (a tensor-parallel one
# stops its ranks first: over 10 s on a loaded 2-core machine).
REPLICA_STOP_SECONDS = 30.0


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where one replica runs: its engine config (threads filled in), its cores, its GPUs."""

    config: EngineConfig
    cores: list[int] | None  # CPU cores it is pinned to; None: not pinned
    cuda_devices: str | None  # its CUDA_VISIBLE_DEVICES; None: inherited


def plan_placements(
    config: EngineConfig,
    num_replicas: int,
    cores: list[int] | None = None,
    num_gpus: int | None = None,
) -> list[ReplicaPlacement]:
    """Split the cores (or GPUs) into ``num_replicas`` equal shares, one per replica.

    On CPU, replica k is pinned to the k-th slice of the cores this process may use and runs that
    many threads unless ``config.num_threads`` says otherwise; with fewer cores than replicas
    nothing is pinned and each replica gets one thread. On CUDA, with at least one GPU per replica,
    replica k sees only its share (``CUDA_VISIBLE_DEVICES``), so its ``cuda`` is its own first GPU.
    Nothing else in the config changes: a replica is the engine the config describes.
    """
    if config.device == "cpu":
        cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
        share = len(cores) // num_replicas
        if share == 0:
            logger.warning("%d replicas on %d cores: they share the cores", num_replicas, len(cores))
            single = dataclasses.replace(config, num_threads=config.num_threads or 1)
            return [ReplicaPlacement(single, None, None)] * num_replicas
        return [
            ReplicaPlacement(
                dataclasses.replace(config, num_threads=config.num_threads or share),
                cores[k * share : (k + 1) * share],
                None,
            )
            for k in range(num_replicas)
        ]
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    if config.device not in ("cuda", "cuda:0") or num_gpus < num_replicas:
        logger.warning("%d replicas on %s with %d GPUs: they share it", num_replicas, config.device, num_gpus)
        return [ReplicaPlacement(config, None, None)] * num_replicas
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(num_gpus)]
    share = num_gpus // num_replicas
    return [
        ReplicaPlacement(config, None, ",".join(gpus[k * share : (k + 1) * share]))
        for k in range(num_replicas)
    ]


class ReplicaHandle:
    """The router's end of one replica: its process, pipe, reader thread, load and counters."""

    def __init__(self, index: int, process, conn) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.info: ReplicaInfo | None = None
        self.stats: EngineStats | None = None
        self.alive = True
        self.num_open_seqs = 0  # routed and not finished: its running + waiting, as the router sees it
        self.num_routed = 0
        self.num_generated_tokens = 0
        self.send_lock = threading.Lock()
        self.reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: tuple) -> bool:
        """Send, or return False if the replica's pipe is closed (it died; its reader says so)."""
        with self.send_lock:
            try:
                self.conn.send(message)
                return True
            except (OSError, ValueError):
                return False


class DataParallelEngine(StreamingEngine):
    """``num_replicas`` engine processes behind the interface of one ``AsyncLLMEngine``.

    Construction starts the replicas and waits until every one has loaded the model; a replica
    that fails to start stops them all and raises its error. ``engine_factory(model, config)``
    builds each replica's engine inside its process (it must be importable by name: spawn).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        config: EngineConfig,
        num_replicas: int,
        engine_factory: Callable[[str | Path, EngineConfig], LLMEngine] = LLMEngine,
        affinity_slack: int | None = None,
    ) -> None:
        if num_replicas < 1:
            raise ConfigError(f"the data-parallel size must be at least 1, got {num_replicas}")
        super().__init__()
        checkpoint = open_checkpoint(model, config.quantization)
        self.model_path: Path = checkpoint.path
        self.model_config: ModelConfig = config.model_layout(checkpoint.model_config)
        self.tokenizer: Tokenizer = checkpoint.tokenizer
        self.config = config
        self.num_replicas = num_replicas
        # "Much busier" than the least loaded: a quarter of a batch more is worth a prefill saved.
        slack = max(2, config.max_num_seqs // 4) if affinity_slack is None else affinity_slack
        self.router = Router(num_replicas, config.block_size, slack)
        self.replicas = self._spawn(str(model), plan_placements(config, num_replicas), engine_factory)
        self.max_model_len = min(r.info.max_model_len for r in self.replicas)
        self._routes: dict[str, tuple[int, int]] = {}  # open request -> (its replica, its sequences)
        self._unaccepted: dict[str, asyncio.Future] = {}  # ids sent and not yet accepted or rejected
        self._calls: dict[int, tuple[int, concurrent.futures.Future]] = {}  # id -> (replica, result)
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopped = False
        atexit.register(self.shutdown)  # before multiprocessing's own exit hook joins the replicas

    # ---- starting and stopping ----------------------------------------------------------------
    def _spawn(self, model: str, placements: list[ReplicaPlacement], factory) -> list[ReplicaHandle]:
        context = multiprocessing.get_context("spawn")
        replicas = []
        for k, placement in enumerate(placements):
            ours, theirs = context.Pipe()
            # Not a daemon: a replica that is itself tensor- or pipeline-parallel starts processes.
            process = context.Process(
                target=run_replica,
                args=(theirs, model, placement.config, placement.cores, placement.cuda_devices, factory),
                name=f"effinfer-replica-{k}",
            )
            process.start()
            theirs.close()  # else the pipe never reports the replica's death
            replicas.append(ReplicaHandle(k, process, ours))
        try:
            self._wait_ready(replicas)
        except BaseException:
            for replica in replicas:
                replica.process.kill()
                replica.process.join()
            raise
        return replicas

    @staticmethod
    def _wait_ready(replicas: list[ReplicaHandle]) -> None:
        pending = {r.conn: r for r in replicas}
        while pending:
            for conn in wait(list(pending)):
                replica = pending.pop(conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    replica.process.join()
                    raise EngineDeadError(
                        f"data-parallel replica {replica.index} exited while loading the model "
                        f"(exit code {replica.process.exitcode})"
                    ) from None
                if message[0] == "start_failed":
                    error = rebuild_error(message[1], message[2])
                    raise type(error)(f"data-parallel replica {replica.index}: {error}")
                replica.info = message[1]
                replica.stats = replica.info.stats

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Deliver to ``loop`` (default: the running loop) from now on. Idempotent."""
        if self._started:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._started = True
        for replica in self.replicas:
            replica.reader = threading.Thread(
                target=self._read,
                args=(replica,),
                name=f"effinfer-replica-{replica.index}-reader",
                daemon=True,
            )
            replica.reader.start()

    def shutdown(self, timeout: float = REPLICA_STOP_SECONDS) -> None:
        """Stop every replica (killing one that does not stop in ``timeout``); open requests fail."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        for replica in self.replicas:
            replica.send(("shutdown",))
        for replica in self.replicas:
            replica.process.join(timeout)
            if replica.process.is_alive():
                logger.warning("data-parallel replica %d did not stop; killing it", replica.index)
                replica.process.kill()
                replica.process.join()
            replica.alive = False
            replica.conn.close()
            if replica.reader is not None:
                replica.reader.join(timeout)
        try:
            self._fail(list(self._streams), EngineDeadError("the server is shutting down"))
        except RuntimeError:
            pass  # at interpreter exit the streams' event loop is already closed

    @property
    def is_running(self) -> bool:
        """Started, not shut down, and at least one replica alive."""
        return self._started and not self._stopped and any(r.alive for r in self.replicas)

    # ---- requests -------------------------------------------------------------------------------
    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Route and queue a request; returns its stream once its replica accepted it.

        Raises what ``AsyncLLMEngine.add_request`` raises: the engine's PromptError,
        InvalidSamplingParams or ValueError, and EngineDeadError when no replica is left.
        """
        if not self._started:
            self.start()
        if not self.is_running:
            raise EngineDeadError("the engine is not running: every data-parallel replica has stopped")
        stream = self._open(request_id)
        loads = [r.num_open_seqs if r.alive else None for r in self.replicas]
        try:
            k = self.router.choose(prompt if isinstance(prompt, list) else None, loads)
        except NoReplicaError as e:
            self._forget(request_id)
            raise EngineDeadError(str(e)) from None
        replica = self.replicas[k]
        accepted = self._loop.create_future()
        self._routes[request_id] = (k, params.n)
        self._unaccepted[request_id] = accepted
        replica.num_open_seqs += params.n
        replica.num_routed += 1
        replica.send(("add", request_id, prompt, params))
        try:
            return await self._await_acceptance(stream, accepted)
        finally:
            self._unaccepted.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (a no-op if it already finished)."""
        k, _ = self._routes.get(request_id, (None, 0))
        if self._forget(request_id) is not None and self.replicas[k].alive:
            self.replicas[k].send(("abort", request_id))

    def run_on_replica(self, index: int, fn: Callable[..., Any], *args, timeout: float = 60.0) -> Any:
        """``fn(engine, *args)`` in replica ``index``'s process, beside its engine thread; its result.

        For inspection and tests (``fn`` must be importable by name and its result picklable).
        Blocks: call it from any thread but the event loop's.
        """
        call_id = next(self._call_ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls[call_id] = (index, future)
        try:
            if not self.replicas[index].send(("call", call_id, fn, args)):
                raise EngineDeadError(f"data-parallel replica {index} is not running")
            ok, value = future.result(timeout)
        finally:
            self._calls.pop(call_id, None)
        if not ok:
            raise EngineError(f"replica {index}: {value}")
        return value

    # ---- what the server shows ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The replicas' stats summed; a stopped replica holds nothing but keeps its counters."""
        snapshots = [_held_nothing(r.stats) if not r.alive else r.stats for r in self.replicas]
        return _sum_stats(snapshots)

    def replica_counts(self) -> list[ReplicaCounts]:
        """Per replica: alive, requests routed, tokens generated and its last stats (for /metrics)."""
        return [
            ReplicaCounts(
                r.index,
                r.alive,
                r.num_routed,
                r.num_generated_tokens,
                r.stats if r.alive else _held_nothing(r.stats),
            )
            for r in self.replicas
        ]

    # ---- messages from the replicas ---------------------------------------------------------------
    def _read(self, replica: ReplicaHandle) -> None:
        """One replica's reader thread: stats and call results here, the rest on the event loop."""
        while True:
            try:
                message = replica.conn.recv()
            except (EOFError, OSError):
                for index, future in list(self._calls.values()):
                    if index == replica.index and not future.done():
                        future.set_result((False, "the replica stopped"))
                self._post(self._replica_stopped, replica)
                return
            kind = message[0]
            if kind == "stats":
                replica.stats = message[1]  # one reference swap: readers see the old or the new
            elif kind == "result":
                _, future = self._calls.get(message[1], (None, None))
                if future is not None and not future.done():
                    future.set_result((message[2], message[3]))
            else:
                self._post(self._on_message, replica, message)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the event loop is closed: nobody is waiting any more

    def _on_message(self, replica: ReplicaHandle, message: tuple) -> None:
        kind, request_id = message[0], message[1]
        if kind in ("accepted", "rejected"):
            future = self._unaccepted.get(request_id)
            if future is not None and not future.done():
                if kind == "rejected":
                    future.set_exception(rebuild_error(message[2], message[3]))
                else:
                    future.set_result(None)
            return
        stream = self._streams.get(request_id)
        if stream is None:
            return  # aborted while the replica worked on it
        if kind == "output":
            output: RequestOutput = message[2]
            replica.num_generated_tokens += sum(len(c.delta_token_ids) for c in output.outputs)
            if output.finished:
                self._forget(request_id)
            stream.put(output)
        elif kind == "failed":
            self._fail([request_id], rebuild_error(message[2], message[3]))

    def _replica_stopped(self, replica: ReplicaHandle) -> None:
        if not replica.alive:
            return
        replica.alive = False
        if self._stopped:
            return
        replica.process.join(1.0)
        why = f"data-parallel replica {replica.index} stopped (exit code {replica.process.exitcode})"
        logger.error("%s; failing its requests, serving on the others", why)
        held = [rid for rid, (k, _) in self._routes.items() if k == replica.index]
        for rid in held:
            future = self._unaccepted.get(rid)
            if future is not None and not future.done():
                self._forget(rid)
                future.set_exception(EngineDeadError(why))
        self._fail(
            [rid for rid in held if rid in self._streams], EngineError(f"{why} while running the request")
        )

    def _forget(self, request_id: str) -> RequestStream | None:
        """Also give the request's replica its load back."""
        route = self._routes.pop(request_id, None)
        if route is not None:
            self.replicas[route[0]].num_open_seqs -= route[1]
        return super()._forget(request_id)


def _held_nothing(stats: EngineStats) -> EngineStats:
    """A stopped replica's stats: its counters, with nothing running, waiting or held."""
    return dataclasses.replace(
        stats,
        num_running=0,
        num_waiting=0,
        num_requests=0,
        num_free_blocks=stats.num_blocks,
        blocks_in_use_per_group=tuple(0 for _ in stats.blocks_in_use_per_group),
    )


def _sum_stats(snapshots: list[EngineStats]) -> EngineStats:
    totals = {}
    for field in dataclasses.fields(EngineStats):
        values = [getattr(s, field.name) for s in snapshots]
        if isinstance(values[0], tuple):
            totals[field.name] = tuple(sum(column) for column in zip(*values))
        else:
            totals[field.name] = sum(values)
    return EngineStats(**totals)
