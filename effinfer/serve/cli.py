"""``effinfer serve``: the OpenAI-compatible server on uvicorn.

    effinfer serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue 256]
                   [--served-model-name NAME] [--data-parallel-size R]
                   [engine args: --dtype, --kv-cache-memory, --max-num-seqs, ...]

``effinfer.cli`` calls ``register(subparsers)`` to add the subcommand; the engine flags and their
defaults come from ``EngineArgs``. ``effinfer bench serve`` (``effinfer/bench/serve.py``) load-tests it.
"""

from __future__ import annotations

import argparse
import os
import sys

from effinfer.config import ConfigError, EngineArgs
from effinfer.engine.async_engine import AsyncLLMEngine
from effinfer.engine.engine import LLMEngine
from effinfer.loading.checkpoint import resolve_model_path
from effinfer.serve.data_parallel import DataParallelEngine
from effinfer.serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE


def register(subparsers) -> None:
    """Adds ``serve`` to the ``effinfer`` subcommands."""
    serve = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, metrics)",
        description="Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /metrics, /health. See docs/server.md.",
    )
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="(default 8000)")
    net.add_argument(
        "--api-key",
        default=os.environ.get("EFFINFER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $EFFINFER_API_KEY)",
    )
    net.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="sequences that may wait beyond --max-num-seqs before requests get 503 + Retry-After "
        f"(default {DEFAULT_MAX_QUEUE}; -1: no limit)",
    )
    net.add_argument("--served-model-name", help="the model name clients send (default: the --model path)")
    net.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES >> 20} MiB)",
    )
    net.add_argument("--no-access-log", action="store_true", help="do not log each request")
    net.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas, each in its own process on its share of the cores (or GPUs), behind one "
        "API; requests go to the least loaded one, or to the one holding their prompt prefix "
        "(default 1; docs/distributed.md)",
    )
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        # The server's dependencies are an extra; import them only when a server is asked for.
        import uvicorn

        from effinfer.serve.app import build_app
    except ImportError as e:
        print(f"effinfer serve: error: {e.name} is missing; pip install 'effinfer[serve]'", file=sys.stderr)
        return 2

    _check_server_flags(args)  # before the model loads
    path = resolve_model_path(args.model)
    config = EngineArgs.from_cli_args(args)
    if args.data_parallel_size > 1:
        engine = DataParallelEngine(path, config, args.data_parallel_size)
    else:
        engine = AsyncLLMEngine(LLMEngine(path, config))
    name = args.served_model_name or args.model or path.name
    max_queue = None if args.max_queue < 0 else args.max_queue
    app = build_app(
        engine,
        name,
        api_key=args.api_key,
        max_queue=max_queue,
        max_body_bytes=args.max_body_bytes,
    )
    print(f"effinfer serve: {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=not args.no_access_log,
        log_level="info",
        timeout_graceful_shutdown=5,  # open streams are cut after this on Ctrl-C
    )
    return 0


def _check_server_flags(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    if args.data_parallel_size < 1:
        raise ConfigError(f"--data-parallel-size must be at least 1, got {args.data_parallel_size}")
    if args.max_queue < -1:
        raise ConfigError(f"--max-queue must be -1 (no limit) or more, got {args.max_queue}")
