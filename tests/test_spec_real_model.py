"""Opt-in: speculative decoding on a real published model, SmolLM2-135M-Instruct (Q4_1 GGUF, fetched
by ../shared/data/fetch_models.sh into $EFFINFER_MODELS or ~/.cache/effinfer-models); skipped when
the file is absent. Greedy output must be token-identical to plain decoding for a batch of prompts
of different lengths, with prompt lookup and with a draft model (the same file: a GGUF draft whose
greedy guesses the target accepts, so the draft's own cache is exercised over long accepted runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from effinfer import LLM, SamplingParams

MODEL = (
    Path(os.environ.get("EFFINFER_MODELS", Path.home() / ".cache" / "effinfer-models"))
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
# float32: in bf16 a k+1-token verification and a one-token decode round differently (other
# kernels, other summation orders), which can flip a near-tie between two tokens; the claim tested
# here is the algorithm's (a rejection rule that keeps the target's argmax), not bf16's rounding.
# A small KV cache: the default share of free memory is gigabytes for this 8k-context model.
SMALL = dict(dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, show_progress=False)
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not fetched (fetch_models.sh)")

CODE = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
"""
PROMPTS = [
    f"Rename the variable total to running_sum in this function and show the whole function:\n{CODE}\n",
    "The capital of France is",
    "List the days of the week: Monday, Tuesday,",
]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def plain_tokens() -> list[list[int]]:
    llm = LLM(str(MODEL), **SMALL)
    return _tokens(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40)))


@pytest.mark.parametrize("speculative_model", ["ngram", str(MODEL)], ids=["ngram", "gguf-draft"])
def test_greedy_speculation_on_a_real_model_is_token_identical(plain_tokens, speculative_model):
    llm = LLM(str(MODEL), speculative_model=speculative_model, num_speculative_tokens=4, **SMALL)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40))
    assert _tokens(outputs) == plain_tokens
    stats = llm.engine.stats()
    assert stats.num_accepted_tokens > 0  # speculation really ran and kept some drafts
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
