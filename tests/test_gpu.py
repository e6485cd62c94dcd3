"""The same engine on CUDA: skipped cleanly where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_greedy_equals_cpu(stories260k):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = ["Once upon a time", "The little dog"]
    cpu = LLM(str(stories260k), device="cpu", dtype="float32", show_progress=False).generate(prompts, params)
    gpu = LLM(str(stories260k), device="cuda", dtype="float32", show_progress=False).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_cuda_seeded_sampling_is_reproducible(stories260k):
    llm = LLM(str(stories260k), device="cuda", show_progress=False)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=32, ignore_eos=True)
    first = llm.generate(["Once upon a time"], params)[0].outputs[0].token_ids
    assert llm.generate(["Once upon a time"], params)[0].outputs[0].token_ids == first
