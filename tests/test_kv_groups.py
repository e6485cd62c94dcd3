"""KV cache built from per-layer cache specs: cache groups, one shared block pool, and sliding-window
blocks given back once they leave the window.

Random-initialised transformers models with sliding windows much shorter than the sequences (a
Mistral with every layer sliding, a Qwen2 mixing full and sliding layers) must give HF's logits and
greedy tokens through every engine path that touches the block tables (batching, prefix caching,
chunked prefill, speculative decoding, preemption), while the sliding groups hold a bounded number
of blocks and every block comes back when the requests end.
"""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.engine.cache_groups import KVCacheLayout
from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.sequence import PLACEHOLDER_BLOCK, Sequence
from effinfer.layers.cache_spec import AttentionCacheSpec

from .conftest import make_hf_model

WINDOW = 8
BLOCK = 4
NEW_TOKENS = 40
MODELS = {
    "mistral": ("MistralForCausalLM", dict(sliding_window=WINDOW)),
    # Layer 0 full attention, layers 1 and 2 sliding: three cache groups of one layer each.
    "qwen2-mixed": (
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True),
    ),
}


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    longest = [1] + torch.randint(3, 512, (36,), generator=gen).tolist()
    return [
        [1] + torch.randint(3, 512, (2,), generator=gen).tolist(),
        [1] + torch.randint(3, 512, (12,), generator=gen).tolist(),
        longest,
        [1] + [5, 6, 7, 8] * 6,  # repeats itself, so prompt lookup has drafts to propose
        longest[:30] + [9, 10, 11, 12, 13],  # shares 7 full blocks with ``longest``
    ]


PROMPTS = _prompts()
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    """(name, HF model, its directory, HF's greedy continuation of each prompt)."""
    arch, overrides = MODELS[request.param]
    hf, path = make_hf_model(arch, tmp_path_factory.mktemp(request.param), **overrides)
    expected = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        expected.append(out[0, len(prompt) :].tolist())
    return request.param, hf, path, expected


def _llm(path, **overrides) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK, show_progress=False, **overrides)


def _all_free(llm: LLM) -> bool:
    stats = llm.engine.stats()
    return stats.num_used_blocks == 0 and not any(stats.blocks_in_use_per_group)


def test_layers_are_grouped_by_spec_in_chunks_of_the_gcd():
    full, local = AttentionCacheSpec(), AttentionCacheSpec(sliding_window=512)
    gemma_like = KVCacheLayout.from_specs(([local] * 5 + [full]) * 3)
    assert gemma_like.layers_per_block == 3
    assert [g.spec for g in gemma_like.groups] == [local] * 5 + [full]
    assert gemma_like.groups[0].layers == (0, 1, 2) and gemma_like.groups[5].layers == (5, 11, 17)
    single = KVCacheLayout.from_specs([full] * 4)
    assert single.num_groups == 1 and single.layers_per_block == 4
    mixed = KVCacheLayout.from_specs([full, local, local])
    assert mixed.layers_per_block == 1 and mixed.placement() == {0: (0, 0), 1: (1, 0), 2: (2, 0)}


def test_window_blocks_are_given_back_except_sinks():
    manager = BlockManager(32, BLOCK, group_specs=[AttentionCacheSpec(sliding_window=8, sink_tokens=5)])
    seq = Sequence("r", 0, list(range(40)), GREEDY, BLOCK, 1)
    manager.grow(seq, 40)
    seq.num_computed_tokens = 40
    manager.free_outside_window(seq)
    # Next query at 40 sees 33..40: blocks 8 and 9 stay; 0 and 1 hold the five sinks.
    table = seq.block_tables[0]
    assert [i for i, b in enumerate(table) if b == PLACEHOLDER_BLOCK] == [2, 3, 4, 5, 6, 7]
    assert manager.num_free_blocks == 32 - 4 and manager.blocks_in_use_per_group == [4]
    manager.free(seq)
    assert manager.num_free_blocks == 32


@pytest.mark.parametrize("evict", [False, True])
def test_window_freed_blocks_are_prefix_hits_until_reused(evict):
    def fresh(tokens):
        return Sequence("r", 0, tokens, GREEDY, 2, 1)

    manager = BlockManager(8, 2, group_specs=[AttentionCacheSpec(sliding_window=4)])
    first = fresh(list(range(12)))
    manager.allocate(first)
    first.num_computed_tokens = 12
    manager.free_outside_window(first)
    manager.free(first)
    if evict:  # another sequence takes (and overwrites) every free block
        other = fresh(list(range(100, 116)))
        manager.allocate(other)
        manager.free(other)
    again = fresh(list(range(12)))
    manager.allocate(again)
    # Five full blocks may be reused (one token is left to compute); a query at position 10 sees
    # 7..10, so only blocks 3 and 4 must still be cached and 0-2 stay placeholders.
    assert again.num_cached_tokens == (0 if evict else 10)
    if not evict:
        assert again.block_tables[0][:3] == [PLACEHOLDER_BLOCK] * 3


def _prefill_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """Every position's logits of one whole-prompt prefill step."""
    engine = llm.engine
    seq = Sequence("probe", 0, prompt, GREEDY, BLOCK, 1)
    engine.block_manager.allocate(seq, use_prefix_cache=False)
    try:
        input_ids, positions, meta, _ = engine.runner.prepare_prefill([seq])
        with torch.inference_mode():
            return engine.runner.model.compute_logits(engine.runner.model(input_ids, positions, meta)).float()
    finally:
        engine.block_manager.free(seq)


def test_prefill_logits_match_hf(model):
    _, hf, path, _ = model
    llm = _llm(path)
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0]
        assert (_prefill_logits(llm, prompt) - expected).abs().max().item() < 1e-4
        # Through the paged cache three tokens at a time, window blocks given back as it goes.
        ours = torch.cat(list(llm.engine.teacher_forced_logits(prompt, chunk=3)))
        assert (ours - expected[:-1]).abs().max().item() < 1e-4
    assert _all_free(llm)


@pytest.mark.parametrize(
    "engine_args",
    [
        {},
        {"enable_prefix_caching": False},
        {"enable_chunked_prefill": True, "max_num_batched_tokens": 8},
        {"speculative_model": "ngram", "num_speculative_tokens": 3, "speculative_adaptive": False},
    ],
    ids=["prefix-caching", "no-prefix-caching", "chunked-prefill", "ngram-speculation"],
)
def test_greedy_matches_hf_batched(model, engine_args):
    _, _, path, expected = model
    llm = _llm(path, **engine_args)
    for _ in range(2):  # the second round finds the first one's blocks in the prefix cache
        outputs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert _all_free(llm)
    stats = llm.engine.stats()
    if engine_args.get("enable_prefix_caching", True):
        assert stats.prefix_cache_hits > 0
    if "speculative_model" in engine_args:
        assert stats.num_draft_tokens > 0


def test_sliding_window_draft_model_keeps_greedy_tokens(model, tmp_path):
    """The other test model (another random init, so most drafts are rejected) as a draft model."""
    name, _, path, expected = model
    other = "qwen2-mixed" if name == "mistral" else "mistral"
    arch, overrides = MODELS[other]
    _, draft = make_hf_model(arch, tmp_path / other, seed=1, **overrides)
    llm = _llm(path, speculative_model=str(draft), num_speculative_tokens=3, speculative_adaptive=False)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.stats().num_draft_tokens > 0
    assert _all_free(llm)
    draft_blocks = llm.engine.speculator.proposer.block_manager
    assert draft_blocks.num_free_blocks == draft_blocks.num_blocks


def test_greedy_matches_hf_under_preemption(model):
    name, _, path, expected = model
    per_block = _llm(path).engine.runner.kv_bytes_per_block
    num_groups = 1 if name == "mistral" else 3
    # Room for 96 tokens per group: the longest sequence (77 tokens) fits, the batch does not.
    llm = _llm(path, kv_cache_memory=num_groups * 24 * per_block)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    if name != "mistral":  # every Mistral layer slides: its sequences stay too small to preempt
        assert llm.engine.stats().num_preemptions > 0
    assert _all_free(llm)


def test_sliding_groups_stay_within_the_window_while_the_full_group_grows(model):
    name, _, path, _ = model
    llm = _llm(path)
    engine = llm.engine
    specs = engine.runner.layout.group_specs
    sliding = [g for g, spec in enumerate(specs) if not spec.is_full]
    full = [g for g, spec in enumerate(specs) if spec.is_full]
    assert sliding and (name == "mistral" or full)
    engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        if engine.scheduler.running:
            seq = engine.scheduler.running[0]
            held.append([seq.num_held_blocks(g) for g in range(len(specs))])
            # One sequence, nothing shared: the pool's per-group counts are the sequence's.
            assert list(engine.stats().blocks_in_use_per_group) == held[-1]
    # A query sees WINDOW positions; with partial blocks at both ends that spans at most 3 blocks.
    bound = -(-(WINDOW - 1) // BLOCK) + 1
    assert all(h[g] <= bound for h in held for g in sliding)
    for g in full:
        assert [h[g] for h in held] == sorted(h[g] for h in held) and held[-1][g] >= (37 + 59) // BLOCK
    assert _all_free(llm)


def test_aborted_requests_give_every_block_back(model):
    _, _, path, _ = model
    llm = _llm(path, enable_chunked_prefill=True, max_num_batched_tokens=16)
    engine = llm.engine
    ids = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS]
    for _ in range(20):
        engine.step()
    assert engine.stats().num_used_blocks > 0
    for request_id in ids[::2]:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert _all_free(llm)


def test_block_bytes_follow_the_groups(model):
    name, _, path, _ = model
    runner = _llm(path).engine.runner
    caches = {id(m.k_cache): m.k_cache for m in runner.model.modules() if hasattr(m, "cache_group")}
    caches |= {id(m.v_cache): m.v_cache for m in runner.model.modules() if hasattr(m, "cache_group")}
    allocated = sum(t.numel() * t.element_size() for t in caches.values())
    assert allocated == runner.num_blocks * runner.kv_bytes_per_block
    assert len(caches) == 2 * (3 if name == "mistral" else 1)
