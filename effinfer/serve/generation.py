"""The two generation endpoints, ``/v1/completions`` and ``/v1/chat/completions``.

A request becomes one engine request per prompt (each with ``n`` completions). It is admitted
only if the server has room (else 503 with ``Retry-After``), its prompts are tokenized off the
event loop, and it is added to the engine before any byte is sent, so every validation error is a
plain 400. Then the outputs are either collected into one JSON body or sent as server-sent events
(``data: {...}`` chunks, ``data: [DONE]``), in the shapes the OpenAI API uses. Both endpoints
share that loop (``_respond``); what differs is only the shape of a choice, which each endpoint's
formatter (``formatters.py``) gives.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from effinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineError, RequestStream
from effinfer.engine.engine import PromptError
from effinfer.outputs import CompletionOutput, Logprob, RequestOutput
from effinfer.sampling_params import InvalidSamplingParams, SamplingParams
from effinfer.serve.errors import APIError, error_body, from_sampling_error
from effinfer.serve.formatters import ChatFormatter, CompletionFormatter, Formatter
from effinfer.serve.metrics import ServerMetrics
from effinfer.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from effinfer.serve.sse import EventStreamResponse, cancel_on_disconnect
from effinfer.tokenizer import Tokenizer, TokenizerError

RETRY_AFTER_SECONDS = 1


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    tokenizer: Tokenizer  # the engine's, with a chat template (the fallback one if the model has none)
    metrics: ServerMetrics
    max_queue: int | None  # sequences that may wait beyond the running batch; None: no limit
    num_replicas: int = 1  # data-parallel engines, each running up to max_num_seqs
    num_open_seqs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def capacity(self) -> int | None:
        if self.max_queue is None:
            return None
        return self.engine.config.max_num_seqs * self.num_replicas + self.max_queue

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                400,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---- one HTTP request's engine requests --------------------------------------------------------


class _Generation:
    """Admission, submission, metrics and the merged output stream of one HTTP request's prompts."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        arrival: float,
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.arrival = arrival  # time.monotonic() when the HTTP request came in
        self.streams: list[RequestStream] = []
        self._num_seqs = len(prompts) * params.n
        self._admitted = False
        self._first_token: list[float | None] = [None] * len(prompts)
        self._last: list[RequestOutput | None] = [None] * len(prompts)
        self._observed = [False] * len(prompts)
        self._closed = False

    async def start(self) -> None:
        self._admit()
        try:
            for i, prompt in enumerate(self.prompts):
                stream = await self.state.engine.add_request(prompt, self.params, f"{self.request_id}-{i}")
                self.streams.append(stream)
        except BaseException as e:
            self.close()
            if isinstance(e, PromptError):
                raise APIError(400, str(e), param="prompt", code="invalid_prompt") from None
            if isinstance(e, InvalidSamplingParams):
                raise from_sampling_error(e) from None
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), code="engine_unavailable") from None
            raise

    def _admit(self) -> None:
        capacity = self.state.capacity
        if capacity is not None:
            if self._num_seqs > capacity:
                raise APIError(
                    400,
                    f"this request needs {self._num_seqs} sequences (prompts x n), but the server "
                    f"takes at most {capacity} at a time",
                    param="n",
                )
            if self.state.num_open_seqs + self._num_seqs > capacity:
                raise APIError(
                    503,
                    "the server is at capacity; retry shortly",
                    code="server_busy",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
        self.state.num_open_seqs += self._num_seqs
        self._admitted = True

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, update) as updates arrive, from all prompts; raises EngineError."""
        if len(self.streams) == 1:
            async for output in self.streams[0]:
                self._track(0, output)
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    queue.put_nowait((i, output))
                queue.put_nowait((i, None))
            except EngineError as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    self._track(i, item)
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()

    def _track(self, i: int, output: RequestOutput) -> None:
        if self._first_token[i] is None and any(c.delta_token_ids for c in output.outputs):
            self._first_token[i] = time.monotonic()
        self._last[i] = output
        if output.finished and not self._observed[i]:
            self._observe(i)

    def _observe(self, i: int, error: bool = False) -> None:
        last = self._last[i]
        if last is None:
            reason = "error" if error else "abort"
            num_output = 0
        else:
            reason = last.outputs[0].finish_reason or ("error" if error else "abort")
            num_output = sum(len(c.token_ids) for c in last.outputs)
        self.state.metrics.observe_request(
            reason, len(self.prompts[i]), num_output, self.arrival, self._first_token[i], time.monotonic()
        )
        self._observed[i] = True

    def close(self, error: bool = False) -> None:
        """Abort what is still running, record what was not recorded, give the room back. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            stream.close()
        for i in range(len(self.streams)):
            if not self._observed[i]:
                self._observe(i, error)
        if self._admitted:
            self.state.num_open_seqs -= self._num_seqs

    def usage(self, finals: dict[int, RequestOutput]) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def collect(self, request: Request) -> dict[int, RequestOutput]:
        """The final output of every prompt; an engine failure is a 500, a client gone is an abort."""

        async def run() -> dict[int, RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            async for i, output in self.outputs():
                finals[i] = output
            return finals

        try:
            return await cancel_on_disconnect(request, run())
        except EngineError as e:
            self.close(error=True)
            raise APIError(500, str(e), code="engine_error") from None
        finally:
            self.close()


# ---- prompts ----------------------------------------------------------------------------------


def check_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``), which no tokenizer takes; refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400,
            f"{param} is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}",
            param,
        ) from None


async def _tokenize(state: ServerState, texts: list[str], param: str) -> list[list[int]]:
    for text in texts:
        check_unicode(text, param)
    return await asyncio.to_thread(lambda: [state.tokenizer.encode(text) for text in texts])


def _check_lengths(state: ServerState, prompts: list[list[int]], param: str) -> None:
    for ids in prompts:
        if not ids:
            raise APIError(400, f"{param} is empty: it must contain at least one token", param=param)
        if len(ids) >= state.max_model_len:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens long, but this model's context is {state.max_model_len} "
                "tokens and at least one must be left for generation",
                param=param,
                code="context_length_exceeded",
            )


def _check_stop_token_ids(state: ServerState, token_ids: list[int] | None) -> None:
    bad = [t for t in token_ids or [] if t >= state.vocab_size]
    if bad:
        raise APIError(
            400,
            f"stop_token_ids must be below the vocabulary size {state.vocab_size}; got {bad[:5]}",
            "stop_token_ids",
        )


async def completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = await _tokenize(state, [prompt], "prompt")
    elif not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    elif isinstance(prompt[0], str):
        prompts = await _tokenize(state, prompt, "prompt")
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    _check_lengths(state, prompts, "prompt")
    return prompts


async def chat_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    messages = [m.for_template() for m in req.messages]

    def render() -> list[int]:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        check_unicode(text, "messages")
        return state.tokenizer.encode(text, add_special_tokens=False)

    try:
        ids = await asyncio.to_thread(render)
    except TokenizerError as e:
        raise APIError(400, str(e), param="messages") from None
    _check_lengths(state, [ids], "messages")
    return ids


# ---- the two endpoints ------------------------------------------------------------------------


async def create_completion(state: ServerState, request: Request, body: dict) -> Response:
    arrival = time.monotonic()
    req = parse_request(CompletionRequest, body)
    params = _checked_params(state, req, req.max_tokens, req.logprobs)
    prompts = await completion_prompts(state, req.prompt)
    gen = _Generation(state, f"cmpl-{uuid.uuid4().hex}", prompts, params, arrival)
    return await _respond(state, request, req, gen, CompletionFormatter(params.logprobs))


async def create_chat_completion(state: ServerState, request: Request, body: dict) -> Response:
    arrival = time.monotonic()
    req = parse_request(ChatCompletionRequest, body)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _checked_params(state, req, max_tokens, req.num_logprobs)
    prompt = await chat_prompt(state, req)
    gen = _Generation(state, f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, arrival)
    return await _respond(state, request, req, gen, ChatFormatter(params.logprobs))


def _checked_params(
    state: ServerState,
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    state.check_model(req.model)
    problem = req.unsupported()
    if problem is not None:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")
    try:
        params = req.sampling_params(max_tokens, logprobs)
    except InvalidSamplingParams as e:
        raise from_sampling_error(e) from None
    _check_stop_token_ids(state, params.stop_token_ids)
    return params


# ---- one loop for both: collect, or stream --------------------------------------------------------


async def _respond(
    state: ServerState,
    request: Request,
    req: CompletionRequest | ChatCompletionRequest,
    gen: _Generation,
    formatter: Formatter,
) -> Response:
    """Submits ``gen`` (errors so far are plain 4xx/503), then streams it or answers with one body."""
    await gen.start()
    if req.stream:
        return EventStreamResponse(
            _events(state, gen, formatter, req.include_usage_in_stream), on_close=gen.close
        )
    finals = await gen.collect(request)
    n = gen.params.n
    choices = []
    for i in sorted(finals):
        for completion in finals[i].outputs:
            choice = formatter.choice(i * n + completion.index, completion)
            choice["finish_reason"] = completion.finish_reason
            choice["stop_reason"] = completion.stop_reason
            choices.append(choice)
    body = _envelope(state, gen, formatter.object, int(time.time()), choices)
    body["usage"] = gen.usage(finals)
    return Response(dumps(body), media_type="application/json")


async def _events(
    state: ServerState, gen: _Generation, formatter: Formatter, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per update with the choices that changed, then usage if asked, then [DONE]."""
    n = gen.params.n
    want_logprobs = gen.params.logprobs is not None
    finished: set[int] = set()
    finals: dict[int, RequestOutput] = {}
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = _envelope(state, gen, formatter.chunk_object, created, choices)
        if include_usage:
            data["usage"] = usage
        return f"data: {dumps(data)}\n\n"

    try:
        opening = formatter.opening(n)
        if opening:
            yield chunk(opening)
        async for i, output in gen.outputs():
            finals[i] = output
            choices = []
            for completion in output.outputs:
                index = i * n + completion.index
                if index in finished:
                    continue
                token_ids, logprobs = _delta_logprobs(completion)
                if not (completion.delta_text or completion.finished or (want_logprobs and token_ids)):
                    continue
                choice = formatter.delta(index, completion, token_ids, logprobs)
                choice["finish_reason"] = None
                if completion.finished:
                    finished.add(index)
                    choice["finish_reason"] = completion.finish_reason
                    choice["stop_reason"] = completion.stop_reason
                choices.append(choice)
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], gen.usage(finals))
    except EngineError as e:
        gen.close(error=True)
        yield f"data: {json.dumps(error_body(500, str(e), code='engine_error'))}\n\n"
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


def _envelope(state: ServerState, gen: _Generation, kind: str, created: int, choices: list[dict]) -> dict:
    return {
        "id": gen.request_id,
        "object": kind,
        "created": created,
        "model": state.model_name,
        "choices": choices,
    }


def _delta_logprobs(completion: CompletionOutput) -> tuple[list[int], list[dict[int, Logprob]]]:
    count = len(completion.delta_token_ids)
    if not count or completion.logprobs is None:
        return [], []
    return completion.delta_token_ids, completion.logprobs[len(completion.logprobs) - count :]
