"""Property-based fuzzing of the server's request bodies (hypothesis).

Whatever the body, the answer is a 200 with a well-formed result or a 4xx with an OpenAI-style error;
never a 500, never an engine step that fails, and the server keeps serving with nothing left open.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_serve import GOOD, MODEL, start_server  # noqa: E402

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Values of every JSON type, including ones that break naive servers.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-(2**70), -(2**63) - 1, -1, 0, 2**31, 2**63, 2**70]),
    st.integers(-3, 3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-300, 1e300, -0.0, 5e-324]),
    st.text(max_size=8),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "🦙" * 3]),
    st.lists(st.integers(-3, 600), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def field(valid):
    """Mostly values of the right shape (which may still be out of range), sometimes anything at all."""
    # Not 0 or 9: hypothesis favours the ends of a range.
    return st.integers(0, 9).flatmap(lambda k: junk if k in (4, 7) else valid)


def sometimes_with(extra: dict, body):
    """``body``, now and then with one of the ``extra`` (unsupported or unknown) fields added."""
    return st.tuples(body, st.integers(0, 9), st.sampled_from(sorted(extra)), junk).map(
        lambda t: {**t[0], t[2]: t[3]} if t[1] == 5 else t[0]
    )


text = st.text(max_size=24) | st.sampled_from(["Once upon a time", "Tom and Sue", "\ud800", ""])
SAMPLING = {
    "model": field(st.just(MODEL)),
    "n": field(st.integers(-1, 3)),
    "temperature": field(st.floats(-1, 3)),
    "top_p": field(st.floats(-0.5, 1.5)),
    "top_k": field(st.integers(-2, 50)),
    "min_p": field(st.floats(-0.5, 1.5)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "repetition_penalty": field(st.floats(-1, 3)),
    "seed": field(st.integers(-(2**64), 2**64)),
    "stop": field(st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3))),
    "stop_token_ids": field(st.lists(st.integers(-1, 1000), max_size=3)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "min_tokens": field(st.integers(-1, 4)),
    "ignore_eos": field(st.booleans()),
    "user": field(text),
}
# max_tokens is always there and mostly small, so a valid body finishes in milliseconds.
small_max_tokens = st.integers(-2, 6) | st.sampled_from([0, 2**31, "8", 4.0, None, True])
message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "user", "assistant", "tool"]))},
    optional={
        "content": field(
            text | st.lists(st.fixed_dictionaries({"type": field(st.just("text")), "text": field(text)}))
        ),
        "name": field(text),
    },
)
completion_body = sometimes_with(
    {"echo", "best_of", "logit_bias", "suffix", "unknown_field"},
    st.fixed_dictionaries(
        {
            "prompt": field(
                text
                | st.lists(text, min_size=1, max_size=3)
                | st.lists(st.integers(-2, 600), min_size=1, max_size=6)
            )
        },
        optional={**SAMPLING, "max_tokens": small_max_tokens, "logprobs": field(st.integers(-1, 25))},
    ),
)
chat_body = sometimes_with(
    {"tools", "response_format", "unknown_field"},
    st.fixed_dictionaries(
        {"messages": field(st.lists(message, min_size=1, max_size=3)), "max_tokens": small_max_tokens},
        optional={
            **SAMPLING,
            "logprobs": field(st.booleans()),
            "top_logprobs": field(st.integers(-1, 25)),
            "max_completion_tokens": small_max_tokens,
            "add_generation_prompt": field(st.booleans()),
        },
    ),
)
tokenize_body = st.fixed_dictionaries(
    {},
    optional={
        "prompt": field(text),
        "messages": field(st.lists(message, max_size=2)),
        "model": field(st.just(MODEL)),
    },
)
detokenize_body = st.fixed_dictionaries({"tokens": field(st.lists(st.integers(-2, 600), max_size=8))})

REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"), completion_body),
    st.tuples(st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("/tokenize"), tokenize_body),
    st.tuples(st.just("/detokenize"), detokenize_body),
)


# Bodies that are valid in every field: each must get a 200.
plain_text = st.text(max_size=24)
VALID_SAMPLING = {
    "model": st.just(MODEL),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.sampled_from([-1, 0]) | st.integers(1, 50),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "ignore_eos": st.booleans(),
    "user": plain_text,
    "max_tokens": st.integers(1, 6),
}
streaming = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {"stream": st.just(True)},
        optional={"stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})},
    ),
)
valid_completion = st.tuples(
    st.fixed_dictionaries(
        {
            "prompt": plain_text
            | st.lists(plain_text, min_size=1, max_size=3)
            | st.lists(st.integers(0, 511), min_size=1, max_size=6)
        },
        optional={**VALID_SAMPLING, "logprobs": st.integers(0, 5)},
    ),
    streaming,
).map(lambda t: {**t[0], **t[1]})
valid_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": plain_text
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": plain_text}), max_size=2),
    }
)
valid_chat = st.tuples(
    st.fixed_dictionaries(
        {"messages": st.lists(valid_message, min_size=1, max_size=3)},
        optional={**VALID_SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)},
    ),
    streaming,
).map(lambda t: {**t[0], **t[1], **({"logprobs": True} if "top_logprobs" in t[0] else {})})


@pytest.fixture(scope="module")
def server(stories260k):
    running = start_server(stories260k, max_num_seqs=16)
    yield running
    running.stop()
    assert running.async_engine.stats().num_step_errors == 0


@pytest.fixture(scope="module")
def http(server):
    with server.http(timeout=60) as client:
        yield client


def _check(response: httpx.Response, body) -> None:
    assert response.status_code in (200, 400), (response.status_code, response.text, body)
    if response.status_code == 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error"
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        for event in events[:-1]:
            chunk = json.loads(event.removeprefix("data: "))
            assert "error" not in chunk and "choices" in chunk
    else:
        assert isinstance(response.json(), dict)


@FUZZ_SETTINGS
@given(request=REQUESTS)
def test_fuzzed_json_bodies_get_200_or_400(server, http, request):
    endpoint, body = request
    response = http.post(endpoint, content=json.dumps(body))
    hypothesis.event(f"{endpoint} {response.status_code}")
    _check(response, body)


VALID_REQUESTS = st.tuples(st.just("/v1/completions"), valid_completion) | st.tuples(
    st.just("/v1/chat/completions"), valid_chat
)


@FUZZ_SETTINGS
@given(request=VALID_REQUESTS)
def test_fuzzed_valid_bodies_get_200(server, http, request):
    check_valid_request(http, request)


def check_valid_request(http: httpx.Client, request: tuple[str, dict]) -> None:
    """A valid body gets a 200 with one finished choice per prompt and completion."""
    endpoint, body = request
    body.setdefault("max_tokens", 4)  # chat has no small default
    response = http.post(endpoint, content=json.dumps(body))
    assert response.status_code == 200, (response.text, body)
    _check(response, body)
    num_prompts = (
        len(body["prompt"])
        if isinstance(body.get("prompt"), list) and isinstance(body["prompt"][0], str)
        else 1
    )
    num_choices = body.get("n", 1) * num_prompts
    if body.get("stream"):
        chunks = [json.loads(e.removeprefix("data: ")) for e in response.text.split("\n\n")[:-2]]
        finished = {c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]}
        assert finished == set(range(num_choices))
        if body.get("stream_options", {}).get("include_usage"):
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    else:
        result = response.json()
        assert sorted(c["index"] for c in result["choices"]) == list(range(num_choices))
        assert all(c["finish_reason"] in ("stop", "length") for c in result["choices"])
        assert result["usage"]["completion_tokens"] <= body["max_tokens"] * num_choices


@FUZZ_SETTINGS
@given(raw=st.binary(max_size=64) | st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzzed_raw_bodies_get_400(server, http, raw):
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        response = http.post(endpoint, content=raw)
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["message"]


def test_server_is_healthy_and_idle_after_fuzzing(server, http):
    server.wait_idle()
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json=GOOD).status_code == 200
    assert server.async_engine.stats().num_step_errors == 0
    assert server.state.num_open_seqs == 0
