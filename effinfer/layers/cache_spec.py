"""What one layer keeps per sequence between steps, so the engine can size, allocate and free
cache from these specs alone, without knowing the model.

A model lists one spec per decoder layer (``model.cache_specs()``). Layers with equal specs form a
cache group that shares block tables; a sliding-window group may return a sequence's blocks once
every position in them has left the window (Mistral, Gemma 3's local layers), keeping the first
``sink_tokens`` positions when it has attention sinks (StreamingLLM, Xiao et al. 2023).
Recurrent state (Mamba) will be another kind of spec.
"""

from __future__ import annotations

from dataclasses import dataclass


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
