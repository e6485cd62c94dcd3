"""Tests for effinfer.layers.sampler: greedy, seeding, sampled distributions, penalties, logprobs, bans.

Distribution tests compare many draws against targets computed independently with numpy in float64,
using a chi-square goodness-of-fit test under a fixed seed, so they are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effinfer.layers.sampler import Sampler, SamplingRow, apply_penalties
from effinfer.sampling_params import SamplingParams

# Distinct values (no ties) so every filter has a single well-defined answer.
LOGITS = np.array([2.0, 1.6, 1.3, 1.1, 0.8, 0.5, 0.2, 0.0, -0.3, -0.7, -1.2, -2.0])
NUM_DRAWS = 40_000


def row(params: SamplingParams | None = None, **kwargs) -> SamplingRow:
    fields = {"prompt_token_ids": [], "output_token_ids": [], "generator": None} | kwargs
    return SamplingRow(params=params or SamplingParams(), **fields)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def chi_square_p_value(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    observed, expected = counts.astype(np.float64), expected_probs * counts.sum()
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    # Survival function of chi2(dof) is the regularised upper incomplete gamma Q(dof/2, x/2).
    return torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2)
    ).item()


def draw_counts(params: SamplingParams, logits: np.ndarray = LOGITS, seed: int = 0) -> np.ndarray:
    """Sample NUM_DRAWS tokens as one batch of identical unseeded rows under a fixed global seed."""
    batch = torch.tensor(logits, dtype=torch.float32).expand(NUM_DRAWS, -1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        result = Sampler()(batch, [row(params)] * NUM_DRAWS)
    return np.bincount(result.token_ids, minlength=len(logits))


def assert_matches(counts: np.ndarray, target: np.ndarray) -> None:
    kept = target > 0
    assert counts[~kept].sum() == 0, f"excluded tokens were sampled: {np.flatnonzero(counts * ~kept)}"
    p_value = chi_square_p_value(counts[kept], target[kept])
    assert p_value > 1e-3, (
        f"p={p_value:.2e}; counts={counts.tolist()} target={np.round(target * counts.sum())}"
    )


def np_top_k(probs: np.ndarray, k: int) -> np.ndarray:
    kept = np.zeros_like(probs)
    top = np.argsort(-probs)[:k]
    kept[top] = probs[top]
    return kept / kept.sum()


def np_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    kept, mass = np.zeros_like(probs), 0.0
    for token in np.argsort(-probs):
        kept[token] = probs[token]
        mass += probs[token]
        if mass >= top_p:
            break
    return kept / kept.sum()


def np_min_p(probs: np.ndarray, min_p: float) -> np.ndarray:
    kept = np.where(probs >= min_p * probs.max(), probs, 0.0)
    return kept / kept.sum()


# --- greedy -------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 1000, generator=seeded(1))
    result = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 6


def test_top_k_one_is_greedy_even_with_high_temperature():
    logits = torch.randn(8, 500, generator=seeded(2))
    rows = [row(SamplingParams(temperature=1.5, top_k=1)) for _ in range(8)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(5):
            assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_greedy_uses_no_randomness():
    logits = torch.randn(2, 50, generator=seeded(3))
    generator = seeded(3)
    state = generator.get_state()
    global_state = torch.get_rng_state()
    Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=1), generator=generator)] * 2)
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_greedy_in_mixed_batch_and_low_precision_input():
    logits = torch.randn(4, 300, generator=seeded(4)).to(torch.bfloat16)
    original = logits.clone()
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=1.0), generator=seeded(0)),
        row(SamplingParams(temperature=0.0, logprobs=2)),
        row(SamplingParams(temperature=0.8, top_p=0.5)),
    ]
    result = Sampler()(logits, rows)
    expected = logits.float().argmax(-1)
    assert result.token_ids[0] == expected[0] and result.token_ids[2] == expected[2]
    assert torch.equal(logits, original), "the sampler must not modify its input"


# --- seeding ------------------------------------------------------------------------------------


def draw_sequence(rows_for_step, logits: torch.Tensor, steps: int = 20) -> list[list[int]]:
    sampler = Sampler()
    return [sampler(logits, rows_for_step).token_ids for _ in range(steps)]


def test_seeded_rows_are_reproducible():
    logits = torch.randn(1, 2000, generator=seeded(5))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    first = draw_sequence([row(params, generator=seeded(123))], logits)
    second = draw_sequence([row(params, generator=seeded(123))], logits)
    other_seed = draw_sequence([row(params, generator=seeded(124))], logits)
    assert first == second
    assert first != other_seed
    assert len({step[0] for step in first}) > 1, "draws should vary between steps"


def test_seeded_row_ignores_rest_of_batch():
    vocab = 2000
    target_logits = torch.randn(vocab, generator=seeded(6))
    params = SamplingParams(temperature=0.9, top_k=50, min_p=0.01, seed=7)

    alone = draw_sequence([row(params, generator=seeded(7))], target_logits.unsqueeze(0))

    neighbours = torch.randn(4, vocab, generator=seeded(8))
    batch_logits = torch.cat([neighbours[:2], target_logits.unsqueeze(0), neighbours[2:]])
    batch_rows = [
        row(SamplingParams(temperature=1.3)),
        row(SamplingParams(temperature=0.5, top_p=0.7, seed=1), generator=seeded(1)),
        row(params, generator=seeded(7)),
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.3), output_token_ids=[1, 2]),
    ]
    in_batch = [step[2] for step in draw_sequence(batch_rows, batch_logits)]
    assert [step[0] for step in alone] == in_batch


# --- sampled distributions ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_temperature_distribution(temperature):
    counts = draw_counts(SamplingParams(temperature=temperature))
    assert_matches(counts, np_softmax(LOGITS / temperature))


def test_top_k_distribution():
    counts = draw_counts(SamplingParams(temperature=1.0, top_k=4))
    assert_matches(counts, np_top_k(np_softmax(LOGITS), 4))


@pytest.mark.parametrize("top_p", [0.5, 0.8])
def test_top_p_distribution(top_p):
    counts = draw_counts(SamplingParams(temperature=1.0, top_p=top_p))
    assert_matches(counts, np_top_p(np_softmax(LOGITS), top_p))


def test_top_p_always_keeps_top_token():
    logits = np.array([5.0, 0.0, -1.0, -2.0])
    counts = draw_counts(SamplingParams(temperature=1.0, top_p=0.01), logits=logits)
    assert counts.tolist() == [NUM_DRAWS, 0, 0, 0]


def test_min_p_distribution():
    counts = draw_counts(SamplingParams(temperature=1.0, min_p=0.2))
    assert_matches(counts, np_min_p(np_softmax(LOGITS), 0.2))


def test_combined_filters_distribution():
    params = SamplingParams(temperature=0.8, top_k=9, top_p=0.9, min_p=0.1)
    target = np_min_p(np_top_p(np_top_k(np_softmax(LOGITS / 0.8), 9), 0.9), 0.1)
    assert (target > 0).sum() >= 4, "the combination should leave several tokens to compare"
    assert_matches(draw_counts(params), target)


def test_mixed_batch_applies_each_rows_own_settings():
    groups = [
        (SamplingParams(temperature=1.0, top_k=3), np_top_k(np_softmax(LOGITS), 3)),
        (SamplingParams(temperature=1.4), np_softmax(LOGITS / 1.4)),
        (SamplingParams(temperature=0.9, top_p=0.6), np_top_p(np_softmax(LOGITS / 0.9), 0.6)),
        (SamplingParams(temperature=1.0, min_p=0.3), np_min_p(np_softmax(LOGITS), 0.3)),
    ]
    per_group = 12_000
    rows = [row(params) for _ in range(per_group) for params, _ in groups]  # interleaved
    batch = torch.tensor(LOGITS, dtype=torch.float32).expand(len(rows), -1)
    with torch.random.fork_rng():
        torch.manual_seed(14)
        token_ids = np.array(Sampler()(batch, rows).token_ids)
    for g, (_, target) in enumerate(groups):
        assert_matches(np.bincount(token_ids[g :: len(groups)], minlength=len(LOGITS)), target)


def test_seeded_rows_follow_the_distribution():
    n = 5000
    params = SamplingParams(temperature=1.2, top_k=8)
    rows = [row(params, generator=seeded(seed)) for seed in range(n)]
    batch = torch.tensor(LOGITS, dtype=torch.float32).expand(n, -1)
    counts = np.bincount(Sampler()(batch, rows).token_ids, minlength=len(LOGITS))
    assert_matches(counts, np_top_k(np_softmax(LOGITS / 1.2), 8))


# --- penalties ----------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    vocab = 64
    logits = torch.randn(3, vocab, generator=seeded(9)) * 3
    prompts = [[1, 5, 5, 9, 40], [2, 3], [7, 8]]
    outputs = [[9, 12, 33], [3, 3, 60], []]
    penalties = [1.3, 0.7, 2.0]
    rows = [
        row(SamplingParams(repetition_penalty=p), prompt_token_ids=pr, output_token_ids=out)
        for p, pr, out in zip(penalties, prompts, outputs)
    ]
    original = logits.clone()
    actual = apply_penalties(logits, rows)
    assert torch.equal(logits, original), "apply_penalties must not modify its input"

    for i, (penalty, prompt, output) in enumerate(zip(penalties, prompts, outputs)):
        processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        expected = processor(torch.tensor([prompt + output]), logits[i : i + 1].clone())[0]
        torch.testing.assert_close(actual[i], expected, rtol=0, atol=0)
        assert not torch.equal(actual[i], logits[i])


def test_presence_and_frequency_penalties():
    vocab = 10
    logits = torch.linspace(-2, 2, vocab).repeat(2, 1)
    rows = [
        row(
            SamplingParams(frequency_penalty=0.5, presence_penalty=1.5),
            prompt_token_ids=[0, 7],
            output_token_ids=[3, 3, 5, 3],
        ),
        row(SamplingParams()),
    ]
    expected = logits.clone()
    expected[0, 3] -= 0.5 * 3 + 1.5
    expected[0, 5] -= 0.5 * 1 + 1.5
    # Prompt tokens 0 and 7 are not penalised by the OpenAI penalties.
    torch.testing.assert_close(apply_penalties(logits, rows), expected)


def test_repetition_applied_before_frequency_and_presence():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=-0.5)
    rows = [row(params, prompt_token_ids=[2], output_token_ids=[0, 1, 1])]
    expected = torch.tensor(
        [[2.0 / 2 - 0.25 * 1 + 0.5, -2.0 * 2 - 0.25 * 2 + 0.5, 1.0 / 2, 0.5]],
    )
    torch.testing.assert_close(apply_penalties(logits, rows), expected)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5)
    assert Sampler()(logits, [row(params, output_token_ids=[0])]).token_ids == [1]


# --- logprobs -----------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    logits = torch.randn(3, 400, generator=seeded(10)) * 2
    rows = [
        row(
            SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.5, logprobs=5),
            output_token_ids=[1],
        ),
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=1.0, logprobs=0), generator=seeded(0)),
    ]
    with torch.random.fork_rng():
        torch.manual_seed(11)
        result = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)

    first = result.logprobs[0]
    top5 = raw[0].topk(5).indices.tolist()
    assert set(first) == set(top5) | {result.token_ids[0]}
    for token, logprob in first.items():
        assert logprob == pytest.approx(raw[0, token].item(), abs=1e-6)

    assert result.logprobs[1] is None
    assert result.logprobs[2] == pytest.approx({result.token_ids[2]: raw[2, result.token_ids[2]].item()})


def test_logprobs_include_sampled_token_outside_top():
    # Nearly uniform: the sampled token is usually not the single most likely one.
    logits = torch.zeros(1, 100)
    logits[0, 42] = 0.5
    with torch.random.fork_rng():
        torch.manual_seed(12)
        results = [Sampler()(logits, [row(SamplingParams(logprobs=1))]) for _ in range(5)]
    outside = [r for r in results if r.token_ids[0] != 42]
    assert outside
    for r in outside:
        assert set(r.logprobs[0]) == {42, r.token_ids[0]}


# --- banned tokens ------------------------------------------------------------------------------


def test_banned_tokens_are_never_sampled():
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(2000, -1).clone()
    logits[:, 11] = 10.0  # would win nearly every draw
    banned = [11, 0, 3]
    rows = [row(SamplingParams(temperature=1.0), banned_token_ids=banned) for _ in range(1000)]
    rows += [row(SamplingParams(temperature=1.3, top_k=3), banned_token_ids=banned) for _ in range(999)]
    rows += [row(SamplingParams(temperature=0.0), banned_token_ids=banned)]
    with torch.random.fork_rng():
        torch.manual_seed(13)
        token_ids = Sampler()(logits, rows).token_ids
    assert not set(token_ids) & set(banned)
    assert token_ids[-1] == 1
    assert len(set(token_ids)) > 3


def test_ban_applies_only_to_its_row():
    logits = torch.tensor([[0.0, 5.0, 1.0]] * 2)
    rows = [row(SamplingParams(temperature=0.0), banned_token_ids=[1]), row(SamplingParams(temperature=0.0))]
    assert Sampler()(logits, rows).token_ids == [2, 1]


def test_top_k_keeps_ties_with_kth_logit():
    # Common with bf16 logits; like vLLM and HF, every token tied with the k-th one stays eligible.
    counts = draw_counts(SamplingParams(temperature=1.0, top_k=2), logits=np.array([1.0, 0.5, 0.5, 0.0]))
    assert_matches(counts, np.array([np.e, np.e**0.5, np.e**0.5, 0.0]) / (np.e + 2 * np.e**0.5))
