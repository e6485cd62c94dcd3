"""Data-parallel serving: the router's choices, load spread and prefix affinity over HTTP, replica death.

The whole server suite (tests/test_serve.py) also runs against two replicas; these tests check what
only replicas have: requests reach both, a shared prefix stays on one, each replica has its own
cores and the engine config unchanged, and a replica killed mid-request fails only its requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from effinfer import LLM, EngineConfig, SamplingParams  # noqa: E402
from effinfer.config import ConfigError  # noqa: E402
from effinfer.serve.data_parallel import DataParallelEngine, plan_placements  # noqa: E402
from effinfer.serve.routing import NoReplicaError, Router  # noqa: E402
from tests.replica_probes import replica_placement  # noqa: E402
from tests.test_serve import API_KEY, GOOD, MODEL, RunningServer, start_server  # noqa: E402
from tests.test_serve_fuzz import VALID_REQUESTS, check_valid_request  # noqa: E402

# ---- the router, without processes --------------------------------------------------------------


def test_least_loaded_wins_and_ties_alternate():
    router = Router(3, block_size=4, affinity_slack=2)
    assert router.choose(None, [2, 0, 1]) == 1
    assert router.choose(None, [0, 0, 0]) == 0  # tie: replica 1 was routed to already
    assert router.choose(None, [0, 0, 0]) == 2
    assert router.choose(None, [5, 3, 4]) == 1
    assert router.choose([1, 2, 3], [0, 0, 0]) == 0  # under one full block: no affinity


def test_prefix_affinity_until_much_busier():
    router = Router(2, block_size=4, affinity_slack=2)
    prompt = list(range(12))  # three full blocks
    assert router.choose(prompt, [0, 0]) == 0
    assert router.choose(prompt, [0, 0]) == 0  # without affinity the tie would go to replica 1
    assert router.choose(prompt + [99], [2, 0]) == 0  # two sequences busier: still within the slack
    assert router.choose(prompt, [3, 0]) == 1  # much busier: the least loaded takes the prefix over
    assert router.choose(prompt, [0, 0]) == 1


def test_longest_remembered_prefix_decides():
    router = Router(2, block_size=4, affinity_slack=2)
    first = list(range(12))
    assert router.choose(first, [0, 0]) == 0
    # Shares two blocks with `first`, sent to replica 1 because 0 is busy: those two move to 1.
    assert router.choose(first[:8] + [100, 101, 102, 103], [9, 0]) == 1
    assert router.choose(first[:8] + [200, 201, 202, 203], [0, 0]) == 1  # two known blocks, on 1
    assert router.choose(first, [0, 0]) == 0  # three known blocks: its third is still on 0


def test_stopped_replicas_are_never_chosen():
    router = Router(2, block_size=4, affinity_slack=100)
    prompt = list(range(8))
    assert router.choose(prompt, [0, 0]) == 0
    assert router.choose(prompt, [None, 5]) == 1  # its prefix owner stopped
    with pytest.raises(NoReplicaError):
        router.choose(prompt, [None, None])


def test_placements_split_cores_and_gpus_and_keep_the_config():
    config = EngineConfig(device="cpu", max_num_seqs=7, block_size=32)
    halves = plan_placements(config, 2, cores=[0, 1, 2, 3, 4])
    assert [p.cores for p in halves] == [[0, 1], [2, 3]]
    assert [p.config.num_threads for p in halves] == [2, 2]
    assert all(dataclasses.replace(p.config, num_threads=None) == config for p in halves)
    pinned_threads = plan_placements(dataclasses.replace(config, num_threads=3), 2, cores=[0, 1, 2, 3])
    assert [p.config.num_threads for p in pinned_threads] == [3, 3]
    crowded = plan_placements(config, 3, cores=[0, 1])
    assert [(p.cores, p.config.num_threads) for p in crowded] == [(None, 1)] * 3

    gpu_config = EngineConfig(device="cpu")
    gpu_config.device = "cuda"  # constructing it with "cuda" would check for a GPU
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    gpus = plan_placements(gpu_config, 2, num_gpus=4)
    assert [p.cuda_devices for p in gpus] == ["0,1", "2,3"]
    assert all(p.config is gpu_config for p in gpus)
    assert [p.cuda_devices for p in plan_placements(gpu_config, 2, num_gpus=1)] == [None, None]


def test_data_parallel_size_is_checked(capsys):
    from effinfer.cli import main as cli_main

    assert cli_main(["serve", "--data-parallel-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--data-parallel-size must be at least 1, got 0" in err
    assert "Traceback" not in err


def test_a_replica_that_cannot_start_stops_them_all_with_its_error(stories260k):
    # The parent reads only the config and tokenizer; the context check runs in each replica.
    config = EngineConfig(show_progress=False, max_model_len=100_000)
    with pytest.raises(ConfigError, match=r"data-parallel replica \d: max_model_len 100000 exceeds"):
        DataParallelEngine(stories260k, config, 2)
    assert multiprocessing.active_children() == []


# ---- two replicas over HTTP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(stories260k):
    running = start_server(stories260k, data_parallel_size=2, max_num_seqs=8)
    yield running
    running.stop()


def replica_metric(metrics: dict[str, float], name: str, replica: int) -> float:
    return metrics[f'effinfer_replica_{name}{{replica="{replica}"}}']


async def _complete_all(server: RunningServer, prompts: list[str], max_tokens: int) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    try:
        await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0)
                for p in prompts
            )
        )
    finally:
        await client.close()


def test_concurrent_requests_spread_over_both_replicas(server):
    before = server.wait_idle()
    # Different first tokens: no shared prefix block, so only load decides.
    prompts = [f"{i} little birds sang in the tall green tree by the river." for i in range(8)]
    asyncio.run(_complete_all(server, prompts, max_tokens=12))
    after = server.wait_idle()
    routed = [replica_metric(after, "requests_routed_total", k) - replica_metric(before, "requests_routed_total", k) for k in (0, 1)]  # fmt: skip
    tokens = [
        replica_metric(after, "generation_tokens_total", k)
        - replica_metric(before, "generation_tokens_total", k)
        for k in (0, 1)
    ]
    assert sum(routed) == 8 and min(routed) >= 1, routed
    assert min(tokens) > 0, tokens
    total = after["effinfer_generation_tokens_total"] - before["effinfer_generation_tokens_total"]
    assert sum(tokens) == total
    assert server.state.capacity == 2 * 8 + 256  # both replicas' batches, then the queue
    for k in (0, 1):
        assert replica_metric(after, "alive", k) == 1
        assert replica_metric(after, "num_requests_running", k) == 0
        assert replica_metric(after, "kv_cache_usage_ratio", k) == 0


def test_a_repeated_prefix_goes_to_the_replica_that_cached_it(server):
    shared = "Once upon a time, in a small town by the sea, there lived a kind old man and his dog. " * 2
    prompts = [shared + ending for ending in ("He", "The dog", "One day", "They")]
    with server.http() as http:
        assert len(http.post("/tokenize", json={"prompt": shared}).json()["tokens"]) >= 48  # 3 blocks
        before = server.wait_idle()
        for prompt in prompts:  # one at a time: both replicas idle, so load alone would alternate
            assert http.post("/v1/completions", json={**GOOD, "prompt": prompt}).status_code == 200
    after = server.wait_idle()
    routed = [replica_metric(after, "requests_routed_total", k) - replica_metric(before, "requests_routed_total", k) for k in (0, 1)]  # fmt: skip
    hits = [replica_metric(after, "prefix_cache_hits_total", k) - replica_metric(before, "prefix_cache_hits_total", k) for k in (0, 1)]  # fmt: skip
    assert sorted(routed) == [0, 4], routed
    owner = routed.index(4)
    assert hits[owner] >= 3 * 3 and hits[1 - owner] == 0, hits  # 3 later requests x 3 shared blocks


def test_each_replica_has_its_cores_and_the_engine_config(server):
    engine: DataParallelEngine = server.async_engine
    placements = [engine.run_on_replica(k, replica_placement) for k in range(2)]
    cores = sorted(os.sched_getaffinity(0))
    for k, (replica_cores, num_threads, config) in enumerate(placements):
        assert dataclasses.replace(config, num_threads=None) == engine.config
        if len(cores) >= 2:
            share = len(cores) // 2
            assert replica_cores == cores[k * share : (k + 1) * share]
            assert num_threads == config.num_threads == share
    if len(cores) >= 2:
        assert not set(placements[0][0]) & set(placements[1][0])


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=VALID_REQUESTS)
def test_fuzzed_valid_bodies_cross_to_the_replicas_and_back(server, request):
    # Sampling parameters and outputs of every shape are pickled to a replica and back.
    with server.http(timeout=60) as http:
        check_valid_request(http, request)
    assert server.async_engine.stats().num_step_errors == 0


def test_a_replica_can_itself_be_tensor_parallel(stories260k):
    """A replica takes the engine config whole: with tensor_parallel_size=2 it starts its own ranks."""
    if "tensor_parallel_size" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        pytest.skip("this build has no tensor parallelism")
    prompts = ["Once upon a time, there was a little dog named Max.", "Tom and Sue went to the park."]
    params = SamplingParams(temperature=0, max_tokens=16)
    want = LLM(str(stories260k), dtype="float32", show_progress=False).generate(prompts, params)
    config = EngineConfig(dtype="float32", show_progress=False, **{"tensor_parallel_size": 2})
    engine = DataParallelEngine(stories260k, config, 2)

    async def generate_all() -> list[str]:
        engine.start()

        async def one(i: int) -> str:
            outputs = [
                o async for o in engine.generate(engine.tokenizer.encode(prompts[i]), params, f"tp-{i}")
            ]
            return "".join(o.outputs[0].delta_text for o in outputs)

        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        got = asyncio.run(generate_all())
        routed = [c.num_routed for c in engine.replica_counts()]
    finally:
        engine.shutdown()
    assert got == [w.outputs[0].text for w in want]
    assert routed == [1, 1]


# ---- a replica that dies ----------------------------------------------------------------------------


def test_a_dead_replica_fails_its_requests_and_the_others_serve_on(stories260k):
    running = start_server(stories260k, data_parallel_size=2, max_num_seqs=8)
    try:
        engine: DataParallelEngine = running.async_engine
        # A long shared prefix keeps both requests on one replica.
        prompt = "Once upon a time, in a small town by the sea, there lived a kind old man and his dog. " * 2
        body = {**GOOD, "prompt": prompt, "max_tokens": 400, "ignore_eos": True}
        collected: dict[str, object] = {}

        def post() -> None:
            with running.http(timeout=60) as http:
                collected["response"] = http.post("/v1/completions", json=body)

        with (
            running.http() as http,
            http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream,
        ):
            lines = stream.iter_lines()
            assert [next(lines) for _ in range(4)]
            victim = next(r for r in engine.replicas if r.num_open_seqs)
            waiter = threading.Thread(target=post)
            waiter.start()
            deadline = time.monotonic() + 30
            while victim.num_open_seqs < 2 or victim.stats.num_running + victim.stats.num_waiting < 2:
                assert time.monotonic() < deadline, "the second request did not reach the same replica"
                time.sleep(0.01)
            os.kill(victim.pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        waiter.join(60)
        assert rest[-1] == "data: [DONE]"
        errors = [line for line in rest if line.startswith('data: {"error"')]
        assert len(errors) == 1 and f"replica {victim.index} stopped" in errors[0]
        response = collected["response"]
        # 500 once the replica had accepted it (as its stats said); 503 in the rare case the
        # acceptance was still on its way when the replica died.
        code = {500: "engine_error", 503: "engine_unavailable"}.get(response.status_code)
        assert code is not None and response.json()["error"]["code"] == code, response.text
        assert f"replica {victim.index} stopped" in response.json()["error"]["message"]

        with running.http() as http:
            assert http.get("/health").status_code == 200
            for _ in range(4):
                assert http.post("/v1/completions", json={**GOOD, "prompt": prompt}).status_code == 200
        m = running.wait_idle()
        survivor = 1 - victim.index
        assert replica_metric(m, "alive", victim.index) == 0 and replica_metric(m, "alive", survivor) == 1
        assert replica_metric(m, "requests_routed_total", victim.index) == 2
        assert replica_metric(m, "requests_routed_total", survivor) == 4
        assert m["effinfer_engine_alive"] == 1
    finally:
        running.stop()
