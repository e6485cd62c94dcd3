"""Lossless verification of draft tokens: the rejection rule of Leviathan et al. 2023 / Chen et al. 2023.

Draft token d_i, proposed with probability q_i(d_i), is accepted with probability
min(1, p_i(d_i) / q_i(d_i)), where p_i is the target's sampling distribution at that position (after
penalties, temperature, top-k/p, min-p). At the first rejection the token is drawn from the
residual max(0, p_i - q_i), renormalised, and the rest are dropped; if all k are accepted, one more
token is drawn from p_{k+1}. Every emitted token is then distributed exactly as the target's.
Proposers here are deterministic (prompt lookup, greedy draft): q_i is one-hot at d_i, so the rule
reads: accept with probability p_i(d_i), else draw from p_i with d_i removed. For a greedy target p_i
is one-hot too, so a draft is kept exactly when it is the target's argmax.
Tokens are drawn by inverting the float64 cumulative distribution: on CPU ``torch.multinomial``
over a 49k vocabulary took 55-70 ms a call (torch 2.13, 2 busy cores), which at one call per
sequence per step cost more than the batch-16 decode step itself.
"""

from __future__ import annotations

import torch


def accept_drafts(
    target_probs: torch.Tensor, draft_token_ids: list[int], generator: torch.Generator | None = None
) -> list[int]:
    """Tokens to emit: the accepted drafts plus one drawn from the target (1 to k + 1 tokens).

    ``target_probs``: [k + 1, vocab] float32, each row the target's distribution at that position.
    """
    device = target_probs.device
    k = len(draft_token_ids)
    if k:
        drafts = torch.tensor(draft_token_ids, device=device)
        p_draft = target_probs[torch.arange(k, device=device), drafts]
        uniforms = torch.rand(k, device=device, generator=generator)
        rejected = (uniforms >= p_draft).tolist()
    else:
        rejected = []
    for i, reject in enumerate(rejected):
        if reject:
            residual = target_probs[i].clone()
            residual[draft_token_ids[i]] = 0.0
            if residual.sum() <= 0:  # p(d_i) was 1 up to rounding: nothing else can be drawn
                residual = target_probs[i]
            return draft_token_ids[:i] + [draw_token(residual, generator)]
    return draft_token_ids + [draw_token(target_probs[k], generator)]


def draw_token(weights: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn with probability proportional to ``weights`` (1-D, non-negative)."""
    cumulative = weights.double().cumsum(0)
    threshold = (
        torch.rand(1, dtype=torch.float64, device=weights.device, generator=generator) * cumulative[-1]
    )
    # right=True: the first index whose cumulative weight exceeds the threshold, so a zero-weight
    # index (equal cumulative weight to its predecessor) is never drawn.
    index = int(torch.searchsorted(cumulative, threshold, right=True))
    return min(index, weights.shape[0] - 1)
