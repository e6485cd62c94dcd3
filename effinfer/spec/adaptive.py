"""Adaptive speculation length: draft only as many tokens as pay for their verification.

Papers: Leviathan et al. 2023 (section 3.5: the expected tokens per step for k drafts at
acceptance rate a is (1 - a^(k+1)) / (1 - a), and the best k trades it against step cost);
Liu et al. 2024 ("Optimizing Speculative Decoding for Serving LLMs Using Goodput") for choosing
k per sequence from the batch's load.
Idea: keep each sequence's acceptance rate as a moving average and a measured model of step time
against the step's query tokens; each step, give the next draft slot to the sequence whose next
draft is the likeliest to be accepted, as long as the batch's expected tokens per second rises.
A sequence whose acceptance falls below a floor stops drafting and is re-probed now and then.
Switch on: ``LLM(model, speculative_model=..., speculative_adaptive=True)`` or
``--speculative-adaptive``; without it ``num_speculative_tokens`` are drafted every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _Acceptance:
    """Exponentially weighted counts of draft trials and acceptances of one sequence."""

    accepted: float
    trials: float
    steps_off: int = 0  # steps since the sequence last drafted while switched off

    @property
    def rate(self) -> float:
        return self.accepted / self.trials


class StepCostModel:
    """Step time as ``fixed + per_token * query_tokens``, fitted by weighted least squares.

    On a CPU a decode step first pays for reading the weights (``fixed``); past a few query
    tokens the matrix products become compute-bound and each token adds ``per_token``.
    Until the fit has seen steps whose sizes spread by a few tokens it assumes
    ``prior_token_share``: one more query token costs that fraction of a one-token step.
    """

    def __init__(self, decay: float = 0.98, prior_token_share: float = 0.05) -> None:
        self.decay = decay
        self.prior_token_share = prior_token_share
        self._sums = [0.0] * 5  # weight, sum n, sum t, sum n*n, sum n*t

    def observe(self, num_tokens: int, seconds: float) -> None:
        d = self.decay
        for i, value in enumerate((1.0, num_tokens, seconds, num_tokens * num_tokens, num_tokens * seconds)):
            self._sums[i] = d * self._sums[i] + value

    def coefficients(self) -> tuple[float, float]:
        """``(fixed, per_token)`` in seconds; relative units (1, prior share) before any data."""
        w, sn, st, snn, snt = self._sums
        if w == 0:
            return 1.0, self.prior_token_share
        mean_n, mean_t = sn / w, st / w
        var_n = snn / w - mean_n * mean_n
        # Under a noisy (shared) CPU a slope over steps of nearly the same size is mostly noise:
        # trust the fit only once the step sizes spread by a few tokens (large batches do).
        if w < 8 or var_n < 4.0:
            fixed = mean_t / (1 + self.prior_token_share * mean_n)
            return fixed, self.prior_token_share * fixed
        per_token = max(0.0, (snt / w - mean_n * mean_t) / var_n)
        fixed = max(mean_t - per_token * mean_n, 1e-3 * mean_t)
        return fixed, per_token

    def cost(self, num_tokens: int, fixed: float, per_token: float) -> float:
        return fixed + per_token * num_tokens


class AdaptiveSpeculationLength:
    """Chooses each sequence's draft count per step; ``observe`` feeds back what was accepted."""

    def __init__(
        self,
        max_k: int,
        initial_rate: float = 0.6,
        decay: float = 0.8,
        min_rate: float = 0.1,
        probe_interval: int = 16,
    ) -> None:
        self.max_k = max_k
        self.initial_rate = initial_rate
        self.decay = decay
        self.min_rate = min_rate
        self.probe_interval = probe_interval
        self.cost_model = StepCostModel()
        self._acceptance: dict[int, _Acceptance] = {}
        self._step_started: float | None = None
        self._step_tokens = 0

    def rate(self, key: int) -> float:
        state = self._acceptance.get(key)
        return state.rate if state else self.initial_rate

    def choose(self, keys: list[int], limits: list[int], other_tokens: int) -> list[int]:
        """Draft counts (each at most its limit) for the sequences ``keys``, which each verify one
        token of their own; ``other_tokens`` are the step's remaining (prefill) query tokens."""
        ks = [0] * len(keys)
        # The marginal draft j of a sequence is accepted with probability rate^j: candidates in
        # falling order are the greedy allocation, whose best prefix maximises tokens per second.
        candidates = []
        for i, (key, limit) in enumerate(zip(keys, limits)):
            state = self._acceptance.get(key)
            rate = self.rate(key)
            if state is not None and rate < self.min_rate:
                state.steps_off += 1
                if state.steps_off < self.probe_interval:
                    continue
                state.steps_off = 0  # re-probe with the full length: one step measures up to k trials
                ks[i] = limit
                continue
            candidates += [(rate**j, i) for j in range(1, limit + 1)]
        candidates.sort(key=lambda c: -c[0])
        fixed, per_token = self.cost_model.coefficients()
        num_tokens = other_tokens + len(keys) + sum(ks)
        expected = len(keys) + sum(
            sum(self.rate(keys[i]) ** j for j in range(1, k + 1)) for i, k in enumerate(ks)
        )
        best, best_count = expected / self.cost_model.cost(num_tokens, fixed, per_token), 0
        for count, (gain, _) in enumerate(candidates, start=1):
            expected += gain
            value = expected / self.cost_model.cost(num_tokens + count, fixed, per_token)
            if value > best:
                best, best_count = value, count
        for _, i in candidates[:best_count]:
            ks[i] += 1
        return ks

    def step_started(self, num_tokens: int, decode_only: bool) -> None:
        # Prefill chunks run other kernels over longer contexts: only decode steps feed the fit.
        self._step_started = time.perf_counter() if decode_only else None
        self._step_tokens = num_tokens

    def step_verified(self) -> None:
        if self._step_started is not None:
            self.cost_model.observe(self._step_tokens, time.perf_counter() - self._step_started)
            self._step_started = None

    def observe(self, key: int, num_drafts: int, num_accepted: int) -> None:
        """One verification: drafts are trials until the first rejection."""
        if num_drafts == 0:
            return
        trials = num_accepted + (num_accepted < num_drafts)
        # A new sequence starts from one pseudo-trial at the initial rate, so one step cannot zero it.
        state = self._acceptance.setdefault(key, _Acceptance(self.initial_rate, 1.0))
        state.accepted = self.decay * state.accepted + num_accepted
        state.trials = self.decay * state.trials + trials

    def forget(self, key: int) -> None:
        self._acceptance.pop(key, None)
