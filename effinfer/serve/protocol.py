"""OpenAI-shaped request bodies, checked strictly at the door.

Unknown fields, wrong JSON types (``"5"`` for an integer, ``true`` for a number) and values the
engine cannot take are refused with a 400 that names the field; ranges that ``SamplingParams``
already checks are left to it, so there is one source of truth for them. Fields beyond OpenAI's
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
...) follow vLLM's names, and the ``openai`` client sends them with ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from effinfer.sampling_params import SamplingParams
from effinfer.serve.errors import from_validation_error

_STRICT = ConfigDict(extra="forbid", strict=True)

# Temperatures this close to 0 would overflow the scaled logits; as vLLM, they are raised to this.
MIN_TEMPERATURE = 1e-2
MAX_N = 128

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31)]


def parse_request(model_cls: type[BaseModel], body: dict) -> Any:
    """``model_cls`` from a decoded JSON body; raises APIError (400) naming the first bad field."""
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted for compatibility; nothing is obfuscated


class _GenerationRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = _STRICT

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, ge=1e-2, le=100)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's settings for this request; raises InvalidSamplingParams naming a bad field."""
        temperature = 1.0 if self.temperature is None else self.temperature
        if 0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        return SamplingParams(
            n=self.n,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a field this server accepts in the schema but cannot honour."""
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported (it may only equal n)"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Accepted so that a reply can be sent back as it came; the chat template decides what to do with them.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        return None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = _STRICT
    model: str | None = None
    tokens: list[int]
