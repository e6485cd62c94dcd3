"""What one layer keeps per sequence between steps, so the engine can size, allocate and free
cache from these specs alone, without knowing the model.

A model lists one spec per decoder layer (``model.cache_specs()``). Layers with equal specs form a
cache group that shares block tables; a sliding-window group may return a sequence's blocks once
every position in them has left the window (Mistral, Gemma 3's local layers), keeping the first
``sink_tokens`` positions when it has attention sinks (StreamingLLM, Xiao et al. 2023).
A recurrent layer (Mamba) keeps a fixed-size state instead (``RecurrentStateSpec``): the engine
gives each running sequence one slot of a state pool, whatever its length, and tells the layer
per step which slot each sequence has and which start from zero (``RecurrentMetadata``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

# The SSM state accumulates a product of decays over the whole sequence: it is kept in float32
# whatever the model dtype (the conv state only holds the last inputs, in the model dtype).
SSM_STATE_DTYPE = torch.float32


@dataclass(frozen=True)
class AttentionCacheSpec:
    """Paged K/V for an attention layer: full context when ``sliding_window`` is None."""

    sliding_window: int | None = None  # a query sees itself and the window - 1 tokens before it
    sink_tokens: int = 0  # positions [0, sink_tokens) stay visible and cached besides the window

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.sink_tokens < 0 or (self.sink_tokens and self.sliding_window is None):
            raise ValueError("sink_tokens needs a sliding window and must not be negative")

    @property
    def is_full(self) -> bool:
        return self.sliding_window is None

    def first_needed_position(self, next_position: int) -> int:
        """The oldest non-sink position a query at ``next_position`` or later can still see."""
        if self.sliding_window is None:
            return 0
        return max(0, next_position - self.sliding_window + 1)


@dataclass(frozen=True)
class RecurrentStateSpec:
    """A fixed-size per-sequence state (Mamba): the causal conv window and the SSM state."""

    conv_state_shape: tuple[int, ...]  # per sequence, e.g. (intermediate, conv_kernel - 1)
    ssm_state_shape: tuple[int, ...]  # per sequence, e.g. (intermediate, state_size)
    # A recurrent layer keeps no per-token KV, so no window applies (code comparing windows needs no type check).
    sliding_window = None

    def bytes_per_sequence(self, dtype: torch.dtype) -> int:
        """Bytes of one sequence's state: the conv window in ``dtype``, the SSM state in float32."""
        return (
            math.prod(self.conv_state_shape) * dtype.itemsize
            + math.prod(self.ssm_state_shape) * SSM_STATE_DTYPE.itemsize
        )


CacheSpec = AttentionCacheSpec | RecurrentStateSpec


@dataclass
class RecurrentMetadata:
    """What a recurrent layer needs of a step: each sequence's new tokens, state slot and whether it starts afresh.

    Tokens are flat, sequence after sequence, as in ``AttentionMetadata``. A hybrid model (attention and
    recurrent layers) gets the attention layers' metadata in ``attention``.
    """

    query_lens: list[int]
    state_slots: torch.Tensor  # [num_seqs] the slot in the state pool of each sequence
    # Slots of the sequences whose first token is in this step: their state starts at zero.
    fresh_slots: torch.Tensor
    attention: Any = None  # AttentionMetadata of a hybrid model's attention layers

    @functools.cached_property
    def decode_part(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat rows, state slots) of the sequences with one new token: they take one recurrent step together."""
        starts = [0]
        for q_len in self.query_lens:
            starts.append(starts[-1] + q_len)
        index = [i for i, q_len in enumerate(self.query_lens) if q_len == 1]
        if not index:
            return None
        device = self.state_slots.device
        rows = torch.tensor([starts[i] for i in index], device=device)
        return rows, self.state_slots.index_select(0, torch.tensor(index, device=device))

    @functools.cached_property
    def scanned_seqs(self) -> list[tuple[int, int, int]]:
        """(first flat row, tokens, state slot) of each sequence with several new tokens: scanned one by one."""
        found, start = [], 0
        slots = self.state_slots.tolist()
        for q_len, slot in zip(self.query_lens, slots):
            if q_len > 1:
                found.append((start, q_len, slot))
            start += q_len
        return found
