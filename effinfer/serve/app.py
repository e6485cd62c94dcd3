"""The OpenAI-compatible HTTP app: ``build_app(engine, model_name, api_key, max_queue)``.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming or not),
``/tokenize``, ``/detokenize``, ``/metrics`` (Prometheus text) and ``/health``. Bodies are read
here, not by FastAPI, so that every failure (too large, not UTF-8, not JSON, wrong shape) becomes
an OpenAI-style 4xx; with an API key, every path but ``/health`` needs ``Authorization: Bearer KEY``.
The engine runs on its own thread (``AsyncLLMEngine``), started and stopped with the app.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
from contextlib import asynccontextmanager

import pydantic
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from effinfer.engine.async_engine import AsyncLLMEngine
from effinfer.serve.data_parallel import DataParallelEngine
from effinfer.serve.errors import APIError, error_response, from_validation_error
from effinfer.serve.generation import (
    ServerState,
    check_unicode,
    create_chat_completion,
    create_completion,
    dumps,
)
from effinfer.serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE
from effinfer.serve.metrics import ServerMetrics, render_replicas
from effinfer.serve.protocol import DetokenizeRequest, TokenizeRequest, parse_request
from effinfer.serve.sse import ClientDisconnected
from effinfer.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

ENDPOINTS = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
)


def chat_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer``, or a copy with the fallback chat template if the model ships none."""
    if tokenizer.chat_template is not None or tokenizer.chat_templates:
        return tokenizer
    logger.warning(
        "the model has no chat template; /v1/chat/completions uses the plain fallback "
        "(one 'role: content' line per message, then 'assistant:')"
    )
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def build_app(
    engine: AsyncLLMEngine | DataParallelEngine,
    model_name: str,
    api_key: str | None = None,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``.

    ``max_queue``: sequences that may wait beyond the engine's ``max_num_seqs`` before new requests
    get 503 with ``Retry-After`` (None: no limit). The app starts the engine thread on start-up and
    stops it on shutdown. ``engine`` may be a ``DataParallelEngine`` (R replicas, one API).
    """
    metrics = ServerMetrics()
    state = ServerState(engine, model_name, chat_tokenizer(engine.tokenizer), metrics, max_queue)
    replicated = isinstance(engine, DataParallelEngine)
    if replicated:
        state.num_replicas = engine.num_replicas

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="effinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    _add_error_handlers(app)

    async def body_of(request: Request) -> dict:
        return await read_json(request, max_body_bytes)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(dumps({"status": "ok"}), media_type="application/json")
        return error_response(503, "the engine is not running", code="engine_unavailable")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        text = metrics.render(engine.stats(), engine.num_open_requests, engine.is_running)
        if replicated:
            text += render_replicas(engine.replica_counts())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "effinfer",
            "root": str(engine.model_path),
            "max_model_len": state.max_model_len,
        }
        return Response(dumps({"object": "list", "data": [card]}), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(state, request, await body_of(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(state, request, await body_of(request))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = parse_request(TokenizeRequest, await body_of(request))
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        tokenizer = state.tokenizer

        def encode() -> list[int]:
            if req.prompt is not None:
                check_unicode(req.prompt, "prompt")
                return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            messages = [m.for_template() for m in req.messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
            check_unicode(text, "messages")
            return tokenizer.encode(text, add_special_tokens=False)

        try:
            ids = await asyncio.to_thread(encode)
        except TokenizerError as e:
            raise APIError(
                400, f"cannot tokenize: {e}", param="prompt" if req.prompt else "messages"
            ) from None
        body = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
        return Response(dumps(body), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = parse_request(DetokenizeRequest, await body_of(request))
        state.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"tokens must be in [0, {state.vocab_size}); got {bad[:5]}", param="tokens")
        text = await asyncio.to_thread(state.tokenizer.decode, req.tokens)
        return Response(dumps({"prompt": text}), media_type="application/json")

    return app


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes, 400 for non-UTF-8, bad JSON, NaN or a non-object."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(
            400, f"the request body is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of the range of a double")
    return value


class _Gate:
    """Checks the API key and counts responses by endpoint and status (pure ASGI, so streams pass through)."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.inc(endpoint, str(message["status"]))
            await send(message)

        if self.expected is not None and path != "/health" and not self._authorized(scope):
            response = error_response(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, counted_send)
            return
        await self.app(scope, receive, counted_send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return error.response()

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = {404: f"no such endpoint: {request.url.path}", 405: f"method {request.method} not allowed"}
        return error_response(
            error.status_code, message.get(error.status_code, str(error.detail)), headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{loc}: {first.get('msg', 'invalid request')}", param=loc or None)

    @app.exception_handler(pydantic.ValidationError)
    async def model_error(request: Request, error: pydantic.ValidationError) -> Response:
        return from_validation_error(error).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(error).__name__}", code="internal_error")
