"""Turn a batch of next-token logits into sampled token ids, one row per sequence.

Applies penalties and banned tokens, then greedy or temperature / top-k / top-p / min-p sampling,
with the semantics of vLLM and Hugging Face; optionally returns log-probabilities of the raw logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from effinfer.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One row of the batch: the sequence being decoded and how to pick its next token."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # seeded per request; None uses the global RNG
    # Never sampled this step; the engine fills it with EOS / stop ids while under min_tokens.
    banned_token_ids: list[int] | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: None when params.logprobs is None, else {sampled id: logprob} plus the top
    # `params.logprobs` alternatives, all taken from log_softmax of the raw (unprocessed) logits.
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Stateless: every per-request setting lives in the rows passed to each call."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"expected logits of shape [{len(rows)}, vocab], got {tuple(logits.shape)}")
        token_ids = _pick_tokens(logits, rows)
        return SampleResult(token_ids=token_ids.tolist(), logprobs=_raw_logprobs(logits, token_ids, rows))


def next_token_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution [rows, vocab] each row's token is drawn from (float32, rows sum to 1).

    Penalties and bans, then temperature / top-k / top-p / min-p; a greedy row is one-hot at the
    token ``Sampler`` would pick. Speculative verification accepts drafts against these.
    """
    logits = apply_penalties(logits, rows)
    if any(row.banned_token_ids for row in rows):
        logits = _ban_tokens(logits, rows)
    probs = torch.zeros_like(logits)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if greedy:
        probs[greedy] = torch.nn.functional.one_hot(logits[greedy].argmax(dim=-1), logits.shape[-1]).float()
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        filtered = _filtered_probs(logits[sampled], [rows[i].params for i in sampled])
        probs[sampled] = filtered / filtered.sum(dim=-1, keepdim=True)
    return probs


def raw_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[dict[int, float] | None]:
    """Per row: None when its params.logprobs is None, else {chosen id: logprob} and the top ones."""
    return _raw_logprobs(logits, token_ids, rows)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Return float32 `logits` with each row's repetition, frequency and presence penalties applied.

    Repetition penalty (CTRL / Hugging Face) covers prompt and output tokens; frequency and
    presence penalties (OpenAI) cover output tokens only. The input tensor is left unchanged.
    """
    logits = logits.float()
    penalised = [i for i, row in enumerate(rows) if _has_penalties(row.params)]
    if not penalised:
        return logits
    vocab, device = logits.shape[-1], logits.device
    params = [rows[i].params for i in penalised]
    sub = logits[penalised]

    output_counts = _token_counts([rows[i].output_token_ids for i in penalised], vocab, device)
    in_output = output_counts > 0

    if any(p.repetition_penalty != 1.0 for p in params):
        seen = in_output | (_token_counts([rows[i].prompt_token_ids for i in penalised], vocab, device) > 0)
        penalty = _column([p.repetition_penalty for p in params], device)
        # Dividing a negative logit would raise it, so negative logits are multiplied instead.
        repeated = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, repeated, sub)

    if any(p.frequency_penalty != 0.0 for p in params):
        sub = sub - _column([p.frequency_penalty for p in params], device) * output_counts
    if any(p.presence_penalty != 0.0 for p in params):
        sub = sub - _column([p.presence_penalty for p in params], device) * in_output

    out = logits.clone()
    out[penalised] = sub
    return out


def _pick_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    needs_penalties = any(_has_penalties(row.params) for row in rows)
    needs_bans = any(row.banned_token_ids for row in rows)
    all_greedy = all(row.params.greedy for row in rows)
    if all_greedy and not needs_penalties and not needs_bans:
        # Fast path; float32 conversion is exact and monotonic, so argmax on the raw dtype agrees.
        return logits.argmax(dim=-1)

    logits = apply_penalties(logits, rows) if needs_penalties else logits.float()
    if needs_bans:
        logits = _ban_tokens(logits, rows)
    token_ids = logits.argmax(dim=-1)
    if all_greedy:
        return token_ids

    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    probs = _filtered_probs(logits[sampled], [rows[i].params for i in sampled])
    token_ids[sampled] = _draw(probs, [rows[i].generator for i in sampled])
    return token_ids


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p; returns unnormalised probabilities."""
    vocab, device = logits.shape[-1], logits.device
    logits = logits / _column([p.temperature for p in params], device)

    top_k = [p.top_k if 0 < p.top_k < vocab else None for p in params]
    if any(k is not None for k in top_k):
        logits = _apply_top_k(logits, top_k)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        logits = _apply_top_p(logits, top_p)

    probs = logits.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        threshold = _column(min_p, device) * probs.amax(dim=-1, keepdim=True)
        # The max token always survives (min_p <= 1); torch.multinomial renormalises the rest.
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _apply_top_k(logits: torch.Tensor, top_k: list[int | None]) -> torch.Tensor:
    """Mask all but the k largest logits of each row; None leaves a row untouched."""
    device = logits.device
    max_k = max(k for k in top_k if k is not None)
    # A partial top-k is much cheaper than a full sort of the vocabulary.
    top_values = logits.topk(max_k, dim=-1).values
    k = torch.tensor([k or max_k for k in top_k], device=device).unsqueeze(1)
    kth_logit = top_values.gather(1, k - 1)
    unlimited = torch.tensor([k is None for k in top_k], device=device).unsqueeze(1)
    kth_logit = kth_logit.masked_fill(unlimited, float("-inf"))
    # `<` keeps every token tied with the k-th (as vLLM and HF do), so ties are not broken by position.
    return logits.masked_fill(logits < kth_logit, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Mask all but the smallest set of most likely tokens whose probability reaches top_p."""
    p = _column(top_p, logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # A token is kept while the mass above it is still short of top_p, so the top token always is.
    # Rows with top_p == 1 are exempt: rounding in the cumsum could otherwise cut the far tail.
    drop = (mass_before >= p) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row; seeded rows draw alone so their stream ignores the rest of the batch."""
    token_ids = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        token_ids[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            token_ids[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return token_ids


def _raw_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[dict[int, float] | None]:
    result: list[dict[int, float] | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    logprobs = torch.log_softmax(logits[wanted].float(), dim=-1)
    chosen = token_ids[wanted].unsqueeze(1)
    chosen_logprobs = logprobs.gather(1, chosen).squeeze(1)
    num_top = min(max(rows[i].params.logprobs for i in wanted), logprobs.shape[-1])
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)

    # One device-to-host copy per tensor rather than one per row.
    chosen_list, chosen_lp_list = chosen.squeeze(1).tolist(), chosen_logprobs.tolist()
    top_ids_list, top_lp_list = top_ids.tolist(), top_logprobs.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        entry = {chosen_list[j]: chosen_lp_list[j]}
        entry.update(zip(top_ids_list[j][:n], top_lp_list[j][:n]))
        result[i] = entry
    return result


def _ban_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    row_index = [i for i, row in enumerate(rows) for _ in row.banned_token_ids or ()]
    token_index = [t for row in rows for t in row.banned_token_ids or ()]
    device = logits.device
    index = (
        torch.tensor(row_index, dtype=torch.long, device=device),
        torch.tensor(token_index, dtype=torch.long, device=device),
    )
    return logits.index_put(index, torch.tensor(float("-inf"), device=device))


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float32 count of each token id in each list."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    # Pad with an extra id `vocab` whose column is dropped at the end.
    padded = [tokens + [vocab] * (width - len(tokens)) for tokens in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=device).view(len(token_lists), width)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )
