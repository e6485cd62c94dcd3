"""A Mamba model behind the OpenAI-compatible server: greedy completions (streamed and not) equal the
offline API's, and a client that leaves mid-request gives its recurrent-state slot back."""

from __future__ import annotations

import asyncio

import pytest

from effinfer import LLM, SamplingParams

from .test_mamba import hf_mamba  # noqa: F401  (the random Mamba model fixture)
from .test_serve import MODEL, _stream_all, httpx, start_server

PROMPTS = ["Once upon a time", "The little dog was sad because", "One day, a big bird", "Tom had a red ball."]


@pytest.fixture(scope="module")
def mamba_dir(hf_mamba):  # noqa: F811
    return hf_mamba[1]


@pytest.fixture(scope="module")
def server(mamba_dir):
    running = start_server(mamba_dir, dtype="float32", max_num_seqs=4)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def offline(mamba_dir):
    """The offline API's greedy (text, finish reason) for ``PROMPTS``, at most 20 tokens."""
    llm = LLM(str(mamba_dir), dtype="float32", show_progress=False)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


def _state_slots(server) -> tuple[int, int]:
    """(free, total) recurrent-state slots of the server's engine."""
    blocks = server.async_engine.engine.block_manager
    return blocks.num_free_state_slots, blocks.num_state_slots


def _all_slots_free(server) -> bool:
    free, total = _state_slots(server)
    return total > 0 and free == total


def test_completions_greedy_equal_offline(server, offline):
    client = server.client()
    for prompt, want in zip(PROMPTS, offline):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert (got.choices[0].text, got.choices[0].finish_reason) == want
    server.wait_idle()
    assert _all_slots_free(server)


def test_concurrent_streams_equal_offline_and_free_every_slot(server, offline):
    # Eight streams on four slots: the scheduler admits sequences only as slots come back.
    results = asyncio.run(_stream_all(server, PROMPTS * 2, 20))
    assert results == offline * 2
    server.wait_idle()
    assert _all_slots_free(server)


def test_disconnected_stream_is_aborted_and_frees_its_state_slot(server):
    before = server.metrics()
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert all(line == "" or line.startswith("data: {") for line in received)
        free, total = _state_slots(server)
        assert free == total - 1  # the running sequence holds one slot
    # Leaving the block closed the connection mid-stream.
    after = server.wait_idle()
    aborted = 'effinfer_requests_finished_total{finish_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert _all_slots_free(server)


def test_disconnected_non_streaming_request_is_aborted_and_frees_its_slots(server):
    before = server.metrics()
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 500, "ignore_eos": True, "n": 3}
    with server.http(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    after = server.wait_idle()
    aborted = 'effinfer_requests_finished_total{finish_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert _all_slots_free(server)
    # The server goes on serving with the slots it got back.
    with server.http() as http:
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 4})
        assert ok.status_code == 200, ok.text
