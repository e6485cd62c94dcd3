"""Dense (unquantized) matrix multiply for Linear layers.

The reference is ``torch.nn.functional.linear``. On CPU with bfloat16 weights:
  * where the AMX skinny-GEMM kernel can run (``kernels/cpu/skinny.py``; in_features a multiple of
    32), decode-sized batches (up to 64 rows) use it on the plain weight, which it streams at
    close to DRAM speed, and larger batches (prefill) use oneDNN through ``F.linear`` on the same
    tensor;
  * otherwise the weight is reordered once, at load time, into oneDNN's blocked layout (the
    "prepacking" that IPEX and torch.compile's freezing do), so every GEMM streams it straight
    into AMX/AVX-512 tiles instead of re-blocking it per call.
Results equal the reference up to float32 summation order (tests/test_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effinfer.kernels.cpu import skinny

# The batch size oneDNN tunes the packed layout for; measured on AMX it serves 1..512 rows well.
PACK_BATCH_HINT = 16


@dataclass
class DenseState:
    weight: torch.Tensor  # plain [out, in], or oneDNN-packed when ``packed``
    bias: torch.Tensor | None
    packed: bool = False
    skinny_bias: torch.Tensor | None = None  # float32 copy of the bias for the skinny kernel
    skinny: bool = False  # decode-sized batches run kernels/cpu/skinny.py


def can_prepack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def prepare(
    weight: torch.Tensor, bias: torch.Tensor | None, allow_prepack: bool = True, allow_skinny: bool = True
) -> DenseState:
    if allow_skinny and skinny.supports(weight):
        skinny_bias = None if bias is None else bias.detach().float().contiguous()
        return DenseState(weight.detach(), bias, skinny_bias=skinny_bias, skinny=True)
    if allow_prepack and can_prepack(weight):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        return DenseState(packed, bias, packed=True)
    return DenseState(weight, bias)


def apply(state: DenseState, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(1, x.shape[-1])
    needs_grad = x.requires_grad and torch.is_grad_enabled()  # the kernel has no backward
    if state.skinny and x.dtype == torch.bfloat16 and 1 <= rows <= skinny.MAX_ROWS and not needs_grad:
        out = skinny.linear(x.reshape(rows, x.shape[-1]), state.weight, state.skinny_bias)
        return out.reshape(*x.shape[:-1], -1)
    if state.packed:
        return torch.ops.mkldnn._linear_pointwise(x, state.weight, state.bias, "none", [], "")
    return F.linear(x, state.weight, state.bias)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)
