"""The OpenAI-compatible server, driven over HTTP on 127.0.0.1 with the official ``openai`` client and httpx.

Greedy outputs must equal the offline ``LLM`` API's; bad input gets a clear 4xx and the server goes on;
dropped streams and full queues free what they held.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from effinfer import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from effinfer.config import EngineArgs  # noqa: E402
from effinfer.engine.async_engine import AsyncLLMEngine  # noqa: E402
from effinfer.serve.app import build_app  # noqa: E402
from effinfer.serve.data_parallel import DataParallelEngine  # noqa: E402
from effinfer.serve.metrics import parse_metrics  # noqa: E402
from effinfer.tokenizer import FALLBACK_CHAT_TEMPLATE  # noqa: E402
from tests.replica_probes import fail_step_once, restore_step  # noqa: E402

API_KEY = "test-key"
MODEL = "stories260k"
STORY_PROMPTS = [
    "Once upon a time, there was a little dog named Max.",
    "Once upon a time, there was a little girl who liked to sing.",
    "Tom and Sue went to the park. They saw a big tree.",
    "One day, a cat found a red ball under the bed. The cat",
]


class RunningServer:
    """A uvicorn server for ``app`` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app, async_engine: AsyncLLMEngine | DataParallelEngine) -> None:
        self.app = app
        self.async_engine = async_engine
        self.state = app.state.server
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it every keep-alive response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            assert self.thread.is_alive(), "the server thread died"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def http(self, api_key: str | None = API_KEY, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        with self.http() as http:
            return parse_metrics(http.get("/metrics").text)

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or is open, and every KV block is free."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (
                m["effinfer_num_requests_running"] == 0
                and m["effinfer_num_requests_waiting"] == 0
                and m["effinfer_num_requests_open"] == 0
                and m["effinfer_kv_cache_free_blocks"] == m["effinfer_kv_cache_total_blocks"]
            )
            if idle:
                return m
            assert time.monotonic() < deadline, f"the server did not go idle: {m}"
            time.sleep(0.05)


def start_server(
    model_path,
    api_key: str | None = API_KEY,
    max_queue: int | None = 256,
    data_parallel_size: int = 1,
    **engine_args,
):
    config = EngineConfig(show_progress=False, **engine_args)
    if data_parallel_size > 1:
        async_engine = DataParallelEngine(model_path, config, data_parallel_size)
    else:
        async_engine = AsyncLLMEngine(LLMEngine(model_path, config))
    return RunningServer(build_app(async_engine, MODEL, api_key=api_key, max_queue=max_queue), async_engine)


# Every test of the shared server runs against one engine and against two data-parallel replicas
# (separate processes behind the same API, docs/distributed.md).
@pytest.fixture(scope="module", params=[1, 2], ids=["one-engine", "dp2"])
def server(stories260k, request):
    running = start_server(stories260k, data_parallel_size=request.param)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def llm(stories260k):
    llm = LLM(str(stories260k), show_progress=False)
    llm.tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return llm


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- the happy paths, against the offline API -------------------------------------------------


def test_health_models_and_fallback_template(server):
    with server.http(api_key=None) as http:
        assert http.get("/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.state.tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE


def test_completions_greedy_equal_offline(server, llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    expected = llm.generate(STORY_PROMPTS, params)
    client = server.client()
    for prompt, want in zip(STORY_PROMPTS, expected):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)

    # A list of prompts in one request: choice i*n + j belongs to prompt i.
    batch = client.completions.create(model=MODEL, prompt=STORY_PROMPTS, max_tokens=40, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        e.outputs[0].text for e in expected
    ]
    # Token-id prompts are the same request.
    ids = client.completions.create(
        model=MODEL, prompt=expected[0].prompt_token_ids, max_tokens=40, temperature=0
    )
    assert ids.choices[0].text == expected[0].outputs[0].text


def test_completions_stream_equal_offline_with_usage(server, llm):
    want = llm.generate(STORY_PROMPTS[:2], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    chunks = list(
        server.client().completions.create(
            model=MODEL,
            prompt=STORY_PROMPTS[:2],
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    texts, finish = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [w.outputs[0].text for w in want]
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 96
    assert chunks[-1].usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)


def test_chat_greedy_equal_offline(server, llm):
    messages = [
        {"role": "system", "content": "Tell a story."},
        {"role": "user", "content": "A dog and a ball."},
    ]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    client = server.client()
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_sampling_fields_n_seed_stop_penalties(server, llm):
    client = server.client()
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    params = SamplingParams(
        n=2,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        max_tokens=24,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        **extra,
    )
    want = llm.generate([STORY_PROMPTS[1]], params)[0].outputs
    got = client.completions.create(
        model=MODEL,
        prompt=STORY_PROMPTS[1],
        n=2,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        max_tokens=24,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        extra_body=extra,
    )
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]

    full = client.completions.create(model=MODEL, prompt=STORY_PROMPTS[0], max_tokens=40, temperature=0)
    word = full.choices[0].text.split()[3]
    cut = client.completions.create(
        model=MODEL, prompt=STORY_PROMPTS[0], max_tokens=40, temperature=0, stop=[word]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(word)]


def test_logprobs_completions_and_chat(server, llm):
    want = llm.generate([STORY_PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8, logprobs=3))[
        0
    ].outputs[0]
    client = server.client()
    got = client.completions.create(
        model=MODEL, prompt=STORY_PROMPTS[2], max_tokens=8, temperature=0, logprobs=3
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token_id, chosen, top, alternatives in zip(
        want.token_ids, lp.token_logprobs, lp.top_logprobs, want.logprobs
    ):
        assert chosen == pytest.approx(alternatives[token_id].logprob, abs=1e-5)
        assert 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy picks the most likely
    assert lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        stream=True,
    )
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_tokenize_detokenize(server, llm):
    with server.http() as http:
        ids = http.post("/tokenize", json={"prompt": STORY_PROMPTS[0]}).json()
        assert ids["tokens"] == llm.tokenizer.encode(STORY_PROMPTS[0])
        assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
        text = http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
        assert text == STORY_PROMPTS[0]
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["tokens"] == llm.tokenizer.encode("user: Hi\nassistant:", add_special_tokens=False)
        assert http.post("/detokenize", json={"tokens": [1, 99999]}).status_code == 400
        assert http.post("/tokenize", json={}).status_code == 400


# ---- bad input --------------------------------------------------------------------------------

GOOD = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

BAD_REQUESTS = [
    # (endpoint, raw body, status, param, words the message must contain)
    ("/v1/completions", b'{"prompt": "x", ', 400, None, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400, None, "not valid UTF-8"),
    ("/v1/completions", b'"just a string"', 400, None, "must be a JSON object"),
    ("/v1/completions", b"", 400, None, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None, "NaN"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e999}', 400, None, "out of the range"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None, "nested too deeply"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {**GOOD, "max_tokens": 5.0}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature", ">= 0"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "top_p"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n", "n"),
    ("/v1/completions", {**GOOD, "n": True}, 400, "n", "valid integer"),
    ("/v1/completions", {**GOOD, "logprobs": 50}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {**GOOD, "seed": 2**70}, 400, "seed", "seed"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [100000]}, 400, "stop_token_ids", "vocabulary"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop", "stop"),
    ("/v1/completions", {**GOOD, "stop": 3}, 400, "stop", "a string or a list of strings"),
    ("/v1/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 400, "model", "does not exist"),
    ("/v1/completions", {**GOOD, "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "required"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {**GOOD, "prompt": [[]]}, 400, "prompt", "empty"),
    ("/v1/completions", {**GOOD, "prompt": [1, 2, 100000]}, 400, "prompt", "token ids"),
    ("/v1/completions", {**GOOD, "prompt": {"text": "x"}}, 400, "prompt", "a string, a list of strings"),
    ("/v1/completions", {**GOOD, "prompt": "Once " * 2000}, 400, "prompt", "context"),
    ("/v1/completions", {**GOOD, "prompt": "\ud800 lone surrogate"}, 400, "prompt", "lone surrogate"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "a\udfff"}]},
        400,
        "messages",
        "lone surrogate",
    ),
    (
        "/v1/completions",
        {**GOOD, "stream_options": {"include_usage": "yes"}},
        400,
        "stream_options.include_usage",
        "",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        "",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user"}], "tools": []},
        400,
        "tools",
        "unknown field",
    ),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages.0.content",
        "",
    ),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_tokens", ""),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "Hi " * 2000}]},
        400,
        "messages",
        "context",
    ),
    ("/v1/completions", {**GOOD, "prompt": "x" * (17 << 20)}, 413, None, "larger than"),
]


@pytest.mark.parametrize("endpoint,body,status,param,words", BAD_REQUESTS)
def test_bad_request_gets_openai_error(server, endpoint, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with server.http() as http:
        response = http.post(endpoint, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert words in error["message"]
        assert error["param"] == param
        assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
        assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_unknown_paths_methods_and_openai_client_errors(server):
    with server.http() as http:
        assert http.get("/v2/nothing").json()["error"]["message"] == "no such endpoint: /v2/nothing"
        assert http.get("/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().completions.create(model=MODEL, prompt="x", max_tokens=-5)


def test_api_key_required_everywhere_but_health(server):
    for key in (None, "wrong-key", API_KEY + "x"):
        with server.http(api_key=key) as http:
            for method, path in (
                ("GET", "/v1/models"),
                ("GET", "/metrics"),
                ("POST", "/v1/completions"),
                ("POST", "/tokenize"),
            ):
                response = http.request(method, path, json=GOOD)
                assert response.status_code == 401, (key, path)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["WWW-Authenticate"] == "Bearer"
            assert http.get("/health").status_code == 200
    with server.http(api_key=None) as http:
        response = http.get("/v1/models", headers={"Authorization": API_KEY})  # no "Bearer"
        assert response.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()
    assert server.client().models.list().data[0].id == MODEL


# ---- under load -------------------------------------------------------------------------------


async def _stream_all(server, prompts: list[str], max_tokens: int) -> list[tuple[str, str | None]]:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    async def one(prompt: str) -> tuple[str, str | None]:
        text, finish = "", None
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), timeout=120)
    finally:
        await client.close()


def test_64_concurrent_streams_finish_and_free_everything(server, llm):
    prompts = [f"{STORY_PROMPTS[i % 4]} Then {i} friends came." for i in range(64)]
    want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))]

    asyncio.run(_stream_all(server, prompts, 32))  # warms allocator pools, thread pools, connections
    server.wait_idle()
    baseline = _rss_bytes()
    for _ in range(2):
        results = asyncio.run(_stream_all(server, prompts, 32))
        assert [text for text, _ in results] == want
        assert all(finish in ("stop", "length") for _, finish in results)
        server.wait_idle()
    grown = _rss_bytes() - baseline
    assert grown < 32 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over two rounds of 64 streams"

    engine = server.async_engine
    if isinstance(engine, AsyncLLMEngine):
        assert engine.engine.unfinished_request_ids() == []
    assert engine.num_open_requests == 0 and server.state.num_open_seqs == 0
    stats = engine.stats()
    assert (stats.num_requests, stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0, 0)


def test_disconnected_stream_is_aborted_and_frees_blocks(server):
    before = server.metrics()
    body = {**GOOD, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert all(line == "" or line.startswith("data: {") for line in received)
        during = server.metrics()
        assert during["effinfer_num_requests_running"] == 1
        assert during["effinfer_kv_cache_free_blocks"] < during["effinfer_kv_cache_total_blocks"]
    # Leaving the block closed the connection mid-stream.
    after = server.wait_idle()
    aborted = 'effinfer_requests_finished_total{finish_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["effinfer_generation_tokens_total"] - before["effinfer_generation_tokens_total"] < 400


def test_disconnected_non_streaming_request_is_aborted(server):
    before = server.metrics()
    body = {**GOOD, "max_tokens": 500, "ignore_eos": True, "n": 8}
    with server.http(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    after = server.wait_idle()
    aborted = 'effinfer_requests_finished_total{finish_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after['effinfer_http_requests_total{endpoint="/v1/completions",status="499"}'] >= 1


def test_full_queue_answers_503_and_a_waiting_request_can_leave(stories260k):
    small = start_server(stories260k, max_queue=1, max_num_seqs=1)
    try:
        body = {**GOOD, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with small.http() as a, small.http() as b, small.http() as c:
            with a.stream("POST", "/v1/completions", json=body) as first:
                with b.stream("POST", "/v1/completions", json=body) as second:
                    assert first.status_code == second.status_code == 200
                    third = c.post("/v1/completions", json=GOOD)
                    assert third.status_code == 503
                    assert third.headers["Retry-After"] == "1"
                    assert third.json()["error"]["code"] == "server_busy"
                    too_big = c.post("/v1/completions", json={**GOOD, "n": 3})
                    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "n"
                    m = small.metrics()
                    assert (m["effinfer_num_requests_running"], m["effinfer_num_requests_waiting"]) == (1, 1)
                # The second one left while still queued, before its first token: it is dropped at once.
                deadline = time.monotonic() + 10
                while small.metrics()["effinfer_num_requests_waiting"] != 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                m = small.metrics()
                assert (m["effinfer_num_requests_running"], m["effinfer_num_requests_open"]) == (1, 1)
            small.wait_idle()
            assert c.post("/v1/completions", json=GOOD).status_code == 200
    finally:
        small.stop()


def on_every_engine(server: RunningServer, fn, *args) -> None:
    """``fn(engine, *args)`` on the server's engine, or in each data-parallel replica's process."""
    engine = server.async_engine
    if isinstance(engine, DataParallelEngine):
        for index in range(engine.num_replicas):
            engine.run_on_replica(index, fn, *args)
    else:
        fn(engine.engine, *args)


def test_engine_failure_fails_its_requests_and_the_server_goes_on(server):
    on_every_engine(server, fail_step_once, 3)
    try:
        with server.http() as http:
            response = http.post("/v1/completions", json={**GOOD, "max_tokens": 20, "ignore_eos": True})
            assert response.status_code == 500
            assert "injected fault" in response.json()["error"]["message"]
            on_every_engine(server, restore_step)  # each replica was armed; one fault is the test
            stream = http.post(
                "/v1/completions", json={**GOOD, "max_tokens": 20, "ignore_eos": True, "stream": True}
            )
            assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
            assert http.get("/health").status_code == 200
            assert http.post("/v1/completions", json=GOOD).status_code == 200
    finally:
        on_every_engine(server, restore_step)
    m = server.wait_idle()
    assert m["effinfer_engine_step_errors_total"] == 1


# ---- the CLI and the load generator -----------------------------------------------------------


def test_serve_command_line():
    from effinfer.cli import build_parser
    from effinfer.serve.cli import cmd_serve

    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--port",
            "9001",
            "--api-key",
            "k",
            "--max-queue",
            "-1",
            "--max-num-seqs",
            "3",
        ]
    )
    assert (args.func, args.port, args.api_key, args.max_queue, args.host) == (
        cmd_serve,
        9001,
        "k",
        -1,
        "127.0.0.1",
    )
    # The engine flags come along, with EngineConfig's defaults for the ones not given.
    assert EngineArgs.from_cli_args(args) == EngineConfig(max_num_seqs=3)


def test_bench_serve_reports_percentiles(server, tmp_path):
    from effinfer.bench import serve as bench_serve
    from effinfer.cli import main as cli_main

    markdown, result_json = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = [
        "bench", "serve", "--url", server.url, "--api-key", API_KEY, "--rate", "50", "--num-prompts", "12",
        "--max-tokens", "16",
        "--min-tokens", "16", "--extra-body", '{"top_k": 5}', "--markdown", str(markdown), "--json", str(result_json),
        "--label", "effinfer",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    report = json.loads(result_json.read_text())
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["output_tokens"] == 12 * 16
    assert report["settings"]["model"] == MODEL
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = report[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert "| TTFT mean / p50 / p90 / p99 (ms) |" in markdown.read_text()

    times = bench_serve.arrival_times(2000, rate=4.0, seed=0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    assert bench_serve.arrival_times(3, rate=4.0, seed=0) == times[:3]  # seeded
