"""How a completion becomes a JSON choice, one formatter per endpoint.

``generation.py`` runs one loop for both endpoints (collect, or stream as server-sent events); it asks
the endpoint's formatter only for the shape of a choice: ``{"text": ...}`` for ``/v1/completions``,
``{"message": ...}`` / ``{"delta": ...}`` for ``/v1/chat/completions``, and each one's logprobs.
"""

from __future__ import annotations

from effinfer.outputs import CompletionOutput, Logprob

# JSON has no -inf; as vLLM, a log-probability of an impossible token is reported as this.
MIN_LOGPROB = -9999.0


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _ranked(alternatives: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(alternatives.items(), key=lambda item: -item[1].logprob)


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], text_offset: int
) -> tuple[dict, int]:
    """The completions API's ``{tokens, token_logprobs, top_logprobs, text_offset}``, and the next offset."""
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, alternatives in zip(token_ids, logprobs):
        chosen = alternatives[token_id]
        token = chosen.decoded_token or ""
        result["tokens"].append(token)
        result["token_logprobs"].append(_lp(chosen.logprob))
        top: dict[str, float] = {}
        for _, lp in _ranked(alternatives):
            top.setdefault(lp.decoded_token or "", _lp(lp.logprob))
        result["top_logprobs"].append(top)
        result["text_offset"].append(text_offset)
        text_offset += len(token)
    return result, text_offset


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top_n: int) -> list[dict]:
    """The chat API's ``logprobs.content`` entries."""

    def entry(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": _lp(lp.logprob), "bytes": list(token.encode("utf-8", "replace"))}

    content = []
    for token_id, alternatives in zip(token_ids, logprobs):
        item = entry(alternatives[token_id])
        item["top_logprobs"] = [entry(lp) for _, lp in _ranked(alternatives)[:top_n]]
        content.append(item)
    return content


class CompletionFormatter:
    """``/v1/completions``: ``text`` choices, logprobs with running text offsets."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, num_logprobs: int | None) -> None:
        self.num_logprobs = num_logprobs
        self._offsets: dict[int, int] = {}  # choice index -> text offset of its next token

    def opening(self, n: int) -> list[dict]:
        return []

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        logprobs = None
        if self.num_logprobs is not None:
            logprobs, _ = completion_logprobs(completion.token_ids, completion.logprobs or [], 0)
        return {"index": index, "text": completion.text, "logprobs": logprobs}

    def delta(
        self,
        index: int,
        completion: CompletionOutput,
        token_ids: list[int],
        logprobs: list[dict[int, Logprob]],
    ) -> dict:
        choice = {"index": index, "text": completion.delta_text, "logprobs": None}
        if self.num_logprobs is not None:
            choice["logprobs"], self._offsets[index] = completion_logprobs(
                token_ids, logprobs, self._offsets.get(index, 0)
            )
        return choice


class ChatFormatter:
    """``/v1/chat/completions``: ``message`` choices, ``delta`` chunks opened by the assistant role."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, num_logprobs: int | None) -> None:
        self.num_logprobs = num_logprobs

    def opening(self, n: int) -> list[dict]:
        opening = {"role": "assistant", "content": ""}
        return [{"index": i, "delta": opening, "logprobs": None, "finish_reason": None} for i in range(n)]

    def choice(self, index: int, completion: CompletionOutput) -> dict:
        logprobs = None
        if self.num_logprobs is not None:
            content = chat_logprobs(completion.token_ids, completion.logprobs or [], self.num_logprobs)
            logprobs = {"content": content}
        message = {"role": "assistant", "content": completion.text}
        return {"index": index, "message": message, "logprobs": logprobs}

    def delta(
        self,
        index: int,
        completion: CompletionOutput,
        token_ids: list[int],
        logprobs: list[dict[int, Logprob]],
    ) -> dict:
        delta = {"content": completion.delta_text} if completion.delta_text else {}
        choice = {"index": index, "delta": delta, "logprobs": None}
        if self.num_logprobs is not None:
            choice["logprobs"] = {"content": chat_logprobs(token_ids, logprobs, self.num_logprobs)}
        return choice


Formatter = CompletionFormatter | ChatFormatter
