"""Gated activations for the feed-forward block (SwiGLU, Shazeer 2020): act(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effinfer.kernels.cpu import fused
from effinfer.kernels.triton import gpu_ops

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def get_activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def gated(gate_up: torch.Tensor, act) -> torch.Tensor:
    """act(gate) * up for gate_up [..., 2 * intermediate] (gate columns first)."""
    if act is F.silu and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        if fused.usable(gate_up):
            return fused.extension().silu_and_mul(gate_up)
        if gpu_ops.usable(gate_up):
            return gpu_ops.kernels().silu_mul.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
