"""Adaptive speculation length: draft only as many tokens as pay for their verification.

Papers: Leviathan et al. 2023 (section 3.5: the expected tokens per step for k drafts at
acceptance rate a is (1 - a^(k+1)) / (1 - a), and the best k trades it against step cost);
Liu et al. 2024 ("Optimizing Speculative Decoding for Serving LLMs Using Goodput") for choosing
k per sequence from the batch's load.
Idea: keep each sequence's acceptance rate as a moving average and a measured model of step time
against the step's query tokens; each step, give the next draft slot to the sequence whose next
draft is the likeliest to be accepted, as long as the batch's expected tokens per second rises.
A new sequence starts from the rate pooled over all recent verifications (what this proposer
achieves on this workload), so one unlucky first draft does not switch it off. A sequence that has
drafted nothing for a while (its acceptance fell, or the batch made drafts too dear) is re-probed:
for one step it competes at least at the prior rate, so its estimate is refreshed whenever
drafting could pay, and never while the step cost rules drafts out for any rate.
Switch on: ``LLM(model, speculative_model=..., speculative_adaptive=True)`` or
``--speculative-adaptive``; without it ``num_speculative_tokens`` are drafted every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class _Acceptance:
    """Exponentially weighted counts of draft trials and acceptances of one sequence."""

    accepted: float
    trials: float
    steps_idle: int = 0  # consecutive steps it was given no draft

    @property
    def rate(self) -> float:
        return self.accepted / self.trials


@dataclass
class StepCost:
    """Seconds of one step: ``fixed + per_token * query_tokens + per_verifier * verifying_seqs``."""

    fixed: float
    per_token: float
    per_verifier: float

    def __call__(self, num_tokens: int, num_verifiers: int) -> float:
        return self.fixed + self.per_token * num_tokens + self.per_verifier * num_verifiers


class StepCostModel:
    """Step time against the step's query tokens and its verifying sequences, fitted by
    exponentially weighted ridge regression on measured steps.

    On a CPU a decode step first pays for reading the weights (``fixed``); past a few query
    tokens the matrix products become compute-bound and each token adds ``per_token``; and a
    sequence that verifies drafts leaves the batched one-token attention for a call of its own
    (``per_verifier``). The ridge pulls the two slopes towards a prior (one more token costs
    ``prior_token_share`` of a one-token step; a verifier costs nothing beyond its tokens) with the
    weight of a spread of a few tokens, so steps of nearly one size (batch 1 under a noisy shared
    CPU) leave the prior in charge and steps of many sizes (drafting batches) overrule it.
    """

    def __init__(
        self,
        decay: float = 0.98,
        prior_token_share: float = 0.05,
        prior_weight: float = 4.0,
        outlier_factor: float = 2.0,
    ) -> None:
        self.decay = decay
        self.prior_token_share = prior_token_share
        self.prior_weight = prior_weight
        self.outlier_factor = outlier_factor
        self._xtx = torch.zeros(3, 3, dtype=torch.float64)  # features: 1, tokens, verifiers
        self._xty = torch.zeros(3, dtype=torch.float64)

    def observe(self, num_tokens: int, seconds: float, num_verifiers: int = 0) -> None:
        """One measured step. Once a few steps are in, a step is counted at most ``outlier_factor``
        times its prediction: one stall (another process, a collection) would otherwise tilt the
        slopes for dozens of steps, and while no one drafts, no step of another size corrects them."""
        if float(self._xtx[0, 0]) >= 3.0:
            seconds = min(seconds, self.outlier_factor * self.coefficients()(num_tokens, num_verifiers))
        x = torch.tensor([1.0, num_tokens, num_verifiers], dtype=torch.float64)
        self._xtx.mul_(self.decay).add_(torch.outer(x, x))
        self._xty.mul_(self.decay).add_(x * seconds)

    def coefficients(self) -> StepCost:
        """The fitted cost in seconds; relative units (a one-token step costs about 1) before data."""
        weight = float(self._xtx[0, 0])
        if weight < 1.0:
            return StepCost(1.0, self.prior_token_share, 0.0)
        mean_n, mean_t = float(self._xtx[0, 1]) / weight, float(self._xty[0]) / weight
        fixed_prior = mean_t / (1 + self.prior_token_share * mean_n)
        prior = torch.tensor([fixed_prior, self.prior_token_share * fixed_prior, 0.0], dtype=torch.float64)
        # Verifier counts spread less than token counts: their prior weighs a spread of one.
        ridge = torch.diag(torch.tensor([0.0, self.prior_weight, 1.0], dtype=torch.float64)) * weight
        fixed, per_token, per_verifier = torch.linalg.solve(
            self._xtx + ridge, self._xty + ridge @ prior
        ).tolist()
        # Noise can tilt a slope below zero; a step never gets cheaper for more work.
        per_token, per_verifier = max(per_token, 0.0), max(per_verifier, 0.0)
        mean_m = float(self._xtx[0, 2]) / weight
        fixed = max(mean_t - per_token * mean_n - per_verifier * mean_m, 1e-3 * mean_t)
        return StepCost(fixed, per_token, per_verifier)


class AdaptiveSpeculationLength:
    """Chooses each sequence's draft count per step; ``observe`` feeds back what was accepted."""

    def __init__(
        self,
        max_k: int,
        initial_rate: float = 0.6,
        decay: float = 0.8,
        min_rate: float = 0.1,
        probe_interval: int = 16,
        pooled_decay: float = 0.95,
    ) -> None:
        self.max_k = max_k
        self.initial_rate = initial_rate
        self.decay = decay
        self.min_rate = min_rate
        self.probe_interval = probe_interval
        self.pooled_decay = pooled_decay
        # Every sequence's trials together, weighted as a few trials at the prior to begin with.
        self._pooled = _Acceptance(initial_rate * 4, 4.0)
        self.cost_model = StepCostModel()
        self._acceptance: dict[int, _Acceptance] = {}
        self._step_started: float | None = None
        self._step_shape = (0, 0)  # query tokens, verifying sequences

    def rate(self, key: int) -> float:
        state = self._acceptance.get(key)
        return state.rate if state else self.pooled_rate

    @property
    def pooled_rate(self) -> float:
        """The acceptance rate over all sequences' recent verifications: a new sequence's prior."""
        return self._pooled.rate

    def choose(self, keys: list[int], limits: list[int], other_tokens: int) -> list[int]:
        """Draft counts (each at most its limit) for the sequences ``keys``, which each verify one
        token of their own; ``other_tokens`` are the step's remaining (prefill) query tokens."""
        rates = [self._planning_rate(key) for key in keys]
        cost = self.cost_model.coefficients()
        base_tokens = other_tokens + len(keys)
        best_value, ks = len(keys) / cost(base_tokens, 0), [0] * len(keys)
        for shape in (self._spread, self._concentrated):
            allocation = shape(rates, limits, cost, base_tokens)
            gained = sum(sum(rates[i] ** j for j in range(1, k + 1)) for i, k in enumerate(allocation))
            value = (len(keys) + gained) / cost(base_tokens + sum(allocation), sum(k > 0 for k in allocation))
            if value > best_value:
                best_value, ks = value, allocation
        for key, k in zip(keys, ks):
            state = self._acceptance.get(key)
            if state is not None:
                state.steps_idle = 0 if k else state.steps_idle + 1
        return ks

    @staticmethod
    def _spread(rates: list[float], limits: list[int], cost: StepCost, base_tokens: int) -> list[int]:
        """Draft slots one at a time to the likeliest next draft (rate^j for a sequence's j-th),
        cut where the expected tokens per second peak: the best allocation when a draft costs
        only its token."""
        candidates = [
            (rate**j, i) for i, (rate, limit) in enumerate(zip(rates, limits)) for j in range(1, limit + 1)
        ]
        candidates.sort(key=lambda c: -c[0])
        expected, best_value, best_count = float(len(rates)), 0.0, 0
        verifiers: set[int] = set()
        for count, (gain, i) in enumerate(candidates, start=1):
            expected += gain
            verifiers.add(i)
            value = expected / cost(base_tokens + count, len(verifiers))
            if value > best_value:
                best_value, best_count = value, count
        ks = [0] * len(rates)
        for _, i in candidates[:best_count]:
            ks[i] += 1
        return ks

    @staticmethod
    def _concentrated(rates: list[float], limits: list[int], cost: StepCost, base_tokens: int) -> list[int]:
        """The likeliest sequences draft their full limit, the others none, as many as maximise
        expected tokens per second: the better shape when each verifying sequence is dear."""
        order = sorted(range(len(rates)), key=lambda i: -rates[i])
        expected, tokens, best_value, best_count = float(len(rates)), base_tokens, 0.0, 0
        for count, i in enumerate(order, start=1):
            expected += sum(rates[i] ** j for j in range(1, limits[i] + 1))
            tokens += limits[i]
            value = expected / cost(tokens, count)
            if value > best_value:
                best_value, best_count = value, count
        ks = [0] * len(rates)
        for i in order[:best_count]:
            ks[i] = limits[i]
        return ks

    def _planning_rate(self, key: int) -> float:
        """The rate a sequence competes with this step: its estimate, with two exceptions.

        Below ``min_rate`` it is 0 (a draft is a near-certain loss); after ``probe_interval`` steps
        without a draft it is at least the prior, so a sequence whose text turned repetitive, or
        that the batch's load switched off, gets drafts again once they would pay, and the
        verification refreshes its estimate. Where the cost rules out drafts even at the prior
        (a large compute-bound batch), no probe is spent.
        """
        state = self._acceptance.get(key)
        if state is None:
            return self.pooled_rate
        if state.steps_idle >= self.probe_interval:
            return max(state.rate, self.pooled_rate, self.initial_rate)
        return state.rate if state.rate >= self.min_rate else 0.0

    def step_started(self, num_tokens: int, num_verifiers: int, decode_only: bool) -> None:
        # Prefill chunks run other kernels over longer contexts: only decode steps feed the fit.
        self._step_started = time.perf_counter() if decode_only else None
        self._step_shape = (num_tokens, num_verifiers)

    def step_verified(self) -> None:
        if self._step_started is not None:
            num_tokens, num_verifiers = self._step_shape
            self.cost_model.observe(num_tokens, time.perf_counter() - self._step_started, num_verifiers)
            self._step_started = None

    def observe(self, key: int, num_drafts: int, num_accepted: int) -> None:
        """One verification: drafts are trials until the first rejection."""
        if num_drafts == 0:
            return
        trials = num_accepted + (num_accepted < num_drafts)
        # A new sequence starts from one pseudo-trial at the pooled rate, so one step cannot zero it.
        state = self._acceptance.setdefault(key, _Acceptance(self.pooled_rate, 1.0))
        self._pooled.accepted = self.pooled_decay * self._pooled.accepted + num_accepted
        self._pooled.trials = self.pooled_decay * self._pooled.trials + trials
        state.accepted = self.decay * state.accepted + num_accepted
        state.trials = self.decay * state.trials + trials

    def forget(self, key: int) -> None:
        self._acceptance.pop(key, None)
