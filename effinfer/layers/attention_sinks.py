"""Attention sinks (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453).

A sliding window alone fails once the first tokens leave the cache: models park surplus attention
on them ("sinks"). Keeping the first N tokens' KV next to the last W keeps perplexity flat far past
the trained context with bounded memory.

Switch on with ``EngineConfig(attention_sinks=N, sliding_window=W)`` (``--attention-sinks N
--sliding-window W``) for a Llama-family model; docs/attention-sinks.md has the measurements.

Positions follow the paper: inside the cache a query at true position p sits at
c = min(p, N + W - 1) and the sink j at j. RoPE scores depend only on query minus key position, so
window keys, stored rotated at their true positions, already have the in-cache distances; only
the sink scores need the query rotated at c instead of p (``cache_positions``). The cache keeps its
standard layout, so prefix caching is unchanged.
"""

from __future__ import annotations

import torch


def cache_positions(positions: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Where each query sits in the paper's cache of ``sink_tokens`` + ``window`` entries."""
    return positions.clamp(max=sink_tokens + window - 1)


def attend_with_sinks(
    q: torch.Tensor,
    q_at_cache: torch.Tensor,
    query_positions: torch.Tensor,
    window_kv: tuple[torch.Tensor, torch.Tensor],
    window_positions: torch.Tensor,
    sink_kv: tuple[torch.Tensor, torch.Tensor],
    window: int,
    scale: float,
) -> torch.Tensor:
    """Attention of queries over their sinks plus their sliding window, one softmax over both.

    q, q_at_cache: [B, heads, T, d], rotated at the true and at the cache positions;
    query_positions: [B, T]. window_kv: keys and values [B, kv_heads, L, d] at ``window_positions``
    [B, L] (any superset of each query's window; the rest is masked). sink_kv: the first tokens'
    keys and values [B, kv_heads, S, d] at positions 0..S-1, where S is the number of sinks (fewer
    only when the context is shorter). Returns [B, heads, T, d].
    """
    batch, heads, num_queries, head_dim = q.shape
    window_k, window_v = window_kv
    sink_k, sink_v = sink_kv
    kv_heads, num_sinks = window_k.shape[1], sink_k.shape[2]
    group = heads // kv_heads
    # Query heads grouped under their KV head: [B, kv_heads, group, T, d] against [B, kv_heads, 1, L, d].
    grouped = (batch, kv_heads, group, num_queries, head_dim)
    window_scores = q.reshape(grouped) @ window_k.unsqueeze(2).transpose(-1, -2)
    sink_scores = q_at_cache.reshape(grouped) @ sink_k.unsqueeze(2).transpose(-1, -2)

    query_pos = query_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    key_pos = window_positions[:, None, None, None, :]  # [B, 1, 1, 1, L]
    # Window keys that are sinks are scored once, on the sink side (there the two rotations agree:
    # a query that still sees a sink in its window has not been shifted, c = p).
    window_visible = (key_pos <= query_pos) & (key_pos > query_pos - window) & (key_pos >= num_sinks)
    sink_pos = torch.arange(num_sinks, device=q.device)
    sink_visible = sink_pos <= query_pos

    scores = torch.cat([sink_scores, window_scores], dim=-1).float() * scale
    visible = torch.cat(
        [sink_visible.expand(*sink_scores.shape), window_visible.expand(*window_scores.shape)], -1
    )
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(window_v.dtype)
    values = torch.cat([sink_v, window_v], dim=2).unsqueeze(2)  # [B, kv_heads, 1, S + L, d]
    return (probs @ values).reshape(batch, heads, num_queries, head_dim)
