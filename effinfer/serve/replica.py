"""One data-parallel replica: an ``AsyncLLMEngine`` in its own process, driven over a ``Connection``.

``DataParallelEngine`` (``serve/data_parallel.py``) starts ``run_replica`` with ``multiprocessing``
(spawn) and the two sides exchange picklable tuples over a ``multiprocessing.Pipe``:

    router -> replica   ("add", request_id, prompt, params)   ("abort", request_id)
                        ("call", call_id, fn, args)            ("shutdown",)
    replica -> router   ("ready", ReplicaInfo)   ("start_failed", error_kind, message)
                        ("accepted", request_id)  ("rejected", request_id, error_kind, message)
                        ("output", request_id, RequestOutput)  ("failed", request_id, error_kind, message)
                        ("stats", EngineStats)    ("result", call_id, ok, value)

Errors cross as (class name, message) and are rebuilt from a fixed list, so every error the engine
raises for a request arrives as the same type the one-process server sees. The replica leaves when
told to or when the router's end of the pipe closes (the router died): replicas die with the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from effinfer.config import ConfigError, EngineConfig
from effinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineError
from effinfer.engine.engine import LLMEngine, PromptError
from effinfer.engine.stats import EngineStats
from effinfer.sampling_params import InvalidSamplingParams

logger = logging.getLogger(__name__)

# How often an idle replica checks whether its stats changed (a busy one sends them with each output).
STATS_INTERVAL_SECONDS = 0.05

_ERROR_TYPES = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        PromptError,
        InvalidSamplingParams,
        EngineDeadError,
        EngineError,
        ValueError,
        FileNotFoundError,
        OSError,
    )
}


def rebuild_error(kind: str, message: str) -> Exception:
    """The exception a replica reported as (class name, message); unknown kinds become EngineError."""
    return _ERROR_TYPES.get(kind, EngineError)(message)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica reports once its engine is loaded."""

    pid: int
    max_model_len: int
    num_threads: int
    stats: EngineStats


def run_replica(
    conn,
    model: str | Path,
    config: EngineConfig,
    cores: list[int] | None,
    cuda_devices: str | None,
    engine_factory: Callable[[str | Path, EngineConfig], LLMEngine],
) -> None:
    """The replica process's main: load the engine on its cores or GPUs, then serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the router's: it shuts replicas down
    if cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices  # before anything initialises CUDA
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        engine = engine_factory(model, config)
    except Exception as e:
        conn.send(("start_failed", type(e).__name__, str(e)))
        return
    info = ReplicaInfo(os.getpid(), engine.max_model_len, torch.get_num_threads(), engine.stats())
    conn.send(("ready", info))
    asyncio.run(_ReplicaServer(conn, AsyncLLMEngine(engine)).run())


class _ReplicaServer:
    """Applies the router's commands to the engine and sends back outputs, stats and results."""

    def __init__(self, conn, engine: AsyncLLMEngine) -> None:
        self.conn = conn
        self.engine = engine
        self._tasks: dict[str, asyncio.Task] = {}
        self._stop = asyncio.Event()
        self._last_stats: EngineStats | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.engine.start(loop)
        threading.Thread(target=self._read, args=(loop,), name="effinfer-replica-inbox", daemon=True).start()
        while not self._stop.is_set():
            self._send_stats()
            try:
                await asyncio.wait_for(self._stop.wait(), STATS_INTERVAL_SECONDS)
            except asyncio.TimeoutError:
                pass
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.engine.shutdown()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = ("shutdown",)  # the router is gone, and with it everyone who asked
            loop.call_soon_threadsafe(self._handle, message)
            if message[0] == "shutdown":
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params = message
            self._tasks[request_id] = asyncio.ensure_future(self._serve(request_id, prompt, params))
        elif kind == "abort":
            task = self._tasks.get(message[1])
            if task is not None:
                task.cancel()  # closing the stream aborts the request in the engine
        elif kind == "call":
            _, call_id, fn, args = message
            try:
                reply = ("result", call_id, True, fn(self.engine.engine, *args))
            except Exception as e:
                reply = ("result", call_id, False, f"{type(e).__name__}: {e}")
            try:
                self.conn.send(reply)
            except (OSError, ValueError):
                self._stop.set()
            except Exception as e:  # the result does not pickle
                self._send(("result", call_id, False, f"the result cannot be sent: {e}"))
        elif kind == "shutdown":
            self._stop.set()

    async def _serve(self, request_id: str, prompt, params) -> None:
        try:
            try:
                stream = await self.engine.add_request(prompt, params, request_id)
            except Exception as e:
                self._send(("rejected", request_id, type(e).__name__, str(e)))
                return
            self._send(("accepted", request_id))
            try:
                async for output in stream:
                    self._send(("output", request_id, output))
                    self._send_stats()
            except EngineError as e:
                self._send(("failed", request_id, type(e).__name__, str(e)))
            finally:
                stream.close()
        finally:
            self._tasks.pop(request_id, None)

    def _send_stats(self) -> None:
        stats = self.engine.stats()
        if stats != self._last_stats:
            self._last_stats = stats
            self._send(("stats", stats))

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):  # the router closed its end: stop serving
            self._stop.set()
