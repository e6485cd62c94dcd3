"""LLM.int8() matrix multiply: int8 x int8 for most input columns, floating point for the outliers.

Paper: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(weights from ``quant/llm_int8.py``). Per call, with x [M, K] and the int8 weight W [N, K]:

    O = { j : max_m |x[m, j]| > threshold }                  the outlier input columns
    y = x[:, O] @ dequant(W)[:, O]^T                          in float32 (the paper's fp16 part)
      + s_x[m] * s_w[n] * sum_{k not in O} qx[m, k] * qw[n, k]   int8 x int8, int32 accumulation
      + bias

where ``qx`` are x's other columns quantized per token (s_x[m] = max_k |x[m, k]| / 127 over the
non-outlier columns) and s_w[n] = absmax[n] / 127. The integer product is ``kernels/w8a8.py``
(oneDNN on CPU, ``torch._int_mm`` on CUDA, a dequantized fallback elsewhere) run on x with its
outlier columns zeroed, which gives exactly the per-token scales above. The outlier weight columns
are dequantized from the int8 codes on the fly, as bitsandbytes does. The reference is the same
arithmetic in plain fp32 (``LLMInt8Weight.reference_linear``) and is what the tests hold ``apply`` to.

Each state counts the columns it saw and how many were outliers (``outlier_columns`` /
``total_columns``); ``compress.quant.llm_int8.outlier_share(model)`` sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effinfer.kernels import w8a8
from effinfer.quant.integer import QuantizedWeight
from effinfer.quant.llm_int8 import LLMInt8Weight
from effinfer.quant.registry import Kernel, register_kernel


@dataclass
class LLMInt8State:
    int8: w8a8.W8A8State  # the int8 x int8 product, without bias
    codes: torch.Tensor  # int8 [out, in]: where the outlier columns are dequantized from
    weight_scale: torch.Tensor  # float32 [out]: absmax / 127
    bias: torch.Tensor | None
    threshold: float
    out_features: int
    in_features: int
    outlier_columns: int = 0  # summed over calls
    total_columns: int = 0


def _as_quantized_weight(weight: LLMInt8Weight) -> QuantizedWeight:
    """The same codes in ``QuantizedWeight``'s layout (symmetric int8, one group per row), for w8a8."""
    codes = weight.weight
    scales = (weight.absmax.float() / 127)[:, None].contiguous()
    zeros = torch.full_like(scales, 128, dtype=torch.int32)
    qweight = (codes.to(torch.int16) + 128).to(torch.uint8)
    return QuantizedWeight(qweight, scales, zeros, 8, weight.in_features)


def prepare(weight: LLMInt8Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> LLMInt8State:
    int8 = w8a8.prepare(_as_quantized_weight(weight), None, "int8", dtype)
    bias = bias.detach() if bias is not None else None
    return LLMInt8State(
        int8, weight.weight.contiguous(), weight.absmax.float() / 127, bias, float(weight.threshold),
        weight.out_features, weight.in_features,
    )  # fmt: skip


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """int64 indices of the columns of ``x2`` [M, K] where some |x| exceeds ``threshold``."""
    return torch.nonzero(x2.abs().amax(dim=0).float() > threshold).flatten()


def apply(state: LLMInt8State, x: torch.Tensor) -> torch.Tensor:
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, state.out_features)
    xf = x2.float()
    outliers = outlier_columns(xf, state.threshold) if state.threshold != float("inf") else None
    state.total_columns += in_features
    if outliers is not None and outliers.numel():
        state.outlier_columns += outliers.numel()
        rest = xf.clone()
        rest[:, outliers] = 0
        y = w8a8.apply(state.int8, rest)
        w_outliers = state.codes[:, outliers].float() * state.weight_scale[:, None]
        y = y + xf[:, outliers] @ w_outliers.t()
    else:
        y = w8a8.apply(state.int8, xf)
    if state.bias is not None:
        y = y + state.bias.float()
    return y.to(x.dtype).reshape(*lead, state.out_features)


register_kernel(
    Kernel("llm_int8", LLMInt8Weight, None, (None,), lambda w, b, a, dt: prepare(w, b, dt), apply)
)
