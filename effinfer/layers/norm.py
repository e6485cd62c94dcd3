"""RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, no mean subtraction.
Gemma's variant (``OffsetRMSNorm``) multiplies by ``1 + weight``.

Computed in float32 and cast back before the weight, exactly as HF Llama does: the PyTorch
path (``reference``) matches HF bit for bit in float32 and closely in bfloat16; the fused CPU op
differs from it only in the order of the float32 sum of squares. With ``residual`` the layer
first adds the residual stream (x + residual, in the activation dtype) and returns that sum too,
so a decoder layer's residual add and the next norm are one pass (one fused op on CPU, one Triton
kernel on CUDA: ``kernels/triton/fused_rms_norm.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from effinfer.kernels.cpu import fused
from effinfer.kernels.triton import gpu_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with ``residual``, (norm(x + residual), x + residual)."""
        if x.dim() == 2 and x.stride(1) == 1 and gpu_ops.usable(x):  # CUDA: one Triton kernel
            return gpu_ops.kernels().fused_rms_norm.rms_norm(x, self.weight, self.eps, residual)
        if x.dim() == 2 and self.weight.dtype == x.dtype and fused.usable(x):
            out = fused.extension().rms_norm(x, residual, self.weight, self.eps)
            return out[0] if residual is None else (out[0], out[1])
        if residual is None:
            return self.reference(x)
        x = x + residual
        return self.reference(x), x

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from one: ``norm(x) * (1 + weight)`` (Gemma).

    The checkpoint keeps ``weight`` near zero (zero-initialised); the product is taken in float32
    before casting back, as HF Gemma 3 does, so bfloat16 loses nothing to rounding ``1 + weight``.
    """

    weight_offset = 1.0  # what the output is multiplied by is weight_offset + weight

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
