"""FP8 (e4m3) matrix multiply on fp8 tensor cores through ``torch._scaled_mm`` (cuBLASLt / CUTLASS).

Paper: Micikevicius et al. 2022, "FP8 Formats for Deep Learning". Idea: the weight is e4m3 with
one float32 scale per output channel (``quant/fp8.py``); each call quantizes the
activations to e4m3 with one scale per token (row) and multiplies fp8 by fp8 with fp32
accumulation, rescaling the result by ``x_scale[m] * w_scale[n]``:

    y[m, n] = x_scale[m] * w_scale[n] * sum_k qx[m, k] * qw[n, k]  (+ bias[n])

"rowwise" passes both scale vectors to ``_scaled_mm`` (bf16 output, the only one its rowwise
kernels write); where this torch build lacks rowwise kernels, "tensorwise" uses one activation
scale for the whole call and applies the weight scales to the output. ``_scaled_mm`` needs
compute capability 8.9+ and K and N multiples of 16; elsewhere ``prepare`` returns None and the
layer runs the dequantized weight (as it always does on CPU: there, fp8 is weight-only).

Switch on: ``LLM(model, quantization="fp8")``; registered for ``Fp8Weight`` on CUDA below.
No Triton is needed, despite the folder: it sits with the other GPU kernels.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from effinfer.quant.fp8 import FP8_DTYPE, Fp8Weight, quantize_activations_fp8
from effinfer.quant.registry import Kernel, register_kernel

logger = logging.getLogger(__name__)


@dataclass
class Fp8State:
    weight_t: torch.Tensor  # float8_e4m3fn [in, out], column-major (the transpose of a contiguous [out, in])
    weight_scale: torch.Tensor  # float32 [1, out]
    bias: torch.Tensor | None  # [out], in ``dtype``
    mode: str  # "rowwise" or "tensorwise"
    unit_scale: torch.Tensor  # float32 scalar 1 (tensorwise: the weight's scale is applied afterwards)
    in_features: int
    out_features: int
    dtype: torch.dtype


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype):
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)


@functools.cache
def scaling_mode(device_index: int) -> str | None:
    """ "rowwise" if this torch build runs per-row scales on the device, else "tensorwise", else None."""
    device = torch.device("cuda", device_index)
    a = torch.ones(16, 32, device=device).to(FP8_DTYPE)
    b = torch.ones(16, 32, device=device).to(FP8_DTYPE).t()
    one = torch.ones((), device=device)
    for mode, sa, sb in (
        ("rowwise", torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)),
        ("tensorwise", one, one),
    ):
        try:
            out = _scaled_mm(a, b, sa, sb, torch.bfloat16)
            if torch.allclose(out.float(), torch.full_like(out.float(), 32.0)):
                return mode
        except RuntimeError as e:
            logger.info("_scaled_mm %s scaling unavailable: %s", mode, str(e).splitlines()[0])
    return None


def prepare(
    weight: Fp8Weight, bias: torch.Tensor | None, dtype: torch.dtype, mode: str | None = None
) -> Fp8State | None:
    """The weight laid out for ``_scaled_mm``, or None where it cannot run here.

    ``mode`` ("rowwise" / "tensorwise") skips probing the GPU: the tests run this wrapper on CPU
    tensors that way, where torch's own ``_scaled_mm`` takes both scalings.
    """
    device = weight.weight.device
    if weight.in_features % 16 or weight.out_features % 16:
        return None
    if mode is None:
        if not supported(device):
            return None
        mode = scaling_mode(device.index if device.index is not None else torch.cuda.current_device())
        if mode is None:
            return None
    return Fp8State(
        weight_t=weight.weight.contiguous().t(),
        weight_scale=weight.scale.float().reshape(1, -1).contiguous(),
        bias=bias.detach().to(dtype) if bias is not None else None,
        mode=mode,
        unit_scale=torch.ones((), device=device),
        in_features=weight.in_features,
        out_features=weight.out_features,
        dtype=dtype,
    )


def apply(state: Fp8State, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, state.in_features)
    # The reference's own activation codes (quant/fp8.py): the two differ only in rounding.
    qx, x_scale = quantize_activations_fp8(x2, per_token=state.mode == "rowwise")
    if state.mode == "rowwise":
        y = _scaled_mm(qx, state.weight_t, x_scale, state.weight_scale, torch.bfloat16)
    else:
        y = _scaled_mm(qx, state.weight_t, x_scale, state.unit_scale, torch.float32) * state.weight_scale
    y = y.to(state.dtype)
    if state.bias is not None:
        y = y + state.bias
    return y.reshape(*x.shape[:-1], state.out_features)


register_kernel(Kernel("fp8", Fp8Weight, "cuda", (None,), lambda w, b, a, dt: prepare(w, b, dt), apply))
