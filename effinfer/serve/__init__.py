"""OpenAI-compatible HTTP server: ``effinfer serve --model DIR`` (FastAPI + uvicorn).

One engine thread (``effinfer.engine.async_engine.AsyncLLMEngine``) runs beside the event loop;
``build_app`` wires it to ``/v1/completions``, ``/v1/chat/completions`` and friends. See
docs/server.md. FastAPI is an extra (``pip install -e ".[serve]"``), so nothing here imports it
until ``build_app`` is asked for; ``effinfer bench serve`` (``effinfer/bench/serve.py``) load-tests
any OpenAI-compatible server.
"""

__all__ = ["build_app", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_QUEUE"]

DEFAULT_MAX_BODY_BYTES = 16 << 20
# Sequences that may wait beyond the engine's running batch before new requests get 503.
DEFAULT_MAX_QUEUE = 256


def __getattr__(name: str):
    if name == "build_app":
        from effinfer.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
