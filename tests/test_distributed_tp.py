"""Tensor parallelism (engine/executor.py, layers/parallel.py, loading/sharded.py) over gloo on the CPU.

The reference is the same engine in one process: greedy text (and seeded samples) must be
identical token for token, since each rank computes exact slices of the same products and only
the summation order of the all-reduce differs. Workers are real processes (spawned by the
engine, or started by torchrun as two "machines" on one host).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError
from effinfer.distributed import comm_bytes, reset_comm_bytes
from effinfer.engine.executor import WorkerError
from effinfer.layers.parallel import TensorSplit, head_split
from effinfer.loading.gguf_quants import dequantize, quantize_q8_0
from effinfer.loading.sharded import split_gguf_bytes
from tests.conftest import make_hf_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path.home() / ".cache" / "effinfer-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", device="cpu", show_progress=False)


def _texts(llm: LLM, prompts, params=GREEDY) -> list[str]:
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def _same_text_as_one_process(model, prompts, tp: int, params=GREEDY, **engine_args) -> None:
    one = LLM(str(model), **ENGINE, **engine_args)
    expected = _texts(one, prompts, params)
    parallel = LLM(str(model), **ENGINE, tensor_parallel_size=tp, **engine_args)
    try:
        assert _texts(parallel, prompts, params) == expected
    finally:
        parallel.shutdown()


# ---------------------------------------------------------------- the splits themselves (no processes)


def test_heads_split_with_their_kv_group_or_replicate_it():
    # 8 query / 2 KV heads over 4 ranks: each KV head serves two ranks (replicated), in group order.
    splits = [head_split(8, 2, 4, r) for r in range(4)]
    assert [(s.q_start, s.num_heads) for s in splits] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [(s.kv_start, s.num_kv_heads) for s in splits] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    # Every query head keeps the KV head it uses in one process (head // group size).
    for s in splits:
        assert all(h // 4 == s.kv_start for h in range(s.q_start, s.q_start + s.num_heads))
    assert [(s.kv_start, s.num_kv_heads) for s in (head_split(8, 4, 2, r) for r in range(2))] == [
        (0, 2),
        (2, 2),
    ]


def test_sizes_that_do_not_fit_the_heads_are_refused():
    with pytest.raises(ConfigError, match="9 query / 3 KV heads"):
        head_split(9, 3, 2, 0)
    with pytest.raises(ConfigError, match="24 query / 8 KV heads"):
        head_split(24, 8, 3, 0)  # divides the query heads, not the KV heads
    assert (head_split(9, 3, 3, 2).q_start, head_split(9, 3, 3, 2).kv_start) == (6, 2)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_1, QType.F16])
def test_gguf_bytes_split_on_whole_blocks_equal_the_dequantised_slice(qtype):
    import gguf

    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 128)).astype(np.float32)
    raw = np.frombuffer(gguf.quants.quantize(values, qtype).tobytes(), dtype=np.uint8)
    full = dequantize(raw.copy(), qtype, (6, 128))
    rows, shape = split_gguf_bytes(raw, qtype, (6, 128), TensorSplit(0, 2, 5), "w")
    assert torch.equal(dequantize(rows.copy(), qtype, shape), full[2:5])
    cols, shape = split_gguf_bytes(raw, qtype, (6, 128), TensorSplit(1, 64, 128), "w")
    assert torch.equal(dequantize(cols.copy(), qtype, shape), full[:, 64:])


def test_a_split_through_a_quantization_block_is_refused():
    raw = quantize_q8_0(torch.randn(4, 96)).numpy().view(np.uint8).reshape(-1)
    with pytest.raises(ConfigError, match="inside a quantization block of 32"):
        split_gguf_bytes(raw, QType.Q8_0, (4, 96), TensorSplit(1, 48, 96), "blk.0.ffn_down.weight")


# ---------------------------------------------------------------- whole engines, one process vs TP=2


def test_stories260k_greedy_sampling_prefix_cache_and_preemption(stories260k):
    """One parallel engine through the features the driver keeps: seeded sampling, the prefix
    cache and preemption (a KV cache too small for the batch), against one process with the same cache."""
    shared = "Once upon a time, there was a little girl named Lily. She loved to play"
    prompts = [shared + " outside", "The little dog", shared + " with her", "Lily and Tom"]
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    block_bytes = 2 * 5 * 8 * 4 * 8 * 4  # K and V, 5 layers, 8 tokens, 4 KV heads of 8 float32
    small_cache = dict(kv_cache_memory=12 * block_bytes, block_size=8, max_num_seqs=4)
    one = LLM(str(stories260k), **ENGINE, **small_cache)
    expected = (_texts(one, prompts, GREEDY), _texts(one, prompts, sampled))
    assert one.engine.stats().num_preemptions > 0  # the cache really is too small for the batch
    parallel = LLM(str(stories260k), **ENGINE, **small_cache, tensor_parallel_size=2)
    try:
        assert parallel.engine.num_kv_blocks == one.engine.num_kv_blocks
        assert (_texts(parallel, prompts, GREEDY), _texts(parallel, prompts, sampled)) == expected
        stats = parallel.engine.stats()
        assert stats.num_preemptions > 0
        assert stats.prefix_cache_hits > 0
        # Scoring through the cache (perplexity's path) runs the workers too.
        tokens = parallel.tokenizer.encode("Once upon a time there was a little girl")
        got = torch.cat(list(parallel.engine.teacher_forced_logits(tokens, chunk=4)))
        want = torch.cat(list(one.engine.teacher_forced_logits(tokens, chunk=4)))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        parallel.shutdown()


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("LlamaForCausalLM", {}),
        # one KV head for two ranks: replicated; Qwen2's q/k/v biases; tied embeddings over an odd
        # vocabulary (the ranks hold 254 and 255 rows)
        ("Qwen2ForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 509}),
        ("Qwen3ForCausalLM", {}),  # per-head q/k norms
    ],
)
def test_random_hf_models_tp2(arch, extra, tmp_path):
    _, path = make_hf_model(arch, tmp_path, **extra)
    _same_text_as_one_process(path, [[1, 17, 99, 305], [1, 400, 7, 8, 9, 10]], tp=2)


def test_gguf_q8_0_tp2_splits_blocks_exactly(tmp_path):
    """A llama.cpp-layout (rotary rows permuted) Q8_0 file: each rank cuts its q/k rows per head and
    its o/down columns on whole blocks, and runs the blocks on the quantized kernels."""
    from effinfer.convert import convert_to_gguf

    _, hf_dir = make_hf_model("LlamaForCausalLM", tmp_path / "hf", intermediate_size=128)
    path = convert_to_gguf(hf_dir, tmp_path / "tiny-q8_0.gguf", "q8_0")
    _same_text_as_one_process(path, [[1, 17, 99, 305], [1, 400, 7]], tp=2)


def test_online_int8_tp2_quantizes_whole_rows(tmp_path):
    """One scale per output row: the row-parallel o/down shards are quantized from the whole row
    (gathered once at load), so the codes and the text equal one process's."""
    _, path = make_hf_model("LlamaForCausalLM", tmp_path)
    _same_text_as_one_process(path, [[1, 17, 99, 305], [1, 400, 7]], tp=2, quantization="int8")


def test_online_int4_split_through_a_group_is_refused(stories260k):
    # stories260K's down projection is 172 wide: two ranks would cut its first group of 128 at 86.
    with pytest.raises(ConfigError, match="quantization group of 128"):
        LLM(str(stories260k), **ENGINE, quantization="int4", tensor_parallel_size=2)


def test_smollm2_tp3_matches_and_tp2_is_refused():
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is not present")
    with pytest.raises(ConfigError, match="9 query / 3 KV heads"):
        LLM(str(SMOLLM2), **ENGINE, tensor_parallel_size=2)
    _same_text_as_one_process(SMOLLM2, ["The capital of France is"], tp=3, max_model_len=256)


# ---------------------------------------------------------------- processes: crashes, exits, torchrun


def test_a_dead_worker_fails_the_request_instead_of_hanging(stories260k):
    llm = LLM(str(stories260k), **ENGINE, tensor_parallel_size=2)
    try:
        prompt = llm.tokenizer.encode("Once upon a time")
        reset_comm_bytes()
        assert _texts(llm, [prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        # Megatron's count: 2 all-reduces per layer and 1 after the embedding, of a 64-wide float32
        # hidden state per token computed (the prompt, then 3 decode tokens); 4 sampled rows of
        # logits, 256 of the 512 vocabulary entries from this rank.
        sent = comm_bytes()
        assert sent["all_reduce"] == (2 * 5 + 1) * 64 * 4 * (len(prompt) + 3)
        assert sent["all_gather"] == 4 * 256 * 4
        (worker,) = llm.engine.runner.worker_pids
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(WorkerError, match="worker rank 1"):
            llm.generate(["Once upon a time"], GREEDY)
        assert time.monotonic() - started < 60
        with pytest.raises(WorkerError):  # and stays failed, no hang on the next request either
            llm.generate(["The dog"], GREEDY)
    finally:
        llm.shutdown()


def test_workers_die_with_the_driver(stories260k):
    script = (
        "import os, signal\n"
        "from effinfer import LLM\n"
        f"llm = LLM({str(stories260k)!r}, dtype='float32', show_progress=False, tensor_parallel_size=2)\n"
        "print(*llm.engine.runner.worker_pids, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    driver = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=_env()
    )
    worker = int(driver.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)


def test_cli_refuses_a_size_that_does_not_fit_the_heads(stories260k, capsys):
    from effinfer.cli import main

    args = ["generate", "hi", "--model", str(stories260k), "--tensor-parallel-size", "3", "--max-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8 query / 4 KV heads" in err


def test_two_machines_under_torchrun_generate_the_same_text(stories260k):
    """Two torchrun launches (``--nnodes 2``, one process each) rendezvous over c10d on localhost,
    as two machines would; rank 0 prints the text, the other rank serves its shard and exits 0."""
    prompt, tokens = "Once upon a time", 16
    one = LLM(str(stories260k), **ENGINE)
    expected = prompt + _texts(one, [prompt], SamplingParams(temperature=0, max_tokens=tokens))[0]
    port = _free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tp-test",
        "-m", "effinfer.cli", "generate", prompt, "--model", str(stories260k), "--dtype", "float32",
        "--tensor-parallel-size", "2", "--temperature", "0", "--max-tokens", str(tokens),
    ]  # fmt: skip
    machines = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    outputs = [m.communicate(timeout=400) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [err[-2000:] for _, err in outputs]
    printed = [out.strip() for out, _ in outputs if out.strip()]
    assert printed == [expected]  # exactly one machine (rank 0) answered


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
