"""Speculative decoding inside the step loop: propose for the scheduled decodes, verify in one step.

The scheduler reserves ``num_speculative_tokens`` cache slots next to each decode token; the
proposer fills as many as it can guess; the runner scores every position; ``accept_drafts``
keeps what the rejection rule accepts. Each sequence of the batch accepts its own number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import Sequence
from effinfer.engine.speculation import AcceptedTokens
from effinfer.layers.sampler import SamplingRow, next_token_probs, raw_logprobs
from effinfer.spec.adaptive import AdaptiveSpeculationLength
from effinfer.spec.draft import DraftModelProposer
from effinfer.spec.ngram import NgramProposer
from effinfer.spec.verify import accept_drafts

if TYPE_CHECKING:
    from effinfer.engine.engine import LLMEngine


class SpeculativeDecoder:
    """The ``Speculator`` the engine builds when ``speculative_model`` is set."""

    def __init__(self, engine: LLMEngine) -> None:
        config = engine.config
        self.num_speculative_tokens = config.num_speculative_tokens  # checked by EngineConfig
        self.max_model_len = engine.max_model_len
        if config.speculative_model == "ngram":
            self.proposer = NgramProposer(config.ngram_prompt_lookup_max, config.ngram_prompt_lookup_min)
        else:
            self.proposer = DraftModelProposer(engine, config.speculative_model)
        self.adaptive = (
            AdaptiveSpeculationLength(self.num_speculative_tokens) if config.speculative_adaptive else None
        )

    def propose(self, batch: list[ScheduledSeq]) -> None:
        entries = [e for e in batch if e.samples and e.num_lookahead_slots > 0]
        # No draft past the context, nor past the tokens still wanted (the target adds one of its own).
        limits = [
            max(0, min(e.num_lookahead_slots, self.max_model_len - len(e.seq), e.seq.max_tokens - e.seq.num_output_tokens - 1))
            for e in entries
        ]  # fmt: skip
        if self.adaptive is not None:
            other_tokens = sum(e.num_new_tokens for e in batch) - len(entries)
            limits = self.adaptive.choose([e.seq.seq_id for e in entries], limits, other_tokens)
        for entry, drafts in zip(entries, self.proposer.propose([e.seq for e in entries], limits)):
            entry.draft_token_ids = drafts
        if self.adaptive is not None:
            num_verifiers = sum(1 for e in entries if e.draft_token_ids)
            self.adaptive.step_started(
                sum(e.num_query_tokens for e in batch), num_verifiers, other_tokens == 0
            )

    def accept(
        self,
        batch: list[ScheduledSeq],
        logits: torch.Tensor,
        sampling_row: Callable[[Sequence, list[int]], SamplingRow],
    ) -> list[AcceptedTokens] | None:
        if self.adaptive is not None:
            self.adaptive.step_verified()  # logits are in hand: the target's step is over
        if not any(e.draft_token_ids for e in batch):
            # Nothing to verify (adaptive k switched drafting off): the batched sampler is faster
            # than the per-sequence acceptance loop below, which cost ~13% at batch 16.
            return None
        rows = [
            sampling_row(e.seq, e.draft_token_ids[:j])
            for e in batch
            for j in range(len(e.draft_token_ids) + 1)
        ]
        probs = next_token_probs(logits, rows)
        results, start = [], 0
        for entry in batch:
            drafts = entry.draft_token_ids
            span = slice(start, start + len(drafts) + 1)
            tokens = accept_drafts(probs[span], drafts, entry.seq.generator)
            emitted = slice(start, start + len(tokens))
            token_tensor = torch.tensor(tokens, device=logits.device)
            logprobs = raw_logprobs(logits[emitted], token_tensor, rows[emitted])
            results.append(AcceptedTokens(tokens, logprobs, len(drafts), len(tokens) - 1))
            if self.adaptive is not None:
                self.adaptive.observe(entry.seq.seq_id, len(drafts), len(tokens) - 1)
            start = span.stop
        return results

    def forget(self, seq: Sequence) -> None:
        self.proposer.forget(seq)
        if self.adaptive is not None:
            self.adaptive.forget(seq.seq_id)
