"""Low-rank matrix multiply: y = (x @ V^T) @ U^T + b, never forming U @ V (weights from ``quant/lowrank.py``).

Papers: ASVD (Yuan et al. 2023), SVD-LLM (Wang et al. 2024). Idea: a rank-r weight costs
r * (in + out) multiply-adds and bytes per row of x instead of in * out, so a decode step that
streams the weights from memory reads fewer bytes. The V of every part is stacked into one matrix,
so the first product is one GEMM for all parts of a fused layer; each part's U then runs on its
slice of the result (a part kept whole has its output ready after the first product). Both
products go through ``kernels/dense_linear.py`` (AMX skinny kernel or oneDNN on CPU, cuBLAS on
CUDA). The reference is ``LowRankWeight.reference_linear`` (x @ (U @ V)^T in float32).
Switch on: automatic for a ``LowRankWeight`` (``LLM(DIR)`` on an ``effinfer compress --low-rank`` output).

Ranks are padded to whole AMX tiles. The skinny kernel needs in_features in multiples of 32, and
U's in_features is the rank: an SVD-LLM rank such as 173 sent every U product to oneDNN's prepacked
GEMM instead, which at batch 1 costs tens of microseconds per call whatever the matrix size and,
on a busy 2-core machine, milliseconds (a 576 x 161 U: 1.8 ms, against 53 us for a 576 x 160 one
on the skinny kernel, measured side by side at load ~6: oneDNN's two threads wait on each other).
That is why the factorized default model decoded ~13x slower than dense on the loaded machine
(docs/low-rank.md). Padding V with zero rows and U with
zero columns is exact (the extra hidden values are 0 and meet 0 weights) and costs at most 31
rows of V and columns of U per part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effinfer.kernels import dense_linear
from effinfer.kernels.cpu import skinny
from effinfer.quant.lowrank import LowRankWeight
from effinfer.quant.registry import Kernel, register_kernel


@dataclass
class LowRankState:
    first: dense_linear.DenseState  # x @ [V_0; V_1; ...]^T, no bias
    # Per part: (start, stop) of its columns in the first product's output, and its U with the
    # part's bias, or None for a part kept whole; then ``bias`` holds its bias.
    parts: list[tuple[int, int, dense_linear.DenseState | None, torch.Tensor | None]]


def padded_factors(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) in ``dtype``, the rank padded with zeros to a multiple of 32 where that puts U on the skinny kernel."""
    u, v = u.to(dtype).contiguous(), v.to(dtype).contiguous()
    pad = -u.shape[1] % skinny.COLUMN_MULTIPLE
    if pad == 0:
        return u, v
    padded_u = F.pad(u, (0, pad))
    if not skinny.supports(padded_u):  # oneDNN or cuBLAS takes any rank: zeros would only cost
        return u, v
    return padded_u, F.pad(v, (0, 0, 0, pad))


def prepare(weight: LowRankWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankState:
    vs, parts, column, row = [], [], 0, 0
    for u, v, rows in zip(weight.us, weight.vs, weight.part_rows()):
        part_bias = bias[row : row + rows].detach() if bias is not None else None
        second = None
        if u is not None:
            u, v = padded_factors(u, v, dtype)
            second = dense_linear.prepare(u, part_bias)
        vs.append(v.to(dtype))
        parts.append((column, column + v.shape[0], second, part_bias if u is None else None))
        column, row = column + v.shape[0], row + rows
    return LowRankState(dense_linear.prepare(torch.cat(vs).contiguous(), None), parts)


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
