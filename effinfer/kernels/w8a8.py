"""W8A8 matrix multiply: int8 weights times int8 activations, int32 accumulation.

Used by SmoothQuant (Xiao et al. 2022, ``compress/quant/smoothquant.py``) and its naive baseline.
Idea: the weight is int8 per output channel (offline); each call quantizes the activations to
int8 (one scale per token, ``"int8"``, or one for the whole tensor, ``"int8-tensor"``), multiplies
integers with int32 accumulation and rescales the result by ``x_scale[m] * w_scale[n]``:

    y[m, n] = x_scale[m] * w_scale[n] * sum_k qx[m, k] * qw[n, k]  (+ bias[n])

Switched on by a Linear whose ``act_quant`` is set (``Linear.set_quantized(qw, act_quant="int8")``).
Backends, picked once in ``prepare``:

- ``onednn`` (CPU): ``torch.ops.onednn.qlinear_pointwise`` on a weight prepacked by
  ``qlinear_prepack``: oneDNN's int8 GEMM (AMX-INT8 / AVX512-VNNI). It takes a single activation
  scale, so it runs with scale 1 and the per-token scales are applied to its float output.
- ``int_mm`` (CUDA): ``torch._int_mm``, which needs more than 16 rows: fewer are zero-padded.
- ``reference``: the weight dequantized once, activations fake-quantized; for weights that are
  not symmetric per-channel int8 (which an int8 GEMM cannot run) and devices without a kernel.

Every backend must equal ``QuantizedWeight.reference_linear(x, bias, act_quant)``
(tests/test_smoothquant.py): both quantize the activations with ``quant/activations.py``, so they
differ only by float rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effinfer.quant.activations import ACT_QUANT_MODES, fake_quantize_activations, quantize_activations_int8
from effinfer.quant.integer import QuantizedWeight
from effinfer.quant.registry import Kernel, register_kernel

logger = logging.getLogger(__name__)

# oneDNN picks its blocked int8 layout for this batch size; decode and short prefill both do well.
PACK_BATCH_HINT = 16
# torch._int_mm on CUDA refuses 16 rows or fewer.
CUDA_MIN_ROWS = 17


@dataclass
class W8A8State:
    backend: str  # "onednn", "int_mm" or "reference"
    weight: torch.Tensor  # onednn: packed int8; int_mm: int8 [out, in]; reference: float [out, in]
    weight_scale: torch.Tensor  # float32 [out]
    bias: torch.Tensor | None
    act_quant: str  # "int8" (per token) or "int8-tensor"
    out_features: int
    weight_zero_point: torch.Tensor | None = None  # onednn: int64 zeros (the weight is symmetric)


def int8_weight(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 [out, in], float32 scale [out]) for a symmetric per-channel 8-bit weight, else None."""
    if weight.bits != 8 or weight.num_groups != 1 or weight.g_idx is not None or not weight.symmetric:
        return None
    codes = (weight.qweight.to(torch.int16) - weight.zeros.to(torch.int16)).to(torch.int8)
    return codes, weight.scales[:, 0].float().contiguous()


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def prepare(
    weight: QuantizedWeight, bias: torch.Tensor | None, act_quant: str, dtype: torch.dtype
) -> W8A8State:
    if act_quant not in ACT_QUANT_MODES:
        raise ValueError(f"unknown activation quantization {act_quant!r}")
    device = weight.qweight.device
    out_features = weight.out_features
    int8 = int8_weight(weight)
    bias = bias.detach() if bias is not None else None
    if int8 is not None:
        codes, w_scale = int8
        if device.type == "cpu" and _onednn_available():
            try:
                packed = torch.ops.onednn.qlinear_prepack(codes, [PACK_BATCH_HINT, weight.in_features])
                zero_points = torch.zeros(out_features, dtype=torch.long)
                return W8A8State("onednn", packed, w_scale, bias, act_quant, out_features, zero_points)
            except RuntimeError as e:  # an oneDNN build without int8 GEMM
                logger.warning("oneDNN int8 GEMM unavailable (%s): W8A8 runs dequantized", e)
        if device.type == "cuda" and weight.in_features % 8 == 0 and out_features % 8 == 0:
            return W8A8State("int_mm", codes.contiguous(), w_scale, bias, act_quant, out_features)
    dense = weight.dequantize(torch.float32)
    return W8A8State("reference", dense, weight.scales[:, 0].float(), bias, act_quant, out_features)


def apply(state: W8A8State, x: torch.Tensor) -> torch.Tensor:
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if state.backend == "reference":
        xq = fake_quantize_activations(x2, state.act_quant)
        b = state.bias.float() if state.bias is not None else None
        return F.linear(xq, state.weight, b).to(x.dtype).reshape(*lead, state.out_features)
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty(*lead, state.out_features)
    qx, x_scale = quantize_activations_int8(x2, state.act_quant)
    if state.backend == "onednn":
        # x_scale 1: the op only takes one activation scale; the per-token ones are applied below.
        acc = torch.ops.onednn.qlinear_pointwise(
            qx, 1.0, 0, state.weight, state.weight_scale, state.weight_zero_point, None,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        y = acc * x_scale
    else:
        if rows < CUDA_MIN_ROWS:
            qx = F.pad(qx, (0, 0, 0, CUDA_MIN_ROWS - rows))
        # [out, in] row-major is the column-major [in, out] operand cuBLASLt's int8 GEMM wants.
        acc = torch._int_mm(qx, state.weight.t())[:rows]
        y = acc.float() * x_scale * state.weight_scale
    if state.bias is not None:
        y = y + state.bias.float()
    return y.to(x.dtype).reshape(*lead, state.out_features)


# Any device: where no int8 GEMM runs, ``prepare`` keeps the reference arithmetic itself.
register_kernel(
    Kernel("w8a8", QuantizedWeight, None, ACT_QUANT_MODES, lambda w, b, a, dt: prepare(w, b, a, dt), apply)
)
