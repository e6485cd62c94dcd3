"""What an engine reports about its load: the public answer to "how busy is it?"."""

from __future__ import annotations

from dataclasses import dataclass

from effinfer.outputs import SpeculationMetrics


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine between two steps."""

    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences queued for prefill (new or preempted)
    num_requests: int  # requests the engine holds (a request with n > 1 has n sequences)
    num_blocks: int  # KV-cache blocks in all
    num_free_blocks: int
    num_preemptions: int  # sequences preempted since start
    prefix_cache_queries: int  # full prompt blocks looked up in the prefix cache since start
    prefix_cache_hits: int  # ... and found there
    num_steps: int  # steps that ran a batch
    num_step_errors: int = 0  # steps that raised (counted by whoever drives the engine and recovers)
    num_draft_tokens: int = 0  # speculative tokens proposed since start ...
    num_accepted_tokens: int = 0  # ... and accepted by the target
    num_verify_steps: int = 0  # sequence-steps that verified at least one draft token
    # KV blocks held by each cache group (layers with one cache spec); they sum to num_used_blocks.
    blocks_in_use_per_group: tuple[int, ...] = ()

    @property
    def speculation(self) -> SpeculationMetrics:
        """The engine's speculation counts since start, with the same ratios a request reports."""
        return SpeculationMetrics(self.num_draft_tokens, self.num_accepted_tokens, self.num_verify_steps)

    @property
    def spec_acceptance_rate(self) -> float:
        """Share of draft tokens the target accepted (0 without speculation)."""
        return self.speculation.acceptance_rate

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verifying sequence gained per step: accepted drafts plus the target's own token."""
        return self.speculation.mean_accepted_length

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0
