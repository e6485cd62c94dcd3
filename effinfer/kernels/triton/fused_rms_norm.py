"""Fused RMSNorm with the residual add, one Triton program per token row.

Paper: RMSNorm (Zhang & Sennrich 2019); the fusion of the residual add into the norm as vLLM's
``fused_add_rms_norm``. Idea: the residual add, the float32 sum of squares, the scaling and the
weight are one pass over the row instead of five PyTorch kernels. Rounding follows
``layers/norm.py``'s reference: the sum x + residual in the activation dtype, the normalised row
cast back before the weight.

Switch on: automatic for CUDA tensors (``kernels/triton/gpu_ops.py``; ``EFFINFER_TRITON_OPS=0`` off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    stride_x, stride_residual, stride_out, stride_sum,
    num_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_square = tl.sum(xf * xf, axis=0) / num_cols
    normed = (xf * tl.rsqrt(mean_square + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) of rows x [T, H]; with ``residual``, (norm(x + residual), x + residual)."""
    if x.dim() != 2 or x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm takes rows [T, H] with contiguous columns")
    num_rows, num_cols = x.shape
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    total = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(num_cols)
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out, total,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), total.stride(0),
        num_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out if residual is None else (out, total)
