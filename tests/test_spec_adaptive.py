"""Adaptive speculation length: the draft count follows the acceptance rate and the step cost,
and greedy output stays token-identical to plain decoding."""

from __future__ import annotations

import argparse

import pytest

from effinfer import LLM, SamplingParams
from effinfer.config import EngineArgs
from effinfer.spec.adaptive import AdaptiveSpeculationLength

GREEDY = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
PROMPTS = ["Once upon a time, there was a little dog named Max.", "Tom and Sue went to the park."]


class ScriptedProposer:
    """Proposes each sequence's true greedy continuation (from a plain run), or a wrong token
    in its place, and records the draft count it was allowed each step."""

    def __init__(
        self, continuations: dict[tuple[int, ...], list[int]], liars: set[tuple[int, ...]], vocab: int
    ):
        self.continuations = continuations
        self.liars = liars
        self.vocab = vocab
        self.limits: dict[tuple[int, ...], list[int]] = {key: [] for key in continuations}

    def propose(self, seqs, num_tokens):
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            key = tuple(seq.prompt_token_ids)
            self.limits[key].append(k)
            done = seq.num_output_tokens
            truth = self.continuations[key][done : done + k]
            drafts.append([(t + 1) % self.vocab for t in truth] if key in self.liars else truth)
        return drafts

    def forget(self, seq):
        pass


@pytest.mark.parametrize("adaptive", [True, False])
def test_draft_count_drops_for_rejected_drafts_and_stays_for_accepted_ones(stories260k, adaptive):
    plain = LLM(str(stories260k), show_progress=False)
    prompts = [plain.tokenizer.encode(p) for p in PROMPTS]
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY)]
    spec = LLM(
        str(stories260k),
        speculative_model="ngram",
        num_speculative_tokens=4,
        speculative_adaptive=adaptive,
        show_progress=False,
    )
    honest, liar = tuple(prompts[0]), tuple(prompts[1])
    proposer = ScriptedProposer(
        {honest: expected[0], liar: expected[1]}, {liar}, spec.engine.model_config.vocab_size
    )
    spec.engine.speculator.proposer = proposer

    outputs = spec.generate(prompts, GREEDY)

    assert [o.outputs[0].token_ids for o in outputs] == expected
    liar_limits, honest_limits = proposer.limits[liar], proposer.limits[honest]
    if not adaptive:
        assert min(liar_limits[:10]) == 4
        return
    # Switched off after a few rejections, re-probed now and then, never back on for good.
    tail = liar_limits[8:]
    assert tail.count(0) >= len(tail) - len(tail) // AdaptiveSpeculationLength(4).probe_interval - 1
    # The honest sequence drafts the full length once its first steps raised its rate from the
    # prior, for as long as at least 4 tokens remain.
    assert all(k == 4 for k in honest_limits[3:-2])


def test_cost_model_shortens_drafts_as_the_batch_grows():
    """Against a step cost of 1 + n/8 (compute-bound past a few tokens), the same acceptance rate
    earns long drafts alone and none in a large batch."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    for n in range(1, 40):
        adaptive.cost_model.observe(n, 1 + n / 8)
    for key in range(16):
        for _ in range(10):
            adaptive.observe(key, 4, 2)  # accept 2 of 4 each step: rate 2/3
    assert adaptive.rate(0) == pytest.approx(2 / 3, abs=0.02)
    alone = adaptive.choose([0], [4], 0)
    batched = adaptive.choose(list(range(16)), [4] * 16, 0)
    assert alone[0] >= 2
    assert sum(batched) < sum(alone) * 16 / 4
    # Brute force: no other draft allocation of the large batch expects more tokens per second.
    fixed, per_token = adaptive.cost_model.coefficients()

    def value(ks):
        tokens = sum(1 + sum((2 / 3) ** j for j in range(1, k + 1)) for k in ks)
        return tokens / (fixed + per_token * (len(ks) + sum(ks)))

    best_uniform = max(value([k] * 16) for k in range(5))
    assert value(batched) >= best_uniform - 1e-3


def test_flag_switches_adaptation_on():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).speculative_adaptive is False
    on = parser.parse_args(["--speculative-adaptive"])
    assert EngineArgs.cli_kwargs(on)["speculative_adaptive"] is True
    assert EngineArgs.from_cli_args(on).speculative_adaptive is True
