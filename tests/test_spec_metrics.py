"""Speculative-decoding metrics: each request's draft / accepted / verification counts, and the
server's ``/metrics`` lines for them.

The per-request counts are checked against what a spy sees at the engine's speculation seam
(drafts proposed, steps each sequence took part in) and against the tokens the request got:
every step a sequence samples in gives it one token of the target's own plus its accepted drafts.
"""

from __future__ import annotations

from collections import Counter

import pytest

from effinfer import LLM, SamplingParams
from tests.test_spec_decode import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


@pytest.fixture(scope="module")
def spec_llm(stories260k):
    return LLM(
        str(stories260k), speculative_model="ngram", num_speculative_tokens=4, speculative_adaptive=False,
        show_progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plain(stories260k):
    return LLM(str(stories260k), show_progress=False)


def _spy_on_speculator(speculator, monkeypatch) -> tuple[Counter, Counter, Counter]:
    """Per request id: draft tokens proposed, steps with drafts, and steps its sequences sampled in."""
    drafted, verify_steps, sampling_steps = Counter(), Counter(), Counter()
    propose, accept = speculator.propose, speculator.accept

    def spy_propose(batch):
        propose(batch)
        for entry in batch:
            if entry.draft_token_ids:
                drafted[entry.seq.request_id] += len(entry.draft_token_ids)
                verify_steps[entry.seq.request_id] += 1

    def spy_accept(batch, logits, sampling_row):
        sampling_steps.update(entry.seq.request_id for entry in batch)
        return accept(batch, logits, sampling_row)

    monkeypatch.setattr(speculator, "propose", spy_propose)
    monkeypatch.setattr(speculator, "accept", spy_accept)
    return drafted, verify_steps, sampling_steps


def test_per_request_counts_add_up_to_the_engine_totals(spec_llm, monkeypatch):
    before = spec_llm.engine.stats()
    drafted, verify_steps, sampling_steps = _spy_on_speculator(spec_llm.engine.speculator, monkeypatch)
    params = [GREEDY] * len(PROMPTS) + [SamplingParams(temperature=0, max_tokens=37, n=2, ignore_eos=True)]
    outputs = spec_llm.generate(PROMPTS + [PROMPTS[0]], params)
    after = spec_llm.engine.stats()

    per_request = [o.speculation for o in outputs]
    assert sum(m.num_draft_tokens for m in per_request) == after.num_draft_tokens - before.num_draft_tokens
    assert (
        sum(m.num_accepted_tokens for m in per_request)
        == after.num_accepted_tokens - before.num_accepted_tokens
    )
    assert sum(m.num_verify_steps for m in per_request) == after.num_verify_steps - before.num_verify_steps
    assert after.num_accepted_tokens > before.num_accepted_tokens
    for output in outputs:
        metrics, request_id = output.speculation, output.request_id
        assert metrics.num_accepted_tokens <= metrics.num_draft_tokens
        assert metrics.num_draft_tokens == drafted[request_id]
        assert metrics.num_verify_steps == verify_steps[request_id]
        # No stop can cut an accepted run short here (ignore_eos, drafts never pass max_tokens).
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        assert num_tokens == sampling_steps[request_id] + metrics.num_accepted_tokens
        if metrics.num_verify_steps:
            assert metrics.acceptance_rate == metrics.num_accepted_tokens / metrics.num_draft_tokens
            assert 1 <= metrics.mean_accepted_length <= 1 + 4


def test_streamed_updates_show_the_accepted_tokens(spec_llm, plain):
    updates = list(spec_llm.stream(PROMPTS[3], GREEDY))
    # Each update is one step: one token of the target's own, the rest accepted drafts.
    accepted = sum(len(u.outputs[0].delta_token_ids) - 1 for u in updates)
    final = updates[-1].speculation
    assert final.num_accepted_tokens == accepted > 0
    counts = [u.speculation.num_accepted_tokens for u in updates]
    assert counts == sorted(counts)  # running totals while streaming
    without = plain.generate(PROMPTS[3], GREEDY)[0].speculation
    assert (without.num_draft_tokens, without.num_verify_steps) == (0, 0)


# ---- the server ---------------------------------------------------------------------------------

SPEC_LINES = {
    "effinfer_spec_draft_tokens_total": "num_draft_tokens",
    "effinfer_spec_accepted_tokens_total": "num_accepted_tokens",
    "effinfer_spec_verify_steps_total": "num_verify_steps",
    "effinfer_spec_acceptance_ratio": "spec_acceptance_rate",
    "effinfer_spec_mean_accepted_length": "spec_mean_accepted_length",
}


@pytest.fixture(scope="module")
def spec_server(stories260k):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from tests.test_serve import start_server

    running = start_server(
        stories260k, speculative_model="ngram", num_speculative_tokens=4, speculative_adaptive=False
    )
    yield running
    running.stop()


def test_metrics_endpoint_reports_speculation(spec_server, spec_llm):
    from tests.test_serve import MODEL

    before = spec_server.wait_idle()
    expected = spec_llm.generate(PROMPTS[0], GREEDY)[0]
    completion = spec_server.client().completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=50, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].text == expected.outputs[0].text
    metrics = spec_server.wait_idle()
    stats = spec_server.async_engine.stats()
    for line, attribute in SPEC_LINES.items():
        assert metrics[line] == pytest.approx(getattr(stats, attribute), rel=1e-12), line
    # The same greedy request, offline, proposed and accepted exactly what the server counted.
    spec = expected.speculation
    assert spec.num_accepted_tokens > 0
    for line, count in (
        ("effinfer_spec_draft_tokens_total", spec.num_draft_tokens),
        ("effinfer_spec_accepted_tokens_total", spec.num_accepted_tokens),
        ("effinfer_spec_verify_steps_total", spec.num_verify_steps),
    ):
        assert metrics[line] - before[line] == count, line


def test_streaming_with_speculation_sends_several_tokens_per_event(spec_server, plain):
    from tests.test_serve import MODEL

    want = plain.generate(PROMPTS[2], GREEDY)[0].outputs[0].text
    chunks = list(
        spec_server.client().completions.create(
            model=MODEL,
            prompt=PROMPTS[2],
            max_tokens=50,
            temperature=0,
            logprobs=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    tokens_per_event = [
        len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs
    ]
    assert sum(tokens_per_event) == 50
    assert max(tokens_per_event) > 1


def test_an_output_keeps_its_logprobs_after_later_steps(spec_llm):
    """A streamed update is read by the server thread while the engine runs on: its logprobs must
    line up with its tokens however many steps later it is read (the live list did not, and the
    stream's delta then looked up a token in another token's alternatives)."""
    engine = spec_llm.engine
    engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0))
    updates = []
    while engine.has_unfinished_requests():
        updates += engine.step()
    for update in updates:
        completion = update.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(t in lp for t, lp in zip(completion.token_ids, completion.logprobs))
