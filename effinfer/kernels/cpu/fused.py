"""Fused C++ ops for the non-GEMM work of a decoder layer on CPU (``fused_ops.cpp``).

Paper: none; the operator fusion the survey (Zhou et al. 2024, "graph and operator optimization")
describes, done by hand the way vLLM's and llama.cpp's CPU backends do. Idea: outside the matrix
products a decode step is ~40 small PyTorch calls per layer (casts, slices, reductions, a gather of
the whole context), each paying dispatch and a pass over memory; one C++ call each for RMSNorm
(with the residual add), rotary embedding, SiLU-and-multiply and paged decode attention
does the same arithmetic in one pass and reads the cache in place.

Switch on: automatic for bf16 / float32 inference on CPUs with AVX512-BF16 (the layers call
``usable``); ``EFFINFER_CPU_FUSED=0`` turns it off, and training (autograd) always runs the PyTorch
reference in ``layers/``, which the tests compare this against.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from effinfer.kernels.cpu import build

SOURCE = Path(__file__).with_name("fused_ops.cpp")
REQUIRED_CPU_FLAGS = build.AVX512_BF16_CPU_FLAGS
# No contraction of a product and a sum into one FMA: the rounding must be the reference's.
COMPILE_FLAGS = build.AVX512_BF16_FLAGS + ["-ffp-contract=off"]
DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def extension() -> Any | None:
    """The compiled ops, or None where they cannot run (the layers then use PyTorch)."""
    return build.load(
        "effinfer_fused", SOURCE, COMPILE_FLAGS, REQUIRED_CPU_FLAGS, "decoder layers run on plain PyTorch ops",
        switch="EFFINFER_CPU_FUSED",
    )  # fmt: skip


def usable(x: torch.Tensor) -> bool:
    """Whether the fused ops can take ``x``: a CPU bf16 / float32 tensor, grad off, kernels built."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in DTYPES
        and extension() is not None
    )
