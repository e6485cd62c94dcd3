"""The output processor on its own: tokens in, text, stop decisions and streaming deltas out.

The reference for every text is the tokenizer's one-shot ``decode`` of all tokens (HF tokenizers),
not the incremental path under test.
"""

from __future__ import annotations

import pytest

from effinfer import SamplingParams
from effinfer.engine.output_processor import OutputProcessor
from effinfer.engine.sequence import Sequence, SequenceStatus
from effinfer.tokenizer import Tokenizer

PROMPT = [1]  # BOS
STORY = "Once upon a time, there was a little dog named Max. He liked to play."
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(stories260k) -> Tokenizer:
    return Tokenizer.from_dir(stories260k)


@pytest.fixture(scope="module")
def story_ids(tokenizer) -> list[int]:
    return tokenizer.encode(STORY, add_special_tokens=False)


def reference_text(tokenizer: Tokenizer, generated: list[int]) -> str:
    return tokenizer.decode(PROMPT + generated)[len(tokenizer.decode(PROMPT)) :]


def generate(tokenizer, params: SamplingParams, tokens_per_seq: list[list[int]], max_model_len: int = 1000):
    """Feed each sequence its tokens, one step at a time, as the engine does; returns every update."""
    processor = OutputProcessor(tokenizer, [EOS], max_model_len)
    max_tokens = params.max_tokens or max_model_len
    seqs = [Sequence("req", i, PROMPT, params, 16, max_tokens) for i in range(params.n)]
    processor.add_request(None, seqs)
    updates = []
    for step in range(max(len(t) for t in tokens_per_seq)):
        for seq, tokens in zip(seqs, tokens_per_seq):
            if seq.is_finished or step >= len(tokens):
                continue
            seq.token_ids.append(tokens[step])
            processor.process_token(seq, None)
            if seq.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED  # what the scheduler does when told to finish it
        (update,) = processor.request_outputs(["req"])
        updates.append(update)
        if update.finished:
            assert not processor.has_request("req")
            break
    return updates


def test_deltas_add_up_to_the_text_and_tokens(tokenizer, story_ids):
    updates = generate(tokenizer, SamplingParams(max_tokens=len(story_ids)), [story_ids])
    final = updates[-1].outputs[0]
    assert updates[-1].finished and final.finish_reason == "length"
    assert final.text == reference_text(tokenizer, story_ids) == STORY
    assert "".join(u.outputs[0].delta_text for u in updates) == final.text
    assert [t for u in updates for t in u.outputs[0].delta_token_ids] == story_ids
    for step, update in enumerate(updates):
        # With no stop strings nothing is held back: each update shows all text decoded so far.
        assert update.outputs[0].text == reference_text(tokenizer, story_ids[: step + 1])


def test_a_multibyte_character_split_over_tokens_is_never_shown_half(tokenizer):
    ids = tokenizer.encode("The snow \u2603 man", add_special_tokens=False)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # the snowman really is split into bytes
    updates = generate(tokenizer, SamplingParams(max_tokens=len(ids)), [ids])
    assert all("\ufffd" not in u.outputs[0].delta_text for u in updates)
    assert "".join(u.outputs[0].delta_text for u in updates) == "The snow \u2603 man"


def test_stop_string_split_across_tokens_is_never_shown(tokenizer, story_ids):
    stop = "og nam"
    assert not any(stop in tokenizer.decode([i]) for i in story_ids)  # it spans several tokens
    updates = generate(tokenizer, SamplingParams(max_tokens=len(story_ids), stop=[stop]), [story_ids])
    final = updates[-1].outputs[0]
    assert final.text == STORY[: STORY.index(stop)]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    # Generation ended on the token that completed the stop string, not later.
    completing = next(
        i for i in range(len(story_ids)) if stop in reference_text(tokenizer, story_ids[: i + 1])
    )
    assert final.token_ids == story_ids[: completing + 1]
    for update in updates:
        assert final.text.startswith(update.outputs[0].text)  # no update ever showed part of the stop
    assert "".join(u.outputs[0].delta_text for u in updates) == final.text


def test_holdback_is_the_longest_stop_string_less_one_and_released_at_the_end(tokenizer, story_ids):
    stops = ["dog walked", "zz"]  # "dog " starts the first, which then never completes
    updates = generate(tokenizer, SamplingParams(max_tokens=len(story_ids), stop=stops), [story_ids])
    holdback = len("dog walked") - 1
    for step, update in enumerate(updates[:-1]):
        so_far = reference_text(tokenizer, story_ids[: step + 1])
        assert update.outputs[0].text == so_far[: max(0, len(so_far) - holdback)]
    final = updates[-1].outputs[0]
    assert final.finish_reason == "length" and final.text == STORY
    assert "".join(u.outputs[0].delta_text for u in updates) == STORY


def test_include_stop_string_and_earliest_stop_wins(tokenizer, story_ids):
    params = SamplingParams(
        max_tokens=len(story_ids), stop=["Max", "little"], include_stop_str_in_output=True
    )
    final = generate(tokenizer, params, [story_ids])[-1].outputs[0]
    assert final.text == STORY[: STORY.index("little") + len("little")]
    assert final.stop_reason == "little"


def test_stop_token_and_eos_end_without_their_text(tokenizer, story_ids):
    named = next(i for i in story_ids if tokenizer.decode([i]).strip() == "named")
    final = generate(tokenizer, SamplingParams(max_tokens=100, stop_token_ids=[named]), [story_ids])[-1]
    cut = story_ids.index(named)
    assert final.outputs[0].token_ids == story_ids[: cut + 1]
    assert final.outputs[0].text == reference_text(tokenizer, story_ids[:cut])
    assert final.outputs[0].stop_reason == named

    with_eos = story_ids[:4] + [EOS] + story_ids[4:]
    final = generate(tokenizer, SamplingParams(max_tokens=100), [with_eos])[-1].outputs[0]
    assert final.token_ids == with_eos[:5] and final.text == reference_text(tokenizer, story_ids[:4])
    assert (final.finish_reason, final.stop_reason) == ("stop", None)
    ignored = generate(tokenizer, SamplingParams(max_tokens=8, ignore_eos=True), [with_eos])[-1].outputs[0]
    assert ignored.token_ids == with_eos[:8] and ignored.finish_reason == "length"


def test_context_length_ends_generation(tokenizer, story_ids):
    final = generate(tokenizer, SamplingParams(max_tokens=None), [story_ids], max_model_len=6)[-1].outputs[0]
    assert final.token_ids == story_ids[:5] and final.finish_reason == "length"


def test_n_sequences_keep_their_own_text_and_deltas(tokenizer, story_ids):
    other = tokenizer.encode("The snow \u2603 man", add_special_tokens=False)
    params = SamplingParams(n=2, max_tokens=len(story_ids), stop=["Max"])
    updates = generate(tokenizer, params, [story_ids, other + [EOS]])
    assert updates[-1].finished
    first, second = updates[-1].outputs
    assert (first.index, second.index) == (0, 1)
    assert (first.text, first.stop_reason) == (STORY[: STORY.index("Max")], "Max")
    assert (second.text, second.token_ids) == ("The snow \u2603 man", other + [EOS])
    for i, completion in enumerate((first, second)):
        assert "".join(u.outputs[i].delta_text for u in updates) == completion.text
        assert [t for u in updates for t in u.outputs[i].delta_token_ids] == completion.token_ids


def test_logprobs_carry_the_decoded_token(tokenizer, story_ids):
    processor = OutputProcessor(tokenizer, [EOS], 100)
    params = SamplingParams(max_tokens=2, logprobs=1)
    seq = Sequence("req", 0, PROMPT, params, 16, 2)
    processor.add_request("prompt", [seq])
    seq.token_ids.append(story_ids[0])
    processor.process_token(seq, {story_ids[0]: -0.5, story_ids[1]: -1.5})
    (update,) = processor.request_outputs(["req"])
    (step,) = update.outputs[0].logprobs
    assert step[story_ids[1]].logprob == -1.5
    assert step[story_ids[1]].decoded_token == tokenizer.decode([story_ids[1]], skip_special_tokens=False)
    assert update.prompt == "prompt" and not update.finished
    processor.remove_request("req")
    assert not processor.has_request("req") and processor.request_ids() == []
