"""SiLU-and-multiply of the gated MLP (SwiGLU, Shazeer 2020) in one Triton kernel.

Idea: ``silu(gate) * up`` over the gate_up projection's output [T, 2I] reads both halves once
and writes [T, I], instead of a chunk, a SiLU kernel and a product kernel. Rounding follows
PyTorch's: SiLU in float32 rounded to the activation dtype, then the product rounded.

Switch on: automatic for CUDA tensors (``kernels/triton/gpu_ops.py``; ``EFFINFER_TRITON_OPS=0`` off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + width + cols, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    activated = (gate_f / (1.0 + tl.exp(-gate_f))).to(gate.dtype)
    tl.store(out_ptr + row * stride_out + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] (gate columns first); returns [T, I]."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2:
        raise ValueError("silu_and_mul takes [T, 2I] with contiguous columns")
    num_rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_rows, width)
    if num_rows:
        grid = (num_rows, triton.cdiv(width, BLOCK))
        _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=BLOCK)
    return out
