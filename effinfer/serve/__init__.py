"""OpenAI-compatible HTTP server: ``effinfer serve --model DIR`` (FastAPI + uvicorn).

One engine thread (``effinfer.engine.async_engine.AsyncLLMEngine``) runs beside the event loop;
``build_app`` wires it to ``/v1/completions``, ``/v1/chat/completions`` and friends. See
docs/server.md; ``effinfer bench serve`` (``bench_serve.py``) load-tests any OpenAI-compatible server
and needs only httpx, so nothing here imports FastAPI until ``build_app`` is asked for.
"""

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from effinfer.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
