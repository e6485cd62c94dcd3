"""Engine behaviour through the public API on stories260K, a real trained model with a known answer."""

from __future__ import annotations

import pytest

from effinfer import LLM, SamplingParams
from effinfer.engine.runner import kv_bytes_per_block

STORY_PROMPTS = [
    "Once upon a time, there was a little dog named Max.",
    "Once upon a time, there was a little girl who liked to sing.",
    "Tom and Sue went to the park. They saw a big tree.",
    "One day, a cat found a red ball under the bed. The cat",
]
GREEDY = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(stories260k):
    return LLM(str(stories260k), show_progress=False)


def _texts(outputs):
    return [o.outputs[0].text for o in outputs]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_reference_from_bos(llm, stories260k):
    expected = (stories260k.parent / "greedy_reference.txt").read_text()
    out = llm.generate([[1]], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 200
    assert out[0].outputs[0].text == expected


def test_prefix_caching_and_preemption_do_not_change_greedy_output(stories260k, llm):
    reference = _tokens(llm.generate(STORY_PROMPTS * 2, GREEDY))
    assert llm.engine.stats().num_used_blocks == 0

    no_cache = LLM(str(stories260k), enable_prefix_caching=False, show_progress=False)
    assert _tokens(no_cache.generate(STORY_PROMPTS * 2, GREEDY)) == reference

    # Repeated prompts must hit the prefix cache and still give the same tokens.
    assert llm.engine.stats().prefix_cache_hits > 0

    model_config = llm.engine.model_config
    per_block = kv_bytes_per_block(model_config, 16, llm.engine.dtype)
    tiny = LLM(str(stories260k), kv_cache_memory=10 * per_block, show_progress=False)
    assert tiny.engine.stats().num_blocks == 10
    assert _tokens(tiny.generate(STORY_PROMPTS * 2, GREEDY)) == reference
    stats = tiny.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_used_blocks == 0 and stats.num_requests == 0


def test_token_id_prompts_equal_text_prompts(llm):
    ids = [llm.tokenizer.encode(p) for p in STORY_PROMPTS]
    assert _tokens(llm.generate(ids, GREEDY)) == _tokens(llm.generate(STORY_PROMPTS, GREEDY))
    out = llm.generate(STORY_PROMPTS[0], GREEDY)[0]
    assert out.prompt == STORY_PROMPTS[0] and out.prompt_token_ids == ids[0]


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=40, n=3, ignore_eos=True)
    first = llm.generate(STORY_PROMPTS[:2], params)
    # Same seed, different batch company: same completions.
    second = llm.generate([STORY_PROMPTS[3], STORY_PROMPTS[0], STORY_PROMPTS[1]], params)
    assert [c.token_ids for c in first[0].outputs] == [c.token_ids for c in second[1].outputs]
    assert [c.token_ids for c in first[1].outputs] == [c.token_ids for c in second[2].outputs]
    completions = [tuple(c.token_ids) for c in first[0].outputs]
    assert len(completions) == 3 and len(set(completions)) > 1


def test_top_k_1_equals_greedy(llm):
    sampled = SamplingParams(temperature=0.8, top_k=1, max_tokens=60, ignore_eos=True, seed=7)
    assert _tokens(llm.generate(STORY_PROMPTS, sampled)) == _tokens(llm.generate(STORY_PROMPTS, GREEDY))


def test_stop_strings_stop_tokens_and_lengths(llm):
    free = llm.generate(STORY_PROMPTS[0], GREEDY)[0].outputs[0]
    # Pick a stop string that really occurs in the free-running text.
    stop = free.text[25:31]
    first = free.text.find(stop)
    out = llm.generate(STORY_PROMPTS[0], SamplingParams(temperature=0, max_tokens=60, stop=[stop]))[
        0
    ].outputs[0]
    assert out.text == free.text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(
        STORY_PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=60, stop=stop, include_stop_str_in_output=True),
    )[0].outputs[0]
    assert out.text == free.text[: first + len(stop)]

    stop_token = free.token_ids[5]
    out = llm.generate(
        STORY_PROMPTS[0], SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[stop_token])
    )
    out = out[0].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_token) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token

    out = llm.generate(STORY_PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[
        0
    ].outputs[0]
    assert out.token_ids == free.token_ids[:7] and out.finish_reason == "length"


def test_eos_ends_generation_unless_ignored(llm):
    # stories260K separates stories with BOS and rarely emits EOS, so declare a token it does emit as EOS.
    free = llm.generate(STORY_PROMPTS[0], GREEDY)[0].outputs[0]
    eos = free.token_ids[9]
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = [eos]
    try:
        out = llm.generate(STORY_PROMPTS[0], SamplingParams(temperature=0, max_tokens=60))[0].outputs[0]
        ignored = llm.generate(STORY_PROMPTS[0], GREEDY)[0].outputs[0]
        at_least = llm.generate(STORY_PROMPTS[0], SamplingParams(temperature=0, max_tokens=60, min_tokens=20))
    finally:
        llm.engine.eos_token_ids = saved
    end = free.token_ids.index(eos)
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: end + 1]
    prompt_ids = llm.tokenizer.encode(STORY_PROMPTS[0])
    decode = llm.tokenizer.decode
    assert out.text == decode(prompt_ids + free.token_ids[:end])[len(decode(prompt_ids)) :]
    assert ignored.token_ids == free.token_ids
    # min_tokens bans EOS until 20 tokens exist, so generation runs past the first EOS.
    assert len(at_least[0].outputs[0].token_ids) >= 20
    assert eos not in at_least[0].outputs[0].token_ids[:20]


def test_logprobs_are_the_models_distribution(llm):
    import torch

    prompt = llm.tokenizer.encode(STORY_PROMPTS[2])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True))[0]
    first = out.outputs[0].logprobs[0]
    assert len(first) == 5 and out.outputs[0].token_ids[0] in first
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_path)
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
    top = expected.topk(5)
    assert set(first) == set(top.indices.tolist())
    for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
        assert first[token_id].logprob == pytest.approx(value, abs=1e-4)


def test_streaming_deltas_add_up_to_the_final_text(llm):
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, stop=["zzz-never"])
    pieces, tokens, last = [], [], None
    for update in llm.stream(STORY_PROMPTS[1], params):
        pieces.append(update.outputs[0].delta_text)
        tokens.extend(update.outputs[0].delta_token_ids)
        last = update
    assert last.finished
    assert "".join(pieces) == last.outputs[0].text
    assert tokens == last.outputs[0].token_ids
    assert last.outputs[0].text == llm.generate(STORY_PROMPTS[1], params)[0].outputs[0].text


def test_chat_uses_the_template(llm):
    llm.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} The{% endif %}"
    )
    try:
        chat = llm.chat([{"role": "user", "content": STORY_PROMPTS[3]}], GREEDY)[0]
    finally:
        llm.tokenizer.chat_template = None
    plain = llm.generate([llm.tokenizer.encode(STORY_PROMPTS[3] + " The", add_special_tokens=False)], GREEDY)[
        0
    ]
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def _blocks_holding(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def test_stats_match_an_independent_count_of_the_requests(stories260k):
    """Between steps, every running sequence holds the blocks of the tokens whose KV was computed:
    all but the token just sampled. Waiting ones hold none; finished and aborted ones give theirs back."""
    block_size = 16
    llm = LLM(
        str(stories260k),
        max_num_seqs=3,
        block_size=block_size,
        enable_prefix_caching=False,
        show_progress=False,
    )
    engine = llm.engine
    lengths = {"a": (30, 1), "b": (5, 2), "c": (45, 1), "d": (17, 1)}  # request -> (max_tokens, n)
    prompts = {"a": STORY_PROMPTS[0], "b": STORY_PROMPTS[1], "c": STORY_PROMPTS[2], "d": STORY_PROMPTS[3]}
    for request_id, (max_tokens, n) in lengths.items():
        params = SamplingParams(temperature=0, max_tokens=max_tokens, n=n, ignore_eos=True)
        engine.add_request(prompts[request_id], params, request_id)
    num_seqs = sum(n for _, n in lengths.values())
    assert engine.stats().num_waiting == num_seqs and engine.stats().num_used_blocks == 0

    latest = {}  # request id -> its last RequestOutput
    aborted = False
    seen_waiting_and_running = False
    while engine.has_unfinished_requests():
        for output in engine.step():
            latest[output.request_id] = output
        if not aborted and len(latest["a"].outputs[0].token_ids) >= 10:
            engine.abort_request("a")
            del latest["a"]
            aborted = True
        running = [
            (len(o.prompt_token_ids), len(c.token_ids))
            for o in latest.values()
            if not o.finished
            for c in o.outputs
            if not c.finished
        ]
        finished_seqs = sum(c.finished for o in latest.values() for c in o.outputs)
        stats = engine.stats()
        assert stats.num_running == len(running)
        assert stats.num_waiting == num_seqs - len(running) - finished_seqs - aborted
        assert stats.num_requests == len(lengths) - aborted - sum(o.finished for o in latest.values())
        assert stats.num_used_blocks == sum(_blocks_holding(p + t - 1, block_size) for p, t in running)
        seen_waiting_and_running |= stats.num_waiting > 0 and stats.num_running > 0
    assert aborted and seen_waiting_and_running and engine.stats().num_preemptions == 0
    assert engine.stats().num_used_blocks == 0 and engine.unfinished_request_ids() == []


def test_stats_count_prefix_cache_hits(stories260k):
    llm = LLM(str(stories260k), block_size=16, show_progress=False)
    prompt = llm.tokenizer.encode(" ".join(STORY_PROMPTS))  # more than two blocks
    before = llm.engine.stats()
    llm.generate([prompt], GREEDY)
    again = llm.generate([prompt], GREEDY)[0]
    after = llm.engine.stats()
    # Full blocks are reused except the one holding the last prompt token (its logits are needed).
    reusable = (len(prompt) - 1) // 16
    assert reusable >= 2
    assert after.prefix_cache_hits - before.prefix_cache_hits == reusable
    assert again.num_cached_tokens == 16 * reusable


def test_engine_answers_which_requests_it_holds(llm):
    engine = llm.engine
    engine.add_request(STORY_PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True), "first")
    engine.add_request(STORY_PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True), "second")
    assert engine.has_request("first") and not engine.has_request("third")
    assert engine.unfinished_request_ids() == ["first", "second"]
    assert engine.running_request_ids() == []
    engine.step()
    assert sorted(engine.running_request_ids()) == ["first", "second"]
    engine.abort_request("second")
    assert engine.unfinished_request_ids() == ["first"] and engine.running_request_ids() == ["first"]
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.has_request("first") and engine.unfinished_request_ids() == []
    assert engine.stats().num_used_blocks == 0
