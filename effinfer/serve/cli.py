"""``effinfer serve``: the OpenAI-compatible server on uvicorn.

    effinfer serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue 256]
                   [--served-model-name NAME] [engine args: --dtype, --kv-cache-memory, --max-num-seqs, ...]

``effinfer.cli`` calls ``register_serve_commands(subparsers)`` to add the subcommand; ``effinfer bench
serve`` lives in ``bench_serve.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def register_serve_commands(subparsers) -> None:
    """Adds ``serve`` to the ``effinfer`` subcommands."""
    from effinfer.cli import add_engine_arguments

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
        default=256,
        help="sequences that may wait beyond --max-num-seqs before requests get 503 + Retry-After "
        "(default 256; -1: no limit)",
    )
    net.add_argument("--served-model-name", help="the model name clients send (default: the --model path)")
    net.add_argument(
        "--max-body-bytes", type=int, default=16 << 20, help="largest request body (default 16 MiB)"
    )
    net.add_argument("--no-access-log", action="store_true", help="do not log each request")
    add_engine_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from effinfer.serve.app import build_app
    except ImportError as e:
        print(f"effinfer serve: error: {e.name} is missing; pip install 'effinfer[serve]'", file=sys.stderr)
        return 2
    from effinfer.cli import engine_kwargs
    from effinfer.config import EngineConfig
    from effinfer.engine.async_engine import AsyncLLMEngine
    from effinfer.engine.engine import LLMEngine, resolve_model_path

    if (
        not logging.getLogger().handlers
    ):  # effinfer.cli sets this up; the fallback-template notice is a warning
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    _check_server_flags(args)  # before the model loads
    path = resolve_model_path(args.model)
    engine = LLMEngine(path, EngineConfig(**engine_kwargs(args)))
    name = args.served_model_name or args.model or path.name
    max_queue = None if args.max_queue < 0 else args.max_queue
    app = build_app(
        AsyncLLMEngine(engine),
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
    from effinfer.config import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    if args.max_queue < -1:
        raise ConfigError(f"--max-queue must be -1 (no limit) or more, got {args.max_queue}")
