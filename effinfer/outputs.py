"""What the API hands back: one ``RequestOutput`` per prompt, holding one ``CompletionOutput``
per sampled completion (``n`` of them), shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    # While streaming: the text and tokens added since the previous update of this request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpeculationMetrics:
    """Speculative decoding's part in one request so far, summed over its ``n`` completions.

    All zero when the engine does not speculate. Each verification step emits the accepted drafts
    plus one token of the target's own, so ``mean_accepted_length`` counts that token too.
    """

    num_draft_tokens: int = 0  # draft tokens proposed ...
    num_accepted_tokens: int = 0  # ... and accepted by the target
    num_verify_steps: int = 0  # steps that verified at least one draft

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    speculation: SpeculationMetrics = field(default_factory=SpeculationMetrics)
