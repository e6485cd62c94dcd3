"""From sampled token ids to what the caller reads: text, finish reasons and streaming deltas.

Every sampled token is detokenized incrementally (UTF-8 safe, ``tokenizer.IncrementalDetokenizer``)
and checked against the request's stop conditions: EOS, stop token ids, stop strings, the token
limit and the context length. A stop string can be split across tokens, so while a sequence runs
the last ``longest stop string - 1`` characters are held back from its visible text: they may be
the start of a stop string that must not be shown. Each ``RequestOutput`` carries the full text
so far plus the delta since the previous output of that request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from effinfer.engine.sequence import Sequence
from effinfer.outputs import CompletionOutput, Logprob, RequestOutput, SpeculationMetrics
from effinfer.sampling_params import SamplingParams
from effinfer.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _SequenceText:
    """The output side of one sequence: its text and how much of it was already reported."""

    detokenizer: IncrementalDetokenizer
    text: str = ""
    stop_searched_upto: int = 0  # characters of text already searched for stop strings
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    text_sent: int = 0  # characters of visible text in earlier outputs
    tokens_sent: int = 0  # output tokens in earlier outputs


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[_SequenceText]  # one per sequence, in the same order
    stop_holdback: int  # characters held back while a stop string may still be forming


class OutputProcessor:
    """Holds the requests in flight and turns their new tokens into ``RequestOutput`` updates."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._requests: dict[str, _RequestState] = {}
        self._texts: dict[int, _SequenceText] = {}  # seq_id -> its text state

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: str | None, seqs: list[Sequence]) -> None:
        """Start tracking a request's sequences (all share one prompt and one SamplingParams)."""
        first = seqs[0]
        params, prompt_ids = first.params, first.prompt_token_ids
        texts = [
            _SequenceText(self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)) for _ in seqs
        ]
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self._requests[first.request_id] = _RequestState(
            first.request_id, prompt, prompt_ids, params, seqs, texts, holdback
        )
        self._texts.update((seq.seq_id, text) for seq, text in zip(seqs, texts))

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def remove_request(self, request_id: str) -> None:
        """Forget a request (aborted, or finished and reported); unknown ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                del self._texts[seq.seq_id]

    def banned_token_ids(self, seq: Sequence) -> list[int] | None:
        """Tokens that would end the sequence before ``min_tokens``: the sampler must not pick them."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return None
        return self.eos_token_ids + seq.params.stop_token_ids

    # ---- one token ----------------------------------------------------------------------------
    def process_token(self, seq: Sequence, logprobs: dict[int, float] | None) -> None:
        """Detokenize the token just appended to ``seq`` and set ``seq.finish_reason`` if it ends it."""
        token_id, params, out = seq.token_ids[-1], seq.params, self._texts[seq.seq_id]
        if logprobs is not None:
            out.logprobs.append(
                {
                    t: Logprob(lp, self.tokenizer.decode([t], skip_special_tokens=False))
                    for t, lp in logprobs.items()
                }
            )
        if not params.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif token_id in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
        else:
            out.text += out.detokenizer.add(token_id)
            if params.stop and _cut_at_stop_string(out, seq):
                return
            if seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            # A character whose bytes were cut off by the end of generation is shown as decode shows it.
            out.text += out.detokenizer.flush()

    # ---- outputs ------------------------------------------------------------------------------
    def request_outputs(self, request_ids: list[str]) -> list[RequestOutput]:
        """One update per request, in the order given; finished requests are reported, then forgotten."""
        outputs = [self._request_output(self._requests[request_id]) for request_id in request_ids]
        for output in outputs:
            if output.finished:
                self.remove_request(output.request_id)
        return outputs

    def _request_output(self, request: _RequestState) -> RequestOutput:
        completions = []
        for seq, out in zip(request.seqs, request.texts):
            # While a stop string may still be forming at the end, hold those characters back.
            visible = out.text if seq.is_finished else out.text[: len(out.text) - request.stop_holdback]
            output_ids = seq.output_token_ids
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=visible,
                    token_ids=output_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    # A snapshot: a server thread may read this output after later steps appended more.
                    logprobs=list(out.logprobs) if request.params.logprobs is not None else None,
                    delta_text=visible[out.text_sent :],
                    delta_token_ids=output_ids[out.tokens_sent :],
                )
            )
            out.text_sent = max(out.text_sent, len(visible))
            out.tokens_sent = len(output_ids)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=all(seq.is_finished for seq in request.seqs),
            num_cached_tokens=max(seq.num_cached_tokens for seq in request.seqs),
            speculation=SpeculationMetrics(
                num_draft_tokens=sum(seq.num_draft_tokens for seq in request.seqs),
                num_accepted_tokens=sum(seq.num_accepted_tokens for seq in request.seqs),
                num_verify_steps=sum(seq.num_verify_steps for seq in request.seqs),
            ),
        )


def _cut_at_stop_string(out: _SequenceText, seq: Sequence) -> bool:
    """End the text at the first stop string in it, if any; only the new tail needs searching."""
    stops = seq.params.stop
    search_from = max(0, out.stop_searched_upto - max(len(s) for s in stops) + 1)
    out.stop_searched_upto = len(out.text)
    hits = [(out.text.find(s, search_from), s) for s in stops]
    hits = [(pos, s) for pos, s in hits if pos >= 0]
    if not hits:
        return False
    pos, stop = min(hits)
    out.text = out.text[: pos + len(stop)] if seq.params.include_stop_str_in_output else out.text[:pos]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True
