"""Quantized matrix multiply for Linear layers: picks a kernel per weight type and device, once, at load.

Kernels register themselves in ``quant/registry.py`` for a weight type, a device and the
activation quantizations they run: weight-only integer and NF4 / FP4 codes in
``kernels/cpu/woq.py`` and ``kernels/triton/woq.py``, NF4 / FP4 elsewhere in
``kernels/codebook_linear.py``, W8A8 in ``kernels/w8a8.py``, LLM.int8() in ``kernels/llm_int8.py``,
fp8 in ``kernels/triton/fp8.py``. ``prepare`` takes the first that accepts the weight; without
one, the dequantized matrix runs on the dense path. Every kernel is tested against the weight's
``reference_linear`` (tests/test_quant_schemes.py runs every registered scheme).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Imported for their registrations (each kernel module registers itself in quant/registry.py).
from effinfer.kernels import codebook_linear, dense_linear, llm_int8, lowrank_linear, w8a8  # noqa: F401
from effinfer.kernels.cpu import woq as cpu_woq  # noqa: F401
from effinfer.kernels.triton import fp8 as triton_fp8  # noqa: F401
from effinfer.quant.activations import fake_quantize_activations
from effinfer.quant.base import CompressedWeight
from effinfer.quant.registry import kernels_for

logger = logging.getLogger(__name__)


@dataclass
class QuantState:
    backend: str  # the kernel's registered name, "dequantized", or "reference"
    data: Any  # the backend's own packed form
    apply: Any  # callable(data, x) -> y


@functools.cache
def _import_triton_kernels() -> None:
    """The Triton kernels register on first use: importing Triton costs seconds and needs a GPU toolchain."""
    try:
        from effinfer.kernels.triton import woq  # noqa: F401
    except ImportError as e:
        logger.warning("no Triton weight-only kernel (%s): a slower path runs", e)


@dataclass
class _Reference:
    weight: CompressedWeight
    bias: torch.Tensor | None
    act_quant: str | None


def _apply_reference(data: _Reference, x: torch.Tensor) -> torch.Tensor:
    return data.weight.reference_linear(x, data.bias, data.act_quant)


@dataclass
class _FakeQuantized:
    weight: torch.Tensor  # float32 [out, in], dequantized once
    bias: torch.Tensor | None
    act_quant: str


def _apply_fake_quantized(data: _FakeQuantized, x: torch.Tensor) -> torch.Tensor:
    """The dequantized matrix with activations fake-quantized, as ``reference_linear`` computes it."""
    b = data.bias.float() if data.bias is not None else None
    return F.linear(fake_quantize_activations(x, data.act_quant), data.weight, b).to(x.dtype)


def fallback(
    weight: CompressedWeight, bias: torch.Tensor | None, act_quant: str | None, dtype: torch.dtype
) -> QuantState:
    """No kernel: the dequantized matrix on the dense path, or the weight's own reference where that differs."""
    if weight.dense_equivalent and act_quant is None:
        return QuantState(
            "dequantized", dense_linear.prepare(weight.dequantize(dtype), bias), dense_linear.apply
        )
    if weight.dense_equivalent:
        dense = _FakeQuantized(weight.dequantize(torch.float32), bias, act_quant)
        return QuantState("reference", dense, _apply_fake_quantized)
    return QuantState("reference", _Reference(weight, bias, act_quant), _apply_reference)


def prepare(
    weight: CompressedWeight, bias: torch.Tensor | None, act_quant: str | None, dtype: torch.dtype
) -> QuantState:
    if weight.device.type == "cuda":
        _import_triton_kernels()
    for kernel in kernels_for(weight, act_quant):
        data = kernel.prepare(weight, bias, act_quant, dtype)
        if data is not None:
            return QuantState(kernel.name, data, kernel.apply)
    return fallback(weight, bias, act_quant, dtype)


def apply(state: QuantState, x: torch.Tensor) -> torch.Tensor:
    return state.apply(state.data, x)
