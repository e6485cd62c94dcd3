"""RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, no mean subtraction.

Computed in float32 and cast back before the weight, exactly as HF Llama does, so logits
match the reference bit for bit in float32 and closely in bfloat16.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
