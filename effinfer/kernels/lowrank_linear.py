"""Low-rank matrix multiply: y = (x @ V^T) @ U^T + b, never forming U @ V (weights from ``quant/lowrank.py``).

Papers: ASVD (Yuan et al. 2023), SVD-LLM (Wang et al. 2024). Idea: a rank-r weight costs
r * (in + out) multiply-adds and bytes per row of x instead of in * out, so a decode step that
streams the weights from memory reads fewer bytes. The V of every part is stacked into one matrix,
so the first product is one GEMM for all parts of a fused layer; each part's U then runs on its
slice of the result (a part kept whole has its output ready after the first product). Both
products go through ``kernels/dense_linear.py`` (AMX skinny kernel or oneDNN on CPU, cuBLAS on
CUDA). The reference is ``LowRankWeight.reference_linear`` (x @ (U @ V)^T in float32).
Switch on: automatic for a ``LowRankWeight`` (``LLM(DIR)`` on an ``effinfer compress --low-rank`` output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effinfer.kernels import dense_linear
from effinfer.quant.lowrank import LowRankWeight
from effinfer.quant.registry import Kernel, register_kernel


@dataclass
class LowRankState:
    first: dense_linear.DenseState  # x @ [V_0; V_1; ...]^T, no bias
    # Per part: (start, stop) of its columns in the first product's output, and its U with the
    # part's bias, or None for a part kept whole; then ``bias`` holds its bias.
    parts: list[tuple[int, int, dense_linear.DenseState | None, torch.Tensor | None]]


def prepare(weight: LowRankWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankState:
    stacked = torch.cat([v.to(dtype) for v in weight.vs]).contiguous()
    parts, column, row = [], 0, 0
    for u, v, rows in zip(weight.us, weight.vs, weight.part_rows()):
        part_bias = bias[row : row + rows].detach() if bias is not None else None
        second = None if u is None else dense_linear.prepare(u.to(dtype).contiguous(), part_bias)
        parts.append((column, column + v.shape[0], second, part_bias if u is None else None))
        column, row = column + v.shape[0], row + rows
    return LowRankState(dense_linear.prepare(stacked, None), parts)


def apply(state: LowRankState, x: torch.Tensor) -> torch.Tensor:
    hidden = dense_linear.apply(state.first, x)
    outputs = []
    for start, stop, second, bias in state.parts:
        h = hidden if len(state.parts) == 1 else hidden[..., start:stop].contiguous()
        if second is not None:
            outputs.append(dense_linear.apply(second, h))
        else:
            outputs.append(h if bias is None else h + bias)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


register_kernel(
    Kernel("low-rank", LowRankWeight, None, (None,), lambda w, b, a, dt: prepare(w, b, dt), apply)
)
