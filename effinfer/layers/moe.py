"""Sparse Mixture-of-Experts feed-forward (Shazeer et al. 2017, "Outrageously Large Neural Networks";
Fedus et al. 2021, Switch Transformer; Jiang et al. 2024, Mixtral; Qwen Team 2024, Qwen1.5-MoE).

A router scores each token against every expert and only the top-k experts' MLPs run on it, their
outputs weighted by the router's probabilities: a model holds many experts' parameters but spends
the compute of k per token. Switched on by loading a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint.

Dispatch is grouped: the (token, expert) pairs are sorted by expert, each active expert's MLP runs
once on all of its tokens (one fused gate/up GEMM and one down GEMM, through ``layers/linear.py``
so quantized experts work unchanged) and the weighted rows are added back per token with one
``index_add_``. The Python loop runs over experts, never over tokens.

The router (and Qwen2-MoE's shared-expert gate) is kept in float32 whatever the model dtype: its
softmax decides which weights run at all, and it is a tiny fraction of the parameters.
``record_expert_load`` counts the tokens each expert receives, per MoE layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class FloatLinear(nn.Module):
    """A bias-free projection kept in float32: not a ``Linear``, so no quantizer or kernel rewrites it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class TopKRouter(FloatLinear):
    """Routing weights as transformers computes them: softmax over all experts (float32), the top k,
    renormalised to sum to one when ``renormalize`` (Mixtral always; Qwen-MoE by ``norm_topk_prob``)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top-k must be between 1 and the {num_experts} experts, got {top_k}")
        super().__init__(hidden_size, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, expert ids [T, k]) for hidden states [T, hidden]."""
        probs = torch.softmax(super().forward(x), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts


def grouped_expert_forward(
    x: torch.Tensor, experts: nn.ModuleList, expert_ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j weights[t, j] * experts[expert_ids[t, j]](x[t]) for every token t, and the number of
    tokens each expert received.

    The T*k (token, expert) pairs are sorted by expert (stably, so each expert's tokens keep their
    order), the tokens gathered once, each expert run once on its contiguous slice, and the
    weighted rows summed back per token. Experts are visited in ascending order, as transformers
    does, so the float32 sums agree with its loop.
    """
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of_pair = order // top_k
    tokens_per_expert = torch.bincount(flat_ids, minlength=len(experts))
    routed = x[token_of_pair]
    outputs = torch.empty_like(routed)
    start = 0
    for expert, count in zip(experts, tokens_per_expert.tolist()):
        if count:
            outputs[start : start + count] = expert(routed[start : start + count])
            start += count
    # The product in float32 (the routing weights' precision) before rounding, as transformers does.
    weighted = (outputs.float() * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, weighted), tokens_per_expert


class SparseMoE(nn.Module):
    """Router (``gate``) + experts (+ an optional shared expert behind a sigmoid gate, as in Qwen2-MoE).

    ``experts`` are modules mapping [n, hidden] -> [n, hidden] (the model family builds them, e.g.
    gated MLPs of its own); ``shared_expert`` runs on every token and is scaled by
    sigmoid(``shared_expert_gate``(x)).
    """

    def __init__(
        self,
        gate: TopKRouter,
        experts: nn.ModuleList,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: FloatLinear | None = None,
    ) -> None:
        super().__init__()
        if (shared_expert is None) != (shared_expert_gate is None):
            raise ValueError("a shared expert needs its gate, and a gate its shared expert")
        self.gate = gate  # the router (transformers' name, which the checkpoints keep)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        # Tokens routed to each expert, accumulated while ``record_expert_load`` is active.
        self.expert_load: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        out, tokens_per_expert = grouped_expert_forward(x, self.experts, expert_ids, weights)
        if self.expert_load is not None:
            self.expert_load += tokens_per_expert.to(self.expert_load.device)
        if self.shared_expert is not None:
            scale = torch.sigmoid(self.shared_expert_gate(x))
            out = out + (scale * self.shared_expert(x).float()).to(x.dtype)
        return out


@dataclass
class ExpertLoad:
    """Tokens routed to each expert: ``counts[i, e]`` for the i-th MoE layer (named ``layers[i]``)."""

    layers: list[str]
    counts: torch.Tensor  # [moe layers, experts], int64

    def fractions(self) -> torch.Tensor:
        """Each layer's counts as a share of the (token, expert) pairs it routed."""
        return self.counts.float() / self.counts.sum(dim=1, keepdim=True).clamp(min=1)


@contextmanager
def record_expert_load(model: nn.Module) -> Iterator[ExpertLoad]:
    """Count the tokens each expert of each ``SparseMoE`` in ``model`` receives while the block runs::

    with record_expert_load(model) as load:
        llm.generate(prompts)
    load.counts  # [moe layers, experts]
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    if not blocks:
        raise ValueError("the model has no Mixture-of-Experts layers")
    if len({m.num_experts for _, m in blocks}) != 1:
        raise ValueError("the MoE layers differ in their number of experts")
    counts = torch.zeros(len(blocks), blocks[0][1].num_experts, dtype=torch.int64)
    for i, (_, block) in enumerate(blocks):
        block.expert_load = counts[i]  # a view: each layer adds into its row
    try:
        yield ExpertLoad([name for name, _ in blocks], counts)
    finally:
        for _, block in blocks:
            block.expert_load = None
