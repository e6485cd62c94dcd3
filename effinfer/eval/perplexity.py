"""Sliding-window perplexity: exp of the mean negative log-likelihood per token of a text.

The text is tokenized once and scored in windows of ``ctx`` tokens that advance by ``stride``.
Each window scores only the tokens the previous one did not, so every token after the first
is scored exactly once, and (when stride < ctx) with at least ctx - stride tokens of context.
This is the procedure of HF's "Perplexity of fixed-length models" guide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effinfer.config import ConfigError


class EvalError(ConfigError):
    """An evaluation cannot run as asked (a missing or too short text, a bad window); the message says why."""


@dataclass
class PerplexityResult:
    perplexity: float
    nll_per_token: float  # nats
    num_tokens: int  # tokens scored
    num_windows: int
    ctx: int
    stride: int

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} ({self.nll_per_token:.4f} nats/token) over {self.num_tokens} "
            f"tokens in {self.num_windows} windows (ctx {self.ctx}, stride {self.stride})"
        )


def _token_ids(llm, text: str | None, path, token_ids: list[int] | None) -> list[int]:
    """The tokens to score: given, or of ``text``, or of the file at ``path``."""
    if token_ids is not None:
        return token_ids
    if text is None:
        if path is None:
            raise EvalError("give text, path or token_ids")
        path = Path(path)
        if not path.exists():
            raise EvalError(f"data file {str(path)!r} does not exist")
        if not path.is_file():
            raise EvalError(f"data file {str(path)!r} is not a file")
        text = path.read_text(encoding="utf-8", errors="replace")
    token_ids = list(llm.tokenizer.encode(text))
    if len(token_ids) < 2:
        source = f"data file {str(path)!r}" if path is not None else "the text"
        raise EvalError(f"{source} has {len(token_ids)} token(s); perplexity needs at least two")
    return token_ids


def check_window(
    ctx: int | None, stride: int | None, max_windows: int | None, max_model_len: int
) -> tuple[int, int]:
    """(ctx, stride) with their defaults filled in, or an ``EvalError`` naming the bad value."""
    ctx = max_model_len if ctx is None else ctx
    if not isinstance(ctx, int) or ctx < 2:
        raise EvalError(f"ctx must be at least 2 tokens (one to predict from, one to score), got {ctx!r}")
    if ctx > max_model_len:
        raise EvalError(f"ctx {ctx} exceeds the model's context of {max_model_len} tokens")
    stride = ctx if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= ctx:
        raise EvalError(f"stride must be in [1, ctx={ctx}], got {stride!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise EvalError(f"max_windows must be at least 1, got {max_windows!r}")
    return ctx, stride


def perplexity(
    llm,
    text: str | None = None,
    path: str | os.PathLike | None = None,
    token_ids: list[int] | None = None,
    ctx: int | None = None,
    stride: int | None = None,
    max_windows: int | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``llm`` (an ``effinfer.LLM``) on a text, a file or token ids."""
    engine = llm.engine
    ctx, stride = check_window(ctx, stride, max_windows, engine.max_model_len)
    token_ids = _token_ids(llm, text, path, token_ids)
    model = engine.model
    # Split over processes (tensor / pipeline parallel), the model runs only through the runner,
    # which drives every rank: each window is then one paged prefill of the whole window.
    split = engine.config.tensor_parallel_size * engine.config.pipeline_parallel_size > 1
    ids = torch.tensor(token_ids, device=engine.device)
    starts = list(range(0, len(token_ids) - 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    total_nll, total_tokens, scored_until, num_windows = 0.0, 0, 0, 0
    with torch.inference_mode():
        for begin in tqdm(starts, desc="perplexity", unit="window", disable=not show_progress):
            end = min(begin + ctx, len(token_ids))
            window = ids[begin:end]
            if split:
                rows = torch.cat(list(engine.teacher_forced_logits(window.tolist(), chunk=len(window))))
            else:
                rows = model.compute_logits(model.forward_dense(window[None]))[0, :-1].float()
            # Row i predicts window[i + 1]; only targets past what earlier windows scored count.
            first_new = max(scored_until, begin + 1) - (begin + 1)
            nll = F.cross_entropy(rows[first_new:], window[1:][first_new:], reduction="sum")
            total_nll += nll.item()
            total_tokens += (end - begin - 1) - first_new
            scored_until = end
            num_windows += 1
            if end == len(token_ids):
                break
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, num_windows, ctx, stride)


def paged_perplexity(
    llm,
    text: str | None = None,
    path: str | os.PathLike | None = None,
    token_ids: list[int] | None = None,
    ctx: int | None = None,
    max_windows: int | None = None,
    chunk: int = 1,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity measured through the paged KV cache, as tokens are served.

    ``perplexity`` scores whole windows at once and never touches the KV cache, so it cannot see
    what a KV-cache scheme (int8 KV, say) does. Here each window is fed ``chunk`` tokens at a
    time (1: exactly like decoding) and every token attends to its context as read back from the
    cache. Non-overlapping windows of ``ctx`` tokens; the engine must be idle.
    """
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise RuntimeError("paged_perplexity needs an idle engine")
    ctx = min(ctx or engine.max_model_len, engine.max_model_len)
    ctx, _ = check_window(ctx, None, max_windows, engine.max_model_len)
    token_ids = _token_ids(llm, text, path, token_ids)
    starts = list(range(0, len(token_ids) - 1, ctx))[:max_windows]
    total_nll, total_tokens = 0.0, 0
    for begin in tqdm(starts, desc="paged perplexity", unit="window", disable=not show_progress):
        window = token_ids[begin : begin + ctx]
        if len(window) < 2:
            break
        for nll in _fed_nll(engine, window, chunk):
            total_nll += nll.sum().item()
            total_tokens += len(nll)
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(starts), ctx, ctx)


def _fed_nll(engine, token_ids: list[int], chunk: int) -> Iterator[torch.Tensor]:
    """Per chunk, the negative log-likelihoods of the tokens it predicts, fed through the paged cache."""
    scored = 0
    for logits in engine.teacher_forced_logits(token_ids, chunk):
        targets = torch.tensor(token_ids[scored + 1 : scored + 1 + len(logits)], device=logits.device)
        yield F.cross_entropy(logits, targets, reduction="none")
        scored += len(logits)


def streaming_nll(llm, token_ids: list[int], chunk: int = 128, show_progress: bool = True) -> torch.Tensor:
    """Negative log-likelihood (nats, float32 [n - 1]) of each of ``token_ids[1:]``, the text fed as one
    sequence through the paged KV cache ``chunk`` tokens at a time.

    With ``sliding_window`` (and ``attention_sinks``) set on the engine this is streaming evaluation
    (StreamingLLM, layers/attention_sinks.py): each token sees exactly what the bounded cache keeps,
    whatever the chunk, so the text may run far past the trained context.
    """
    engine = llm.engine
    if len(token_ids) > engine.max_model_len:
        raise EvalError(
            f"{len(token_ids)} tokens exceed the engine's max_model_len of {engine.max_model_len}"
        )
    chunks = tqdm(
        _fed_nll(engine, token_ids, chunk), total=-(-(len(token_ids) - 1) // chunk),
        desc="streaming nll", unit="chunk", disable=not show_progress,
    )  # fmt: skip
    return torch.cat([nll.float().cpu() for nll in chunks])
