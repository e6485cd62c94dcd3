"""Causal attention of a prompt (or a prompt's chunk) on AMX tiles: flash attention for CPU prefill.

Paper: Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness". Idea: attention is computed block by block with a running (online) softmax, so
the T x T score matrix never exists in memory; here each block's two matrix products (Q K^T and
P V) run on AMX tiles and the softmax on AVX-512 in float32 (``flash_prefill.cpp``).

Switch on: automatic for bf16 prefill on CPUs with AMX-BF16, head sizes a multiple of 32 (up to
256): whole prompts, chunks after a cached prefix, sliding-window layers (not attention sinks);
``EFFINFER_CPU_FLASH=0`` turns it off (PyTorch's ``scaled_dot_product_attention`` then runs).
Measured: docs/cpu-flash-attention.md.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from effinfer.kernels.cpu import build

SOURCE = Path(__file__).with_name("flash_prefill.cpp")
REQUIRED_CPU_FLAGS = build.AVX512_BF16_CPU_FLAGS + build.AMX_CPU_FLAGS
COMPILE_FLAGS = build.AVX512_BF16_FLAGS + build.AMX_FLAGS


@functools.cache
def extension() -> Any | None:
    """The compiled kernel, or None where it cannot run."""
    return build.load(
        "effinfer_flash_prefill", SOURCE, COMPILE_FLAGS, REQUIRED_CPU_FLAGS,
        "prompt attention uses PyTorch's scaled_dot_product_attention",
        switch="EFFINFER_CPU_FLASH", needs_amx=True,
    )  # fmt: skip


def usable(q: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernel can take these [tokens, heads * head_dim] queries."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and head_dim % 32 == 0
        and head_dim <= 256
        and not torch.is_grad_enabled()
        and extension() is not None
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    kv_heads: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the last T_q of T_k positions: q [T_q, heads * d], k / v [T_k, kv_heads * d] -> [T_q, heads * d].

    Query i (position T_k - T_q + i) sees keys up to its own position, and with ``window`` only
    the last ``window`` of them (HF's sliding window: key > position - window).
    """
    return extension().causal_attention(q, k, v, heads, kv_heads, scale, window or 0)
