"""Chunked prefill: long prompts cut into 32-token chunks that share steps with running decodes
must give the greedy tokens of whole-prompt prefill, and no step may exceed the token budget."""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.engine.runner import kv_bytes_per_block
from effinfer.layers.attention import AttentionMetadata, PagedAttention
from tests.conftest import make_hf_model

PROMPT_LENGTHS = (300, 20, 150)
BUDGET = 32


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _record_steps(llm: LLM) -> list[list[tuple[int, bool]]]:
    """Wrap the runner so each step's (query tokens, samples) per sequence is kept."""
    steps: list[list[tuple[int, bool]]] = []
    runner = llm.engine.runner
    run = runner.run

    def recording_run(batch):
        steps.append([(entry.num_query_tokens, entry.samples) for entry in batch])
        return run(batch)

    runner.run = recording_run
    return steps


def _greedy_with_and_without_chunking(path, prompts, **engine_args):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    whole = LLM(str(path), show_progress=False, **engine_args)
    reference = [o.outputs[0].token_ids for o in whole.generate(prompts, params)]
    chunked = LLM(
        str(path),
        show_progress=False,
        enable_chunked_prefill=True,
        max_num_batched_tokens=BUDGET,
        **engine_args,
    )
    steps = _record_steps(chunked)
    tokens = [o.outputs[0].token_ids for o in chunked.generate(prompts, params)]
    return reference, tokens, steps, chunked


def _check_steps(steps):
    assert all(sum(n for n, _ in step) <= BUDGET for step in steps)
    # Some step ran a decode token next to a prompt chunk that does not reach its end.
    assert any(any(n == 1 and s for n, s in step) and any(not s for _, s in step) for step in steps)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_chunked_prefill_keeps_greedy_tokens_stories260k(stories260k, kv_cache_dtype):
    prompts = _prompts(512)
    reference, tokens, steps, chunked = _greedy_with_and_without_chunking(
        stories260k, prompts, kv_cache_dtype=kv_cache_dtype
    )
    assert tokens == reference
    _check_steps(steps)
    assert chunked.engine.stats().num_used_blocks == 0


def test_chunked_prefill_keeps_greedy_tokens_random_model(tmp_path):
    _, path = make_hf_model("Qwen2ForCausalLM", tmp_path / "qwen2", max_position_embeddings=512)
    prompts = _prompts(512, seed=1)
    reference, tokens, steps, _ = _greedy_with_and_without_chunking(path, prompts)
    assert tokens == reference
    _check_steps(steps)


@pytest.mark.parametrize("case", ["shared prefixes", "preemption"])
def test_chunked_prefill_with_prefix_cache_and_preemption(stories260k, case):
    """Shared prefixes are reused only once written; a small cache forces preemption mid-stream."""
    base = _prompts(512)[0]
    if case == "shared prefixes":
        prompts, kv_blocks = [base, base[:200] + [5, 6, 7], base[:120]], None
    else:
        prompts, kv_blocks = [base[:100], base[100:190], base[190:]], 20
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    plain = LLM(str(stories260k), enable_prefix_caching=False, show_progress=False)
    reference = plain.generate(prompts, params)
    block_bytes = kv_bytes_per_block(plain.engine.model_config, 16, plain.engine.dtype)
    extra = {} if kv_blocks is None else {"kv_cache_memory": kv_blocks * block_bytes}
    llm = LLM(
        str(stories260k),
        enable_chunked_prefill=True,
        max_num_batched_tokens=BUDGET,
        show_progress=False,
        **extra,
    )
    out = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in reference]
    stats = llm.engine.stats()
    assert stats.num_used_blocks == 0
    if kv_blocks is None:
        assert stats.prefix_cache_hits > 0
    else:
        assert stats.num_preemptions > 0


def test_varlen_attention_matches_per_sequence_reference():
    """A mixed step (a chunk after cached tokens, a decode token, a fresh prompt) against plain softmax."""
    torch.manual_seed(0)
    heads, kv_heads, d, block = 4, 2, 16, 8
    attn = PagedAttention(heads, kv_heads, d)
    attn.k_cache = torch.zeros(20, block, kv_heads, d)
    attn.v_cache = torch.zeros_like(attn.k_cache)
    tables = [[3, 7, 1], [0, 9, 4, 2], [5, 6]]
    # (tokens already cached, new query tokens) per sequence
    shapes = [(5, 12), (25, 1), (0, 11)]
    ks = [torch.randn(c + n, kv_heads, d) for c, n in shapes]
    vs = [torch.randn(c + n, kv_heads, d) for c, n in shapes]
    qs = [torch.randn(n, heads, d) for _, n in shapes]

    def slots(i, positions):
        return [tables[i][p // block] * block + p % block for p in positions]

    for i, (cached, _) in enumerate(shapes):  # the earlier steps' keys
        s = torch.tensor(slots(i, range(cached)), dtype=torch.long)
        attn.k_cache.view(-1, kv_heads, d)[s] = ks[i][:cached]
        attn.v_cache.view(-1, kv_heads, d)[s] = vs[i][:cached]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.tensor([s for i, (c, n) in enumerate(shapes) for s in slots(i, range(c, c + n))]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=[c + n for c, n in shapes],
        query_lens=[n for _, n in shapes],
        block_size=block,
        context_lens_tensor=torch.tensor([c + n for c, n in shapes]),
    )
    with torch.inference_mode():
        out = attn(
            torch.cat(qs),
            torch.cat([k[c:] for k, (c, _) in zip(ks, shapes)]),
            torch.cat([v[c:] for v, (c, _) in zip(vs, shapes)]),
            meta,
        )
    expected = torch.cat([_reference(q, k, v) for q, k, v in zip(qs, ks, vs)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _reference(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1).float()
