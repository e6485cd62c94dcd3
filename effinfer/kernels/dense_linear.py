"""Dense (unquantized) matrix multiply for Linear layers.

The reference is ``torch.nn.functional.linear``. On CPU with bfloat16 weights the weight is
reordered once, at load time, into oneDNN's blocked layout (the "prepacking" that IPEX and
torch.compile's freezing do), so every GEMM streams it straight into AMX/AVX-512 tiles instead of
re-blocking it per call: decode is memory-bound, and this reads the weights closer to the
machine's bandwidth. Results equal the reference (tests/test_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The batch size oneDNN tunes the packed layout for; measured on AMX it serves 1..512 rows well.
PACK_BATCH_HINT = 16


@dataclass
class DenseState:
    weight: torch.Tensor  # plain [out, in], or oneDNN-packed when ``packed``
    bias: torch.Tensor | None
    packed: bool = False


def can_prepack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def prepare(weight: torch.Tensor, bias: torch.Tensor | None, allow_prepack: bool = True) -> DenseState:
    if allow_prepack and can_prepack(weight):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        return DenseState(packed, bias, packed=True)
    return DenseState(weight, bias)


def apply(state: DenseState, x: torch.Tensor) -> torch.Tensor:
    if state.packed:
        return torch.ops.mkldnn._linear_pointwise(x, state.weight, state.bias, "none", [], "")
    return F.linear(x, state.weight, state.bias)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)
