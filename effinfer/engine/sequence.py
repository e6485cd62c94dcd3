"""Per-request state: one ``Sequence`` per generated completion (a request with n > 1 has n).

A sequence carries its own token ids, block tables (one per cache group), recurrent-state slot (if
the model has recurrent layers) and sampling state; the scheduler moves it between WAITING, RUNNING
and FINISHED and the block manager fills in its tables and slot.
"""

from __future__ import annotations

import enum
import itertools

import torch

from effinfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


_seq_ids = itertools.count()

# A block-table entry whose block was given back (outside a sliding window): attention masks it.
PLACEHOLDER_BLOCK = -1


class Sequence:
    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        max_tokens: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions this is
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.block_tables: list[list[int]] = []  # per cache group; empty while not allocated
        self.window_starts: list[int] = []  # per group: first block after the sinks still held
        self.state_slot: int | None = None  # its recurrent-state slot (models with recurrent layers)
        self.block_hashes: list[int] = []  # hash chain of the full blocks (prefix caching)
        self.num_cached_tokens = 0  # tokens whose KV came from the prefix cache at the last admission
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_hashed_blocks = 0  # leading blocks named in the prefix cache (or found there)
        self.num_draft_tokens = 0  # speculative tokens proposed for this sequence ...
        self.num_accepted_tokens = 0  # ... and accepted by the target
        self.num_verify_steps = 0  # steps that verified at least one draft
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)  # where the logits are sampled
            # Completions of one request must differ, yet stay reproducible from the seed.
            self.generator.manual_seed(params.seed + index)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def block_table(self) -> list[int]:
        """Cache group 0's block table (the only one of a model with a single spec)."""
        return self.block_tables[0] if self.block_tables else []

    def num_held_blocks(self, group: int) -> int:
        """Blocks the sequence holds in a cache group (placeholders excluded)."""
        if not self.block_tables:
            return 0
        return sum(block_id != PLACEHOLDER_BLOCK for block_id in self.block_tables[group])

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the model has not yet seen: the rest of the prompt, or the one just sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
