"""CUDA graphs for decode (engine/cuda_graphs.py) and the Triton operators wired into the layers.

On CPU: the bucket arithmetic, and that nothing changes: no graphs, and the layers never reach
for the Triton operators. On CUDA (skipped elsewhere): greedy tokens with graphs replayed equal
those decoded eagerly (batches padded to their bucket included), and the Triton operators give
the tokens PyTorch's layers give, prefix-cached prefill included.
"""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.engine import cuda_graphs
from effinfer.engine.cuda_graphs import bucket_for, graph_buckets
from effinfer.kernels.triton import gpu_ops

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park. Lily and Ben went to the park and saw a big tree.",
    "Lily and Ben went to the park. Lily and Ben went to the park and found a red ball.",
    "One day, a cat",
]


def test_buckets_cover_every_batch_up_to_max_num_seqs():
    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(5) == (1, 2, 4, 5)
    assert graph_buckets(1) == (1,)
    assert graph_buckets(256) == (1, 2, 4, 8, 16, 32, 64)  # larger batches run eagerly
    buckets = graph_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert bucket_for(49, buckets) is None


def test_cpu_runs_no_graphs_and_never_reaches_the_triton_operators(stories260k, monkeypatch):
    def forbidden():
        raise AssertionError("a CPU run asked for the Triton operators")

    monkeypatch.setattr(gpu_ops, "kernels", forbidden)
    llm = LLM(str(stories260k), device="cpu", dtype="float32", show_progress=False)
    assert llm.engine.runner.decode_graphs is None
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(PROMPTS[:3], params)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)


def greedy(model, dtype: str, prompts: list[str], monkeypatch, graphs: bool, triton: bool, tokens: int = 48):
    monkeypatch.setenv(cuda_graphs.SWITCH, "1" if graphs else "0")
    monkeypatch.setenv(gpu_ops.SWITCH, "1" if triton else "0")
    gpu_ops.kernels.cache_clear()
    try:
        llm = LLM(str(model), device="cuda", dtype=dtype, show_progress=False)
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        outputs = llm.generate(prompts, params)
        # Again the longest prompt: its blocks come from the prefix cache this time.
        again = llm.generate(max(prompts, key=len), params)
        graphs_used = llm.engine.runner.decode_graphs
        captured = [] if graphs_used is None else graphs_used.captured_sizes
        return [o.outputs[0].token_ids for o in outputs + again], captured, again[0].num_cached_tokens
    finally:
        gpu_ops.kernels.cache_clear()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("num_prompts", [1, 3, 5])
def test_graph_replay_equals_eager_decode(stories260k, monkeypatch, num_prompts):
    prompts = PROMPTS[:num_prompts]
    replayed, captured, _ = greedy(stories260k, "float32", prompts, monkeypatch, graphs=True, triton=True)
    eager, none, _ = greedy(stories260k, "float32", prompts, monkeypatch, graphs=False, triton=True)
    assert captured, "no decode step was captured: the test compared eager with eager"
    assert none == []
    # 3 and 5 sequences replay the graphs of 4 and 8, padded.
    assert bucket_for(num_prompts, graph_buckets(64)) in captured
    assert replayed == eager


@requires_cuda
@pytest.mark.gpu
def test_triton_operators_give_pytorchs_greedy_tokens(stories260k, monkeypatch):
    fused, _, _ = greedy(stories260k, "float32", PROMPTS, monkeypatch, graphs=False, triton=True)
    reference, _, _ = greedy(stories260k, "float32", PROMPTS, monkeypatch, graphs=False, triton=False)
    assert fused == reference


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_prefill_and_decode_kernels_follow_pytorch(stories260k, monkeypatch, dtype):
    # The longest prompt's second run reads its cached blocks through the varlen prefill kernel.
    # Half precision rounds differently in the kernels: the first tokens must agree.
    fused, captured, cached = greedy(
        stories260k, dtype, PROMPTS, monkeypatch, graphs=True, triton=True, tokens=16
    )
    reference, _, _ = greedy(stories260k, dtype, PROMPTS, monkeypatch, graphs=False, triton=False, tokens=16)
    assert captured
    assert cached > 0, "the second run did not hit the prefix cache"
    agree = sum(a == b for f, r in zip(fused, reference) for a, b in zip(f[:8], r[:8]))
    assert agree >= 0.9 * 8 * len(fused), (fused, reference)
