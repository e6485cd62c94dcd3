"""Prompt lookup (n-gram) proposer (Saxena 2023; vLLM's ``ngram`` speculative model).

Idea: text that is being edited, quoted or summarised repeats its context; find the latest
earlier place where the sequence's last n tokens occurred (n from ``max_n`` down to ``min_n``)
and propose the tokens that followed it. No extra model, no extra memory.
Switch on: ``LLM(model, speculative_model="ngram", ngram_prompt_lookup_max=4, ngram_prompt_lookup_min=1)``.
"""

from __future__ import annotations

import torch

from effinfer.engine.sequence import Sequence


class NgramProposer:
    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n = max_n
        self.min_n = min_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Up to ``num_tokens[i]`` guessed continuation tokens of each sequence."""
        return [self._lookup(seq.token_ids, k) if k > 0 else [] for seq, k in zip(seqs, num_tokens)]

    def _lookup(self, token_ids: list[int], k: int) -> list[int]:
        tokens = torch.tensor(token_ids)
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Every earlier window of n tokens (the suffix itself excluded) against the suffix.
            windows = tokens[: length - 1].unfold(0, n, 1)
            hits = (windows == tokens[length - n :]).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                return token_ids[start : start + k]
        return []

    def forget(self, seq: Sequence) -> None:
        pass
