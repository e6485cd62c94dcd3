"""bf16 matrix products for decode-sized batches (1-64 rows) on AMX, reading plain row-major weights.

Paper: none single; the memory-bound GEMV that every CPU decoder (llama.cpp, IPEX, vLLM's CPU
backend) writes by hand. Idea: a decode step multiplies a few rows of activations by every weight
once, so its speed is the speed at which the weights stream in from DRAM. One core's hardware
prefetchers keep too few misses in flight for that (they stop at 4 KB pages), so the kernel
prefetches each weight row a short distance ahead in software and feeds 16 rows x 32 columns of
weights at a time to AMX tiles straight from the row-major tensor (``skinny_gemm.cpp``). Measured
here: 28-31 GB/s at 1-16 rows where oneDNN's prepacked bf16 GEMM reads 21-26 GB/s
(benchmarks/dense_kernels.py, docs/benchmarks.md). Bigger batches (prefill) go to oneDNN
through ``F.linear`` on the same tensor, so the model is held once.

Switch on: automatic for bf16 Linear layers whose in_features is a multiple of 32, on CPUs with
AMX-BF16 (Sapphire Rapids and later); ``EFFINFER_CPU_SKINNY=0`` turns it off (the layers then use
oneDNN's prepacked weights, ``dense_linear``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from effinfer.kernels.cpu import build

SOURCE = Path(__file__).with_name("skinny_gemm.cpp")
REQUIRED_CPU_FLAGS = build.AVX512_BF16_CPU_FLAGS + build.AMX_CPU_FLAGS
COMPILE_FLAGS = build.AVX512_BF16_FLAGS + build.AMX_FLAGS
MAX_ROWS = 64  # rows of x the kernel takes (four AMX tiles of 16); more go to oneDNN
COLUMN_MULTIPLE = 32  # in_features must fill whole AMX tiles


@functools.cache
def extension() -> Any | None:
    """The compiled kernel, or None where it cannot run."""
    return build.load(
        "effinfer_skinny", SOURCE, COMPILE_FLAGS, REQUIRED_CPU_FLAGS, "bf16 decode uses oneDNN",
        switch="EFFINFER_CPU_SKINNY", needs_amx=True,
    )  # fmt: skip


def supports(weight: torch.Tensor) -> bool:
    """Whether the kernel can serve this weight [out, in]: contiguous bf16 on the CPU, in a multiple of 32, built here."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.is_contiguous()  # used in place: a copy would hold the weight twice
        and weight.shape[1] % COLUMN_MULTIPLE == 0
        and extension() is not None
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias_f32: torch.Tensor | None) -> torch.Tensor:
    """x [1 <= rows <= MAX_ROWS, in] bf16 @ weight^T (+ float32 bias), in bf16; no autograd."""
    return extension().skinny_linear(x, weight, bias_f32)
