"""Every quantization scheme and every quantized-matmul kernel, by name: the one list the rest derives from.

A scheme (``SCHEMES``) is what ``--quantization`` / ``EngineConfig.quantization`` offers: a
weight type, the arithmetic that makes it from a float weight while loading, and a description.
``effinfer.cli``, ``EngineConfig`` validation, ``loading/online_quant.py`` and ``bench quant``
read their lists from here. Adding a scheme is one module under ``quant/`` and one line below.

Kernels (``kernels/``) register themselves for a weight type, a device type and the activation
quantizations they run (``register_kernel``); ``kernels/quant_linear.prepare`` takes the first
that accepts a weight, else runs the weight's dequantized matrix. This module never imports a
kernel: kernels sit above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight
from effinfer.quant.codebook import CodebookWeight, quantize_codebook
from effinfer.quant.fp8 import Fp8Weight, quantize_fp8
from effinfer.quant.integer import QuantizedWeight, quantize_rtn
from effinfer.quant.llm_int8 import LLMInt8Weight, quantize_llm_int8
from effinfer.quant.lowrank import LowRankWeight


class UnknownScheme(ValueError):
    """A scheme name no entry has; the message lists the choices."""


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_type: type[CompressedWeight]
    quantize: Callable[[torch.Tensor], CompressedWeight]  # float weight [out, in] -> its compressed form
    description: str
    # How lm_head is stored, or None to keep it in floating point (most schemes).
    quantize_lm_head: Callable[[torch.Tensor], CompressedWeight] | None = None
    act_quant: str | None = None  # run-time activation quantization (W8A8), see quant/activations.py


# As llama.cpp keeps its output projection at 6-8 bits (every logit goes through it), the RTN
# schemes store lm_head as int8 per channel; a tied embedding keeps its float table.
_INT8_PER_CHANNEL = partial(quantize_rtn, bits=8, group_size=None, symmetric=True)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8", QuantizedWeight, _INT8_PER_CHANNEL, "RTN int8, one scale per output channel",
           _INT8_PER_CHANNEL),
    Scheme("int4", QuantizedWeight, partial(quantize_rtn, bits=4, group_size=128, symmetric=False),
           "RTN int4, asymmetric, groups of 128 input columns", _INT8_PER_CHANNEL),
    Scheme("w8a8", QuantizedWeight, _INT8_PER_CHANNEL,
           "int8 weights per channel x int8 activations per token (naive W8A8)", act_quant="int8"),
    Scheme("fp8", Fp8Weight, quantize_fp8, "fp8 e4m3, one scale per output channel"),
    Scheme("nf4", CodebookWeight, partial(quantize_codebook, quant_type="nf4", blocksize=64),
           "bitsandbytes NF4, blocks of 64"),
    Scheme("fp4", CodebookWeight, partial(quantize_codebook, quant_type="fp4", blocksize=64),
           "bitsandbytes FP4, blocks of 64"),
    Scheme("llm_int8", LLMInt8Weight, quantize_llm_int8, "LLM.int8(): int8 with float outlier columns"),
)}  # fmt: skip


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise UnknownScheme(f"unknown quantization {name!r}; choose from {', '.join(SCHEMES)}")
    return SCHEMES[name]


def weight_types() -> list[type[CompressedWeight]]:
    """Every weight type a scheme uses, once each, in registry order."""
    return list(dict.fromkeys(s.weight_type for s in SCHEMES.values()))


# Weight types no scheme makes: offline transforms write them (``effinfer compress --low-rank``).
OFFLINE_WEIGHT_TYPES: tuple[type[CompressedWeight], ...] = (LowRankWeight,)


def weight_type(kind: str) -> type[CompressedWeight]:
    """The weight type a checkpoint names by its ``kind`` (``CompressedWeight.kind``)."""
    types = {t.kind: t for t in (*weight_types(), *OFFLINE_WEIGHT_TYPES)}
    if kind not in types:
        raise ValueError(f"unknown compressed-weight kind {kind!r}; known: {', '.join(types)}")
    return types[kind]


# -------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Kernel:
    name: str  # e.g. "cpu-woq": what ``Linear`` reports as its backend
    weight_type: type[CompressedWeight]
    device_type: str | None  # "cpu", "cuda", or None for any device
    act_quants: tuple[str | None, ...]  # the activation quantizations it runs (None: weight-only)
    prepare: Callable[[Any, torch.Tensor | None, str | None, torch.dtype], Any]  # -> packed data or None
    apply: Callable[[Any, torch.Tensor], torch.Tensor]
    priority: int = 0  # higher is tried first; a general fallback registers below 0


KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel; among those that accept a weight, the highest priority (then the first registered) wins."""
    if any(k.name == kernel.name and k.weight_type is kernel.weight_type for k in KERNELS):
        raise ValueError(f"kernel {kernel.name!r} is registered twice for {kernel.weight_type.__name__}")
    KERNELS.append(kernel)


def kernels_for(weight: CompressedWeight, act_quant: str | None) -> list[Kernel]:
    """The registered kernels for this weight's type and device and ``act_quant``, in preference order."""
    device = weight.device.type
    found = [
        k for k in KERNELS
        if isinstance(weight, k.weight_type) and k.device_type in (None, device) and act_quant in k.act_quants
    ]  # fmt: skip
    return sorted(found, key=lambda k: -k.priority)
