"""Quantized matrix multiply for Linear layers: picks a kernel per device and scheme, once, at load.

Weight-only (int8 / int4 codes with group scales and zero points, ``layers/quantized.py``):
CPU kernels live in ``kernels/cpu/woq.py``, GPU (Triton) ones in ``kernels/triton/woq.py``.
W8A8 (int8 weights and per-token int8 activations, SmoothQuant) lives in ``kernels/w8a8.py``.
Every kernel is tested against ``reference``: dequantize, then an fp32 matmul.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from effinfer.layers.quantized import QuantizedWeight

logger = logging.getLogger(__name__)


@dataclass
class QuantState:
    backend: str  # "cpu-woq", "triton-woq", "w8a8", "fp8", "codebook", "llm_int8", or "dequantized"
    data: Any  # the backend's own packed form
    apply: Any  # callable(data, x) -> y


def fake_quantize_activations(x: torch.Tensor, mode: str) -> torch.Tensor:
    """What int8 activation quantization does to ``x``: per token (row) or per tensor absmax scaling."""
    xf = x.float()
    if mode == "int8":
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    elif mode == "int8-tensor":
        scale = xf.abs().amax().clamp(min=1e-8) / 127
    else:
        raise ValueError(f"unknown activation quantization {mode!r}")
    return torch.clamp(torch.round(xf / scale), -127, 127) * scale


def reference(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, act_quant: str | None = None
) -> torch.Tensor:
    """The definition every kernel must match: y = x' @ dequantize(W)^T + b, in fp32."""
    xf = fake_quantize_activations(x, act_quant) if act_quant else x.float()
    b = bias.float() if bias is not None else None
    return F.linear(xf, weight.dequantize(torch.float32), b).to(x.dtype)


def _dequantized(weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
    from effinfer.kernels import dense_linear

    return dense_linear.prepare(weight.dequantize(dtype), bias)


def _weight_only_kernel(weight, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantState | None:
    """The device's weight-only kernel (Triton on CUDA, C++ on CPU) for integer or NF4 / FP4 codes.

    None where it does not apply (no Triton, a CPU without AMX, blocks that cross rows, ...).
    """
    codebook = getattr(weight, "scheme", None) in ("nf4", "fp4")
    device = (weight.codes if codebook else weight.qweight).device
    if device.type == "cuda":
        try:
            from effinfer.kernels.triton import woq as triton_woq
        except ImportError as e:
            logger.warning("no Triton weight-only kernel (%s): a slower path runs", e)
            return None
        data = (triton_woq.prepare_codebook if codebook else triton_woq.prepare)(weight, bias, dtype)
        return QuantState("triton-woq", data, triton_woq.apply) if data is not None else None
    if device.type == "cpu":
        from effinfer.kernels.cpu import woq as cpu_woq

        data = (cpu_woq.prepare_codebook if codebook else cpu_woq.prepare)(weight, bias, dtype)
        return QuantState("cpu-woq", data, cpu_woq.apply) if data is not None else None
    return None


def prepare(
    weight: QuantizedWeight, bias: torch.Tensor | None, act_quant: str | None, dtype: torch.dtype
) -> QuantState:
    scheme = getattr(weight, "scheme", None)
    if scheme in ("nf4", "fp4"):  # compress/quant/nf4.CodebookWeight (bitsandbytes-style 4-bit)
        from effinfer.kernels import codebook_linear

        # The weight-only kernels with a level table where blocks tile rows, else the chunked decode.
        state = _weight_only_kernel(weight, bias, dtype)
        return state or QuantState(
            "codebook", codebook_linear.prepare(weight, bias, dtype), codebook_linear.apply
        )
    if scheme == "llm_int8":  # compress/quant/llm_int8.LLMInt8Weight
        from effinfer.kernels import llm_int8

        return QuantState(scheme, llm_int8.prepare(weight, bias, dtype), llm_int8.apply)
    if scheme == "fp8":  # compress/quant/fp8.Fp8Weight
        if weight.weight.device.type == "cuda":
            from effinfer.kernels.triton import fp8 as triton_fp8

            data = triton_fp8.prepare(weight, bias, dtype)
            if data is not None:
                return QuantState("fp8", data, triton_fp8.apply)
        from effinfer.kernels import dense_linear

        return QuantState("dequantized", _dequantized(weight, bias, dtype), dense_linear.apply)
    if act_quant is not None:
        from effinfer.kernels import w8a8

        return QuantState("w8a8", w8a8.prepare(weight, bias, act_quant, dtype), w8a8.apply)
    state = _weight_only_kernel(weight, bias, dtype)
    if state is not None:
        return state
    from effinfer.kernels import dense_linear

    return QuantState("dequantized", _dequantized(weight, bias, dtype), dense_linear.apply)


def apply(state: QuantState, x: torch.Tensor) -> torch.Tensor:
    return state.apply(state.data, x)
