"""int8 KV cache: the per-(slot, head) quantizer, memory accounting, and generation on stories260K."""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError, EngineConfig
from effinfer.engine.runner import kv_bytes_per_block
from effinfer.layers.attention import dequantize_kv, quantize_kv

PROMPTS = [
    "Once upon a time, there was a little dog named Max.",
    "Tom and Sue went to the park. They saw a big tree.",
    "One day, a cat found a red ball under the bed. The cat",
    "Lily wanted to bake a cake for her mom.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def test_quantize_kv_error_is_at_most_half_a_step_per_slot_and_head():
    torch.manual_seed(0)
    # Heads of very different magnitudes, and an all-zero head.
    x = torch.randn(50, 4, 32) * torch.tensor([1e-3, 1.0, 30.0, 0.0])[None, :, None]
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (50, 4)
    assert codes.abs().max() <= 127
    absmax = x.abs().amax(dim=-1)
    torch.testing.assert_close(scale[:, :3], absmax[:, :3] / 127)
    # The largest element of every (token, head) is exact: the grid is fit to it.
    restored = dequantize_kv(codes, scale, torch.float32)
    error = (restored - x).abs()
    bound = absmax[..., None] / 254
    assert (error <= bound * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(restored[:, 3], torch.zeros(50, 32))
    assert dequantize_kv(codes, scale, torch.bfloat16).dtype == torch.bfloat16


def _reference_attention(q, k, v, num_kv_heads):
    """softmax(q k^T / sqrt(d)) v for queries at the end of the context, written out with einsum."""
    group = q.shape[1] // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def test_attention_reads_the_dequantized_int8_cache():
    from effinfer.layers.attention import AttentionMetadata, PagedAttention

    torch.manual_seed(0)
    heads, kv_heads, d, block, num_blocks = 4, 2, 16, 8, 6
    attn = PagedAttention(heads, kv_heads, d)
    attn.k_cache = torch.zeros(num_blocks, block, kv_heads, d, dtype=torch.int8)
    attn.v_cache = torch.zeros_like(attn.k_cache)
    attn.k_scale_cache = torch.zeros(num_blocks, block, kv_heads)
    attn.v_scale_cache = torch.zeros_like(attn.k_scale_cache)
    table = [4, 1, 3]  # out of order, so a wrong block lookup shows
    length = 20
    q = torch.randn(length, heads, d)
    k = torch.randn(length, kv_heads, d) * torch.tensor([0.5, 4.0])[None, :, None]
    v = torch.randn(length, kv_heads, d)

    def slots(positions):
        return torch.tensor([table[p // block] * block + p % block for p in positions])

    def meta(start, stop, prefill):
        return AttentionMetadata(
            is_prefill=prefill, slot_mapping=slots(range(start, stop)), block_tables=torch.tensor([table]),
            context_lens=[stop], query_lens=[stop - start], block_size=block,
            context_lens_tensor=None if prefill else torch.tensor([stop]),
        )  # fmt: skip

    def fake_quant(x):
        codes, scale = quantize_kv(x)
        return dequantize_kv(codes, scale, x.dtype)

    # A first prefill attends to its exact fresh keys; it stores them as int8.
    out = attn(q[:12], k[:12], v[:12], meta(0, 12, True))
    torch.testing.assert_close(out, _reference_attention(q[:12], k[:12], v[:12], kv_heads))
    # A chunk after a cached prefix, and a decode step, read everything back from the int8 cache.
    out = attn(q[12:19], k[12:19], v[12:19], meta(12, 19, True))
    expected = _reference_attention(q[12:19], fake_quant(k[:19]), fake_quant(v[:19]), kv_heads)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out = attn(q[19:], k[19:], v[19:], meta(19, 20, False))
    expected = _reference_attention(q[19:], fake_quant(k), fake_quant(v), kv_heads)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # And the cache holds exactly the int8 codes and scales of every token.
    codes, scale = quantize_kv(k)
    assert torch.equal(attn.k_cache.view(-1, kv_heads, d)[slots(range(length))], codes)
    assert torch.equal(attn.k_scale_cache.view(-1, kv_heads)[slots(range(length))], scale)


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
    assert EngineConfig(kv_cache_dtype="int8").kv_cache_dtype == "int8"


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def float_kv(stories260k):
    return LLM(str(stories260k), dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def int8_kv(stories260k):
    return LLM(str(stories260k), dtype="float32", kv_cache_dtype="int8", show_progress=False)


def test_int8_cache_holds_more_blocks_in_the_same_budget(stories260k, float_kv):
    config = float_kv.engine.model_config
    budget = 64 * kv_bytes_per_block(config, 16, torch.bfloat16)
    bf16 = LLM(str(stories260k), dtype="bfloat16", kv_cache_memory=budget, show_progress=False)
    int8 = LLM(
        str(stories260k), dtype="bfloat16", kv_cache_memory=budget, kv_cache_dtype="int8", show_progress=False
    )
    assert bf16.engine.runner.num_blocks == 64
    # Per token and KV head: head_dim bytes of codes and a 4-byte scale, instead of 2 * head_dim.
    d = config.head_dim
    assert int8.engine.runner.num_blocks == 64 * 2 * d // (d + 4)
    attn = next(m for m in int8.engine.runner.model.modules() if hasattr(m, "k_scale_cache"))
    assert attn.k_cache.dtype == torch.int8 and attn.k_scale_cache.dtype == torch.float32
    assert attn.k_scale_cache.shape == attn.k_cache.shape[:3]


def _teacher_forced_logprobs(llm, token_ids: list[int], prompt_len: int, chunk: int = 8) -> torch.Tensor:
    """Log-probs [len, vocab] of every next token, computed as serving computes them: the prompt
    is prefilled at once, the rest is fed ``chunk`` tokens at a time, each reading its whole context
    (its own chunk included) back from the paged cache, exactly as a decode step does."""
    from effinfer.engine.sequence import Sequence
    from effinfer.layers.attention import AttentionMetadata

    engine = llm.engine
    runner, blocks = engine.runner, engine.block_manager
    seq = Sequence("tf", 0, token_ids, SamplingParams(max_tokens=1), runner.block_size, 1, engine.device)
    blocks.allocate(seq)
    bounds = [0, *range(prompt_len, len(token_ids), chunk), len(token_ids)]
    rows = []
    try:
        with torch.inference_mode():
            for start, stop in zip(bounds, bounds[1:]):
                positions = list(range(start, stop))
                meta = AttentionMetadata(
                    is_prefill=True, slot_mapping=runner._tensor([runner._slot(seq, p) for p in positions]),
                    block_tables=runner._tensor([seq.block_table]), context_lens=[stop],
                    query_lens=[stop - start], block_size=runner.block_size,
                )  # fmt: skip
                hidden = runner.model(runner._tensor(token_ids[start:stop]), runner._tensor(positions), meta)
                rows.append(runner.model.compute_logits(hidden).float().log_softmax(-1))
    finally:
        blocks.free(seq)
    return torch.cat(rows)


def test_int8_kv_picks_the_float_kv_greedy_tokens_and_frees_its_blocks(float_kv, int8_kv):
    reference = float_kv.generate(PROMPTS, GREEDY)
    # Greedy paths part for good at the first near-tie (stories260K has ties within 0.02 nats
    # that even bf16 flips), so agreement is counted with the float run's tokens fed back in.
    agree, total = 0, 0
    for out in reference:
        ids = out.prompt_token_ids + out.outputs[0].token_ids
        prompt_len = len(out.prompt_token_ids)
        chosen = _teacher_forced_logprobs(int8_kv, ids, prompt_len)[prompt_len - 1 : -1].argmax(-1)
        agree += int((chosen == torch.tensor(out.outputs[0].token_ids)).sum())
        total += len(out.outputs[0].token_ids)
    assert agree / total >= 0.95, agree / total

    generated = _tokens(int8_kv.generate(PROMPTS[:2] * 2, GREEDY))
    assert generated[:2] == generated[2:]  # the second pass hit the prefix cache
    assert int8_kv.engine.block_manager.prefix_cache_hits > 0
    manager = int8_kv.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(b.ref_count == 0 for b in manager.blocks)


def test_int8_kv_survives_preemption(stories260k, int8_kv):
    per_block = kv_bytes_per_block(int8_kv.engine.model_config, 16, torch.float32, "int8")
    tiny = LLM(
        str(stories260k), dtype="float32", kv_cache_dtype="int8", kv_cache_memory=6 * per_block,
        show_progress=False,
    )  # fmt: skip
    assert tiny.engine.runner.num_blocks == 6
    out = _tokens(tiny.generate(PROMPTS[:2], GREEDY))
    assert tiny.engine.scheduler.num_preemptions > 0
    assert all(len(t) == 64 for t in out)
    assert tiny.engine.block_manager.num_free_blocks == 6


def test_int8_kv_perplexity_through_the_paged_cache(shared_data, float_kv, int8_kv):
    from effinfer.eval.perplexity import paged_perplexity

    text = (shared_data / "text" / "tinystories_valid.txt").read_text()[:20_000]
    # chunk 8: every token past the first chunk of a window reads its context back from the cache.
    args = dict(text=text, ctx=128, max_windows=6, chunk=8, show_progress=False)
    base = paged_perplexity(float_kv, **args).perplexity
    int8 = paged_perplexity(int8_kv, **args).perplexity
    assert abs(int8 / base - 1) < 0.005, (base, int8)
    assert int8 != base  # the int8 path was really taken
