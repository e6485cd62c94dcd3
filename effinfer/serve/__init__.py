"""OpenAI-compatible HTTP server: ``effinfer serve --model DIR`` (FastAPI + uvicorn).

One engine thread (``effinfer.engine.async_engine.AsyncLLMEngine``) runs beside the event loop;
``serve/app.build_app`` wires it to ``/v1/completions``, ``/v1/chat/completions`` and friends.
With ``--data-parallel-size R``, ``serve/data_parallel.DataParallelEngine`` stands in for it:
R engine processes behind the same app (docs/distributed.md). See docs/server.md. FastAPI is
an extra (``pip install -e ".[serve]"``): only ``serve/app.py`` imports it. ``effinfer bench
serve`` (``effinfer/bench/serve.py``) load-tests any OpenAI-compatible server.
"""
