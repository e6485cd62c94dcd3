"""Test helpers shared by the quantized-kernel tests (CPU and GPU)."""

from __future__ import annotations

import torch

from effinfer.quant.integer import QuantizedWeight, quantize_rtn


def quantized(n: int, k: int, bits: int, group: int | None, symmetric: bool, act_order: bool, seed: int):
    """An RTN-quantized random weight; with ``act_order``, groups follow a random column permutation."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    if not act_order:
        return quantize_rtn(weight, bits, group, symmetric)
    # GPTQ act-order: columns are quantized in the order ``perm``; column perm[i] is in group i // g.
    perm = torch.randperm(k, generator=gen)
    q = quantize_rtn(weight[:, perm], bits, group, symmetric)
    codes = torch.empty_like(q.qweight)
    codes[:, perm] = q.qweight
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // q.group_size).to(torch.int32)
    return QuantizedWeight(codes, q.scales, q.zeros, bits, q.group_size, g_idx)


# NF4 / FP4 weights for the table kernels (CPU and GPU): (out, in, blocksize, quant_type). The usual
# block of 64, wider and narrower blocks, out not a multiple of 16, and FP4 (whose levels are not
# sorted by code).
CODEBOOK_KERNEL_CASES = [
    (37, 128, 64, "nf4"),
    (130, 192, 64, "nf4"),
    (64, 1024, 64, "fp4"),
    (20, 256, 128, "nf4"),
    (48, 96, 32, "fp4"),
]
