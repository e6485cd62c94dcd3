"""Adaptive speculation length: the draft count follows the acceptance rate and the step cost,
and greedy output stays token-identical to plain decoding."""

from __future__ import annotations

import argparse

import pytest

from effinfer import LLM, SamplingParams
from effinfer.config import EngineArgs
from effinfer.spec.adaptive import AdaptiveSpeculationLength, StepCost

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


class FixedCost:
    """A step-cost model that ignores measurements: memory-bound, one more token costs 1%."""

    def __init__(self, cost: StepCost) -> None:
        self.cost = cost

    def observe(self, num_tokens: int, seconds: float, num_verifiers: int = 0) -> None:
        pass

    def coefficients(self) -> StepCost:
        return self.cost


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
    if adaptive:  # measured step times would make the draft counts depend on the machine's load
        spec.engine.speculator.adaptive.cost_model = FixedCost(StepCost(1.0, 0.01, 0.0))

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
    """Against a step cost of 1 + n/4 (compute-bound past a few tokens), the same acceptance rate
    earns long drafts alone and few in a large batch."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    for n in range(1, 40):
        adaptive.cost_model.observe(n, 1 + n / 4)
    for key in range(16):
        for _ in range(10):
            adaptive.observe(key, 4, 2)  # accept 2 of 4 each step: rate 2/3
    assert adaptive.rate(0) == pytest.approx(2 / 3, abs=0.02)
    alone = adaptive.choose([0], [4], 0)
    batched = adaptive.choose(list(range(16)), [4] * 16, 0)
    assert alone[0] >= 2
    assert sum(batched) < sum(alone) * 16 / 4
    # Brute force: no other draft allocation of the large batch expects more tokens per second.
    cost = adaptive.cost_model.coefficients()
    # The fit finds the slope; the ridge towards the prior (5% a token) costs it a few per cent.
    assert cost.per_token == pytest.approx(0.25, rel=0.05) and cost.fixed == pytest.approx(1, rel=0.1)

    def value(ks):
        tokens = sum(1 + sum((2 / 3) ** j for j in range(1, k + 1)) for k in ks)
        return tokens / cost(len(ks) + sum(ks), sum(k > 0 for k in ks))

    best_uniform = max(value([k] * 16) for k in range(5))
    assert value(batched) >= best_uniform - 1e-3


def test_adaptation_is_the_default_and_a_flag_pins_k():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).speculative_adaptive is True
    fixed = parser.parse_args(["--no-speculative-adaptive"])
    assert EngineArgs.cli_kwargs(fixed)["speculative_adaptive"] is False
    assert EngineArgs.from_cli_args(fixed).speculative_adaptive is False


def _compute_bound(adaptive: AdaptiveSpeculationLength) -> None:
    for n in range(1, 40):
        adaptive.cost_model.observe(n, 1 + n / 8)


def test_sequence_switched_off_by_cost_is_reprobed_and_comes_back():
    """Two early rejections leave an estimate of about 0.16: above the 0.1 floor, but in a batch
    of 4 under a compute-bound cost no draft pays at that rate. After ``probe_interval`` idle
    steps each sequence gets a probe; once probes are accepted, drafting stays on."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    _compute_bound(adaptive)
    keys = [0, 1, 2, 3]
    for key in keys:
        for _ in range(2):
            adaptive.observe(key, 4, 0)
    assert 0.1 < adaptive.rate(0) < 0.2
    first_draft_step = {}
    for step in range(adaptive.probe_interval + 2):
        for key, k in zip(keys, adaptive.choose(keys, [4] * 4, 0)):
            if k:
                first_draft_step.setdefault(key, step)
                adaptive.observe(key, k, k)  # the text turned repetitive: every draft is accepted
    assert sorted(first_draft_step) == keys
    assert min(first_draft_step.values()) >= adaptive.probe_interval  # idle before the probe
    for _ in range(5):
        ks = adaptive.choose(keys, [4] * 4, 0)
        for key, k in zip(keys, ks):
            adaptive.observe(key, k, k)
    assert all(k > 0 for k in ks)


def test_no_probe_is_spent_where_the_cost_rules_drafts_out():
    """In a batch of 16 under the same cost, a draft does not pay even at the prior rate: sequences
    switched off stay off, however long they wait."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    _compute_bound(adaptive)
    keys = list(range(16))
    for key in keys:
        adaptive.observe(key, 4, 0)
    for _ in range(3 * adaptive.probe_interval):
        assert adaptive.choose(keys, [4] * 16, 0) == [0] * 16


def test_a_dear_verifying_sequence_concentrates_the_drafts():
    """When each verifying sequence costs a call of its own (here a quarter of a step) and tokens
    are cheap, the fit finds that cost, and drafts go in full lengths to a few sequences rather
    than one each to all; no allocation of s sequences times k drafts expects more per second."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    for n in range(16, 81, 4):
        for m in range(0, 17, 2):
            adaptive.cost_model.observe(n, 1 + n / 50 + m / 4, m)
    cost = adaptive.cost_model.coefficients()
    assert cost.per_verifier == pytest.approx(0.25, rel=0.1)
    keys = list(range(16))
    for key in keys:
        for _ in range(10):
            adaptive.observe(key, 4, 4)
    rate = adaptive.rate(0)
    ks = adaptive.choose(keys, [4] * 16, 0)
    assert set(ks) <= {0, 4} and 0 < sum(ks)

    def value(s, k):
        return (16 + s * sum(rate**j for j in range(1, k + 1))) / cost(16 + s * k, s if k else 0)

    chosen = value(sum(k > 0 for k in ks), 4)
    assert all(chosen >= value(s, k) - 1e-9 for s in range(17) for k in range(5))


def test_one_stalled_step_does_not_tilt_the_cost_fit():
    """A step that stalls (another process took the CPU) counts at most twice its prediction, so
    the fitted slopes stay near the truth instead of following the outlier for dozens of steps."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    for n in range(1, 40):
        adaptive.cost_model.observe(n, 1 + n / 8)
    adaptive.cost_model.observe(20, 100.0)
    cost = adaptive.cost_model.coefficients()
    assert cost.fixed == pytest.approx(1, rel=0.3) and cost.per_token == pytest.approx(1 / 8, rel=0.3)


def test_new_sequence_starts_from_the_pooled_rate():
    """Where drafts have been accepted almost always, a new sequence's prior is that rate, and one
    rejected first draft leaves it drafting instead of idle until the next probe."""
    adaptive = AdaptiveSpeculationLength(max_k=4)
    for key in range(8):
        for _ in range(5):
            adaptive.observe(key, 4, 4)
    assert adaptive.pooled_rate > 0.9
    assert adaptive.rate(100) == adaptive.pooled_rate
    adaptive.observe(100, 4, 0)
    assert adaptive.rate(100) > 0.4  # from the fixed prior of 0.6 one rejection gave 0.27
