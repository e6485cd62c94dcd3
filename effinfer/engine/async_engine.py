"""``AsyncLLMEngine``: the synchronous ``LLMEngine`` driven from an asyncio program (the HTTP server).

One background thread owns the engine and loops ``step()`` while there is work, sleeping on a
condition when there is none. The event loop never touches the engine: it puts "add" and "abort"
commands in an inbox that the engine thread applies, in order, between steps, and each step's
outputs come back to per-request streams through ``loop.call_soon_threadsafe``. A step that raises
fails the requests it was running, with an error, and the loop goes on serving the others.

    engine = AsyncLLMEngine(LLMEngine(path))
    stream = await engine.add_request(prompt, params, "req-1")  # raises PromptError etc. here
    async for output in stream: ...                             # closing it early aborts
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from effinfer.config import EngineConfig, ModelConfig
from effinfer.engine.engine import LLMEngine
from effinfer.engine.stats import EngineStats
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import SamplingParams
from effinfer.tokenizer import Tokenizer

__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineError",
    "EngineStats",
    "RequestStream",
    "StreamingEngine",
]

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request; that request is over."""


class EngineDeadError(EngineError):
    """The engine thread is not running (never started, shut down, or crashed)."""


class RequestStream:
    """The outputs of one request as they arrive. ``async for`` over it; ``close()`` aborts the request.

    When several outputs are waiting (a slow reader), they are merged into one whose deltas hold
    all of their text and tokens, so a reader never falls further behind than one update.
    """

    def __init__(self, request_id: str, engine: AsyncLLMEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Deliver an output or an error (called by the engine's side, on the event loop)."""
        self._items.append(item)
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        if isinstance(self._items[0], BaseException):
            self._done = True
            raise self._items.popleft()
        batch = []
        while self._items and not isinstance(self._items[0], BaseException):
            batch.append(self._items.popleft())
        output = batch[0] if len(batch) == 1 else _merge(batch)
        if output.finished:
            self._done = True
        return output

    @property
    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        """Stop reading; the engine aborts the request (and frees its KV blocks) if it is still running."""
        self._done = True
        self._items.clear()
        self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    last = outputs[-1]
    merged = [
        dataclasses.replace(
            completion,
            delta_text="".join(o.outputs[i].delta_text for o in outputs),
            delta_token_ids=[t for o in outputs for t in o.outputs[i].delta_token_ids],
        )
        for i, completion in enumerate(last.outputs)
    ]
    return dataclasses.replace(last, outputs=merged)


class StreamingEngine(abc.ABC):
    """What every engine the server drives shares, wherever its model runs: the open requests' streams.

    Subclasses (``AsyncLLMEngine`` here, ``serve/data_parallel.DataParallelEngine``) provide
    ``add_request`` and ``abort``, and call ``_forget`` when a request's stream is done with.
    """

    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}  # requests still open (loop thread only)

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    @abc.abstractmethod
    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request; its stream once the engine accepted it."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request (a no-op if it already finished)."""

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; the last one is finished. Stopping early aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _open(self, request_id: str) -> RequestStream:
        """A new stream for ``request_id``; ValueError if that id is still open."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = RequestStream(request_id, self)
        return stream

    async def _await_acceptance(self, stream: RequestStream, accepted: asyncio.Future) -> RequestStream:
        """``stream`` once the engine accepted its request; cancelled: aborted; refused: forgotten."""
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(stream.request_id)
            raise
        except BaseException:
            self._forget(stream.request_id)
            raise
        return stream

    def _forget(self, request_id: str) -> RequestStream | None:
        """Drop a request's stream (its outputs go nowhere from now on); the stream, if it was open."""
        return self._streams.pop(request_id, None)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._forget(request_id)
            if stream is not None:
                stream.put(error)


class AsyncLLMEngine(StreamingEngine):
    """Runs ``engine`` on one background thread; every public method is called from the event loop."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self._inbox: deque[tuple] = deque()
        self._wakeup = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._num_step_errors = 0
        self.dead_error: BaseException | None = None
        self._stats = self._snapshot()

    # ---- what the engine serves (fixed at start-up, so safe to read from any thread) ----------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_path(self) -> Path:
        return self.engine.model_path

    def stats(self) -> EngineStats:
        """The snapshot the engine thread published after its last loop; safe to read from any thread."""
        return self._stats

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread, delivering to ``loop`` (default: the running loop). Idempotent."""
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="effinfer-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after its current step; requests still open fail with EngineDeadError."""
        if self._thread is None:
            return
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the engine thread did not stop within %.0f s", timeout)
        else:
            for request_id in self.engine.unfinished_request_ids():
                self.engine.abort_request(request_id)
            self._inbox.clear()
            self._stats = self._snapshot()
        self._thread = None
        self._fail(list(self._streams), EngineDeadError("the server is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    # ---- requests ---------------------------------------------------------------------------
    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises what ``LLMEngine.add_request`` raises (PromptError, InvalidSamplingParams, ValueError
        for a duplicate id) before anything is streamed, and EngineDeadError if the engine is not running.
        """
        if self._thread is None:
            self.start()
        if not self.is_running:
            raise EngineDeadError("the engine is not running") from self.dead_error
        stream = self._open(request_id)
        accepted = self._loop.create_future()
        self._submit(("add", request_id, prompt, params, accepted))
        return await self._await_acceptance(stream, accepted)

    def abort(self, request_id: str) -> None:
        """Abort a request (a no-op if it already finished)."""
        if self._forget(request_id) is not None:
            self._submit(("abort", request_id))

    # ---- the event loop side ----------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        with self._wakeup:
            self._inbox.append(command)
            self._wakeup.notify()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted while the step ran
            if output.finished:
                self._forget(output.request_id)
            stream.put(output)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the event loop is closed: nobody is waiting any more

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wakeup:
                    while not (self._inbox or self._stopping or self.engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    if self._stopping:
                        return
                    commands = list(self._inbox)
                    self._inbox.clear()
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._stats = self._snapshot()
        except BaseException as e:  # a bug in this loop: fail everyone rather than hang them
            logger.exception("the engine thread crashed")
            self.dead_error = e
            self._post(self._fail_all, EngineDeadError(f"the engine thread crashed: {e!r}"))

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        _, request_id, prompt, params, accepted = command
        try:
            self.engine.add_request(prompt, params, request_id)
        except Exception as e:
            self._post(_settle, accepted, e)
        else:
            self._post(_settle, accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._num_step_errors += 1
            # The requests in the failed batch are the running ones; waiting ones were not touched.
            failed = sorted(self.engine.running_request_ids()) or self.engine.unfinished_request_ids()
            logger.exception("engine step failed; failing requests %s", failed)
            for request_id in failed:
                self.engine.abort_request(request_id)
            self._post(self._fail, failed, EngineError(f"the engine failed while running the request: {e!r}"))
            return
        if outputs:
            self._post(self._deliver, outputs)
        elif not self.engine.num_running:
            time.sleep(0.001)  # nothing could be scheduled: do not spin

    def _fail_all(self, error: BaseException) -> None:
        self._fail(list(self._streams), error)

    def _snapshot(self) -> EngineStats:
        return dataclasses.replace(self.engine.stats(), num_step_errors=self._num_step_errors)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return  # the caller was cancelled
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
