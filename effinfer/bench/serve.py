"""``effinfer bench serve``: a load generator for any OpenAI-compatible server, after vLLM's serving benchmark.

    effinfer bench serve --url http://127.0.0.1:8000 --rate 4 --num-prompts 200 [--max-tokens 128]
                         [--endpoint completions|chat] [--prompts FILE | --input-words 32]
                         [--temperature 0] [--ignore-eos] [--max-concurrency N] [--seed 0]
                         [--model NAME] [--api-key KEY] [--label NAME] [--markdown FILE] [--json FILE]

Requests arrive as a Poisson process of rate R per second (exponential gaps from a seeded RNG;
``--rate inf`` sends them all at once) and every one streams. For each, the client records the time
to the first text chunk (TTFT), the gaps between text chunks (inter-token latency, ITL), the time per
output token after the first (TPOT = (latency - TTFT) / (output tokens - 1)) and the end-to-end
latency; the report gives throughput (requests/s, output tokens/s) and p50 / p90 / p99 of each.
Output tokens come from the final ``usage`` chunk when the server sends one
(``stream_options.include_usage``), else one per text chunk. Only httpx is needed on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

WORDS = (
    "the a little big happy sad dog cat girl boy tree park ball sun day time friend mom dad bird fish "
    "red blue green saw went played ran jumped liked wanted found said was had and then but so very "
    "one upon once there house garden toy box car flower water sky rain snow cake apple book school"
).split()


class BenchServeError(Exception):
    """A setting or a server that cannot be benchmarked; the message says why."""


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0  # seconds since the run began
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000 (with or without /v1)"
    )
    parser.add_argument("--model", help="model name to send (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument(
        "--rate", type=float, default=math.inf, help="requests per second, Poisson (default inf: all at once)"
    )
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument(
        "--max-concurrency", type=int, help="most requests in flight at once (default: no limit)"
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default 0: greedy)")
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos=true (vLLM/effinfer extension) so every output is max-tokens long",
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        help="send min_tokens (effinfer, vLLM and llama-cpp-python know it); equal to --max-tokens it fixes "
        "every output's length",
    )
    parser.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        metavar="JSON",
        help="more request fields, e.g. '{\"repeat_penalty\": 1.0}' for llama-cpp-python",
    )
    parser.add_argument(
        "--prompts", metavar="FILE", help="prompts, one per line (or JSONL with a 'prompt' field)"
    )
    parser.add_argument(
        "--input-words", type=int, default=32, help="words per random prompt when no --prompts (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times and random prompts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests sent first (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one request may take (default 600)"
    )
    parser.add_argument("--label", help="name of the server in the report (default: the URL)")
    parser.add_argument("--markdown", metavar="FILE", help="append a section with the results to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")


def register(subparsers) -> None:
    """Adds ``serve`` to the ``effinfer bench`` actions."""
    parser = subparsers.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server",
        description="Load-test an OpenAI-compatible server with Poisson arrivals; report throughput and "
        "TTFT / TPOT / ITL percentiles.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Runs a parsed ``effinfer bench serve`` command line; raises BenchServeError for a bad setting or server."""
    report = asyncio.run(run(args))
    print(render_text(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(render_markdown(report))
        print(f"appended a section to {args.markdown}")
    return 0


# ---- workload ---------------------------------------------------------------------------------


def load_prompts(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise BenchServeError(f"prompt file {args.prompts!r} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        pool = [json.loads(line)["prompt"] if line.lstrip().startswith("{") else line for line in lines]
        if not pool:
            raise BenchServeError(f"prompt file {args.prompts!r} holds no prompts")
        return [pool[i % len(pool)] for i in range(args.num_prompts)]
    return [" ".join(rng.choice(WORDS) for _ in range(args.input_words)) for _ in range(args.num_prompts)]


def arrival_times(num: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of ``rate``."""
    if math.isinf(rate):
        return [0.0] * num
    if rate <= 0:
        raise BenchServeError("--rate must be positive")
    rng = random.Random(seed + 1)
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.expovariate(rate)
    return times


# ---- the run ----------------------------------------------------------------------------------


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def run(args: argparse.Namespace) -> dict:
    import httpx

    if args.num_prompts < 1:
        raise BenchServeError("--num-prompts must be at least 1")
    base = _base_url(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = load_prompts(args)
    times = arrival_times(args.num_prompts, args.rate, args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await _first_model(client)
        for i in range(args.warmup):
            result = await _one_request(client, args, model, prompts[i % len(prompts)], 0.0)
            if not result.ok:
                raise BenchServeError(f"the warm-up request failed: {result.error}")
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        began = time.perf_counter()

        async def send(i: int) -> RequestResult:
            delay = times[i] - (time.perf_counter() - began)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                return await _one_request(client, args, model, prompts[i], began)
            async with gate:
                return await _one_request(client, args, model, prompts[i], began)

        results = await asyncio.gather(*(send(i) for i in range(args.num_prompts)))
        duration = time.perf_counter() - began
    return summarize(args, model, results, duration)


async def _first_model(client) -> str:
    try:
        response = await client.get("/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except Exception as e:
        raise BenchServeError(f"cannot list models at {client.base_url}models ({e}); pass --model") from None


async def _one_request(
    client, args: argparse.Namespace, model: str, prompt: str, began: float
) -> RequestResult:
    payload: dict = {
        "model": model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        payload["ignore_eos"] = True
    if args.min_tokens is not None:
        payload["min_tokens"] = args.min_tokens
    payload.update(args.extra_body)
    if args.endpoint == "chat":
        path = "/chat/completions"
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/completions"
        payload["prompt"] = prompt
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start - began)
    last = start
    chunks = 0
    try:
        async with client.stream("POST", path, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    result.output_tokens = chunk["usage"].get("completion_tokens") or 0
                if any(_chunk_text(choice) for choice in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # a dropped connection or a timeout counts as a failed request
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = result.ttft is not None
    if not result.ok:
        result.error = "no text was streamed"
    return result


def _chunk_text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


# ---- report -----------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    array = np.asarray(values) * 1000.0  # milliseconds
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"mean": float(array.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_counts = [r.prompt_tokens for r in done]
    prompt_tokens = sum(prompt_counts) if done and all(c is not None for c in prompt_counts) else None
    errors = sorted({r.error for r in results if not r.ok and r.error})
    return {
        "label": args.label or args.url,
        "command": getattr(args, "command_line", ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "settings": {
            "url": args.url,
            "model": model,
            "endpoint": args.endpoint,
            "rate": "inf" if math.isinf(args.rate) else args.rate,
            "num_prompts": args.num_prompts,
            "max_concurrency": args.max_concurrency,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "ignore_eos": args.ignore_eos,
            "min_tokens": args.min_tokens,
            "extra_body": args.extra_body,
            "prompts": args.prompts or f"random, {args.input_words} words",
            "seed": args.seed,
        },
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors[:5],
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration
        if prompt_tokens is not None
        else None,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats([gap for r in done for gap in r.itl]),
        "e2e_ms": _stats([r.latency for r in done]),
    }


def _machine() -> str:
    try:
        from effinfer.bench.report import cpu_model

        cpu = cpu_model()
    except Exception:
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {len(_affinity())} CPUs usable, Python {platform.python_version()}"


def _affinity() -> set[int]:
    import os

    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _rows(report: dict) -> list[tuple[str, str]]:
    rows = [
        ("completed / failed", f"{report['completed']} / {report['failed']}"),
        ("duration (s)", _fmt(report["duration_s"], ".2f")),
        ("request throughput (req/s)", _fmt(report["request_throughput"], ".2f")),
        ("output throughput (tok/s)", _fmt(report["output_throughput"], ".1f")),
        ("total token throughput (tok/s)", _fmt(report["total_token_throughput"], ".1f")),
        ("prompt / output tokens", f"{_fmt(report['prompt_tokens'], 'd')} / {report['output_tokens']}"),
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        s = report[key]
        rows.append(
            (
                f"{name} mean / p50 / p90 / p99 (ms)",
                " / ".join(_fmt(s[k], ".2f") for k in ("mean", "p50", "p90", "p99")),
            )
        )
    return rows


def _extras(settings: dict) -> str:
    extras = ["ignore_eos"] if settings["ignore_eos"] else []
    if settings["min_tokens"] is not None:
        extras.append(f"min_tokens {settings['min_tokens']}")
    if settings["extra_body"]:
        extras.append(f"extra body {json.dumps(settings['extra_body'])}")
    return "".join(", " + e for e in extras)


def render_text(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"== bench serve: {report['label']} ({s['model']}, {s['endpoint']}) ==",
        f"rate {s['rate']} req/s, {s['num_prompts']} prompts, max_tokens {s['max_tokens']}, "
        f"temperature {s['temperature']}{_extras(s)}",
    ]
    width = max(len(name) for name, _ in _rows(report))
    lines += [f"{name:<{width}}  {value}" for name, value in _rows(report)]
    if report["errors"]:
        lines.append("errors: " + "; ".join(report["errors"]))
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "",
        f"### bench serve: {report['label']}",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; machine: {report['machine']}",
        f"- model `{s['model']}`, {s['endpoint']} endpoint, prompts: {s['prompts']}, rate {s['rate']} req/s, "
        f"{s['num_prompts']} prompts, max_tokens {s['max_tokens']}, temperature {s['temperature']}"
        f"{_extras(s)}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in _rows(report)]
    return "\n".join(lines) + "\n"
