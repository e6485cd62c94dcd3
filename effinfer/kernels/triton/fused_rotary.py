"""Rotary position embedding applied in place to queries and keys, one Triton program per token.

Paper: RoPE (Su et al. 2021), the "rotate_half" layout of ``layers/rotary.py`` (pairs i, i + d/2).
Idea: the queries and keys of a token sit side by side in the qkv projection's output; one kernel
reads each pair once, rotates it in float32 by the position's angle and writes it back, instead
of PyTorch's slice, negate, concatenate, two products and a sum.

Switch on: automatic for CUDA tensors (``kernels/triton/gpu_ops.py``; ``EFFINFER_TRITON_OPS=0`` off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr,
    stride_token, stride_head, stride_table,
    num_heads,
    HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    mask = (heads[:, None] < num_heads) & col_mask[None, :]
    cos = tl.load(cos_ptr + token * stride_table + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_table + cols, mask=col_mask, other=0.0).to(tl.float32)
    first = x_ptr + token * stride_token + heads[:, None] * stride_head + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, d] in place by cos / sin [T, d] (or [T, 1, d]); returns x.

    The rows of x may be strided (a view of the qkv projection's output); each head's d values
    must be contiguous.
    """
    cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(2) != 1 or head_dim % 2 or cos.shape[1] != head_dim or cos.stride(1) != 1:
        raise ValueError("rotary_ takes x [T, heads, d] with contiguous heads and cos / sin [T, d], d even")
    if sin.stride() != cos.stride():
        raise ValueError("cos and sin must share one layout")
    if num_tokens == 0:
        return x
    block_heads = max(2, min(triton.next_power_of_2(num_heads), 16))
    grid = (num_tokens, triton.cdiv(num_heads, block_heads))
    _rotary_kernel[grid](
        x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), num_heads,
        HALF=head_dim // 2, BLOCK_HEADS=block_heads, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )  # fmt: skip
    return x
