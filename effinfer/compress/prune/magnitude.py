"""Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks", arXiv:1506.02626), the one-shot baseline of the Wanda and SparseGPT papers.

Idea: a weight's importance is its size |W_ij|; in every output row of each decoder Linear the
smallest ones are set to zero (or all but the N largest of every M inputs), no data, no update.
Switch on: ``effinfer prune --method magnitude --sparsity 0.5 | 2:4 --out DIR``, or
``prune_model_magnitude(model, SparsityPattern.parse("2:4"))``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from effinfer.compress.prune.masks import SparsityPattern, prune_mask
from effinfer.models.base import CausalLM


def prune_weight_magnitude(weight: torch.Tensor, pattern: SparsityPattern) -> None:
    """Zero ``weight``'s [out, in] smallest-magnitude entries in place."""
    weight[prune_mask(weight.abs(), pattern)] = 0


@torch.no_grad()
def prune_model_magnitude(model: CausalLM, pattern: SparsityPattern, show_progress: bool = True) -> None:
    """Magnitude-prune every decoder Linear of ``model`` in place (embeddings and lm_head stay dense)."""
    for _, linear in tqdm(model.compressible_linears(), desc="magnitude", disable=not show_progress):
        prune_weight_magnitude(linear.weight.data, pattern)
