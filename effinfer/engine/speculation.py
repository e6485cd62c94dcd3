"""The seam where speculative decoding plugs into the step loop.

The engine does not know how drafts are made or checked: ``effinfer.spec`` (a floor above the
engine) registers a factory here on import, and the engine builds a ``Speculator`` from it when
``EngineConfig.speculative_model`` is set. Per step the speculator fills in draft tokens for the
scheduled decodes, then turns the target's logits for those positions into accepted tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import Sequence
from effinfer.layers.sampler import SamplingRow

if TYPE_CHECKING:
    from effinfer.engine.engine import LLMEngine


@dataclass
class AcceptedTokens:
    """What one sequence gets from a verification step: 1 to k+1 tokens and their logprobs."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    num_draft_tokens: int  # drafts proposed ...
    num_accepted_drafts: int  # ... and accepted


class Speculator(Protocol):
    num_speculative_tokens: int

    def propose(self, batch: list[ScheduledSeq]) -> None:
        """Fill ``draft_token_ids`` (at most ``num_lookahead_slots``) of the entries that sample."""

    def accept(
        self,
        batch: list[ScheduledSeq],
        logits: torch.Tensor,
        sampling_row: Callable[[Sequence, list[int]], SamplingRow],
    ) -> list[AcceptedTokens] | None:
        """Tokens for every sampling entry of ``batch``, from its 1 + len(drafts) logit rows in order,
        or None when no entry carries drafts: then the engine samples as without speculation.

        ``sampling_row(seq, extra)`` is how the engine would sample ``seq`` after ``extra`` more tokens.
        """

    def forget(self, seq: Sequence) -> None:
        """Drop what the speculator keeps for ``seq`` (finished, aborted or preempted)."""


SpeculatorFactory = Callable[["LLMEngine"], Speculator]
_factories: list[SpeculatorFactory] = []


def register_speculator_factory(factory: SpeculatorFactory) -> None:
    _factories[:] = [factory]


def build_speculator(engine: LLMEngine) -> Speculator:
    if not _factories:
        raise RuntimeError("speculative decoding needs effinfer.spec; import effinfer (the package) first")
    return _factories[0](engine)
