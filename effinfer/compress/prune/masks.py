"""Which weights to zero: unstructured and N:M masks from a score, shared by every pruning method.

Magnitude, Wanda and SparseGPT differ in the score they rank weights by (|W|, |W|·‖X‖₂,
w² / [H⁻¹]²_jj) and in whether the survivors are updated; the selection rules live here once:

- unstructured: in each output row the lowest-scoring ``sparsity`` share of the weights is pruned
  (Wanda's per-output comparison group, Sun et al. 2023, section 3); SparseGPT compares a whole
  block of columns at once (``lowest_share_mask`` on the flattened block).
- N:M (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378): of every
  M consecutive input weights of a row only the N highest-scoring survive. 2:4 is the pattern
  NVIDIA's sparse tensor cores (Ampere and later) run at twice the dense rate.

Masks are boolean with True marking a weight to prune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from effinfer.config import ConfigError


@dataclass(frozen=True)
class SparsityPattern:
    """How much to prune: a share of each row (``n`` and ``m`` None) or N kept of every M inputs."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> SparsityPattern:
        """``"0.5"`` (half of every row) or ``"2:4"`` (2 kept of every 4 consecutive inputs)."""
        text = str(text).strip()
        if ":" in text:
            n_text, _, m_text = text.partition(":")
            if not (n_text.isdigit() and m_text.isdigit()):
                raise ConfigError(f"--sparsity {text!r} is not N:M with whole numbers N and M (e.g. 2:4)")
            n, m = int(n_text), int(m_text)
            if not 0 < n < m:
                raise ConfigError(f"--sparsity {text}: N:M needs 0 < N < M (N weights kept of every M)")
            return cls(1 - n / m, n, m)
        try:
            sparsity = float(text)
        except ValueError:
            raise ConfigError(f"--sparsity {text!r} is neither a share like 0.5 nor N:M like 2:4") from None
        if not 0 < sparsity < 1:
            raise ConfigError(f"--sparsity must be between 0 and 1 (exclusive), got {text}")
        return cls(sparsity)

    @property
    def is_n_m(self) -> bool:
        return self.m is not None

    def check_fits(self, name: str, in_features: int) -> None:
        """An N:M pattern needs whole groups of M inputs in every row."""
        if self.is_n_m and in_features % self.m:
            raise ConfigError(f"{self}: {name} has {in_features} inputs, not a multiple of M={self.m}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_n_m else f"{self.sparsity:g}"


def pruned_count(size: int, sparsity: float) -> int:
    """Weights to prune out of ``size``: at least the asked share (the float error of 0.5 * 2k rounds away)."""
    return min(size, math.ceil(size * sparsity - 1e-9))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``sparsity`` share of every row of ``scores`` [out, in]."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = pruned_count(scores.shape[-1], sparsity)
    if k:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False).indices, True)
    return mask


def lowest_share_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``sparsity`` share of all entries of ``scores`` together."""
    return row_mask(scores.reshape(1, -1), sparsity).view_as(scores)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune all but the ``n`` highest-scoring of every ``m`` consecutive entries of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(groups, m - n, dim=-1, largest=False).indices, True)
    return mask.view(rows, cols)


def prune_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """The mask ``pattern`` selects for ``scores`` [out, in]: per row, or per group of M inputs."""
    if pattern.is_n_m:
        return n_m_mask(scores, pattern.n, pattern.m)
    return row_mask(scores, pattern.sparsity)


def zero_share(weight: torch.Tensor) -> float:
    """The share of ``weight``'s entries that are exactly zero."""
    return float((weight == 0).sum()) / weight.numel()


def follows_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every run of ``m`` consecutive inputs of every row holds at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())
