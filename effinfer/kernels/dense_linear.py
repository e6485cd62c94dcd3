"""Dense (unquantized) matrix multiply for Linear layers.

The reference is ``torch.nn.functional.linear``; device backends may repack the weight once
at load time into a layout their GEMM reads faster and must give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DenseState:
    weight: torch.Tensor
    bias: torch.Tensor | None


def prepare(weight: torch.Tensor, bias: torch.Tensor | None) -> DenseState:
    return DenseState(weight, bias)


def apply(state: DenseState, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state.weight, state.bias)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)
