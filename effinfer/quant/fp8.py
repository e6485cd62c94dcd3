"""FP8 (e4m3) weights with one scale per output channel.

Paper: Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (the e4m3 / e5m2 formats); the
recipe (per-channel weight scales, per-token dynamic activation scales) is the one vLLM and
TensorRT-LLM ship for Hopper. Idea: each output row is scaled so its largest magnitude lands on
e4m3's largest finite value (448) and every weight is rounded to the nearest e4m3 number (3
mantissa bits, so about 6% relative spacing, without an integer grid's range problems); on GPUs
with fp8 tensor cores (compute capability 8.9+) activations are quantized per token at run time
and the product runs on them (``kernels/triton/fp8.py``), elsewhere the weight is dequantized.

Switch on: ``LLM(model, quantization="fp8")`` / ``--quantization fp8`` (``loading/online_quant.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
# Scales are amax * (1 / 448), not amax / 448: CUDA divides a tensor by a Python number as a
# multiplication by its reciprocal, the CPU divides exactly, and a scale that differs in the last
# bit moves values that sit on an e4m3 rounding boundary to the next code (one step is 6-12%).
# Multiplying by the same float32 constant gives the same scale on both.
INV_FP8_MAX = 1.0 / FP8_MAX


@dataclass
class Fp8Weight(CompressedWeight):
    """W[n, k] ~= weight[n, k] * scale[n]."""

    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # float32 [out]
    bits = 8
    kind = "fp8"

    def __post_init__(self) -> None:
        if self.weight.dtype != FP8_DTYPE or self.weight.dim() != 2:
            raise ValueError(
                f"expected a 2-D {FP8_DTYPE} weight, got {self.weight.dtype} {tuple(self.weight.shape)}"
            )
        if tuple(self.scale.shape) != (self.weight.shape[0],):
            raise ValueError(f"scale has shape {tuple(self.scale.shape)}, expected {(self.weight.shape[0],)}")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in]: the reference every fp8 kernel is tested against."""
        return (self.weight.float() * self.scale.float()[:, None]).to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def rows(self, start: int, stop: int) -> Fp8Weight:
        return Fp8Weight(self.weight[start:stop], self.scale[start:stop])

    @classmethod
    def cat_rows(cls, parts: list[Fp8Weight]) -> Fp8Weight:
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("cannot fuse fp8 weights of different widths")
        return Fp8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]))

    def to(self, device: torch.device | str) -> Fp8Weight:
        return Fp8Weight(self.weight.to(device), self.scale.to(device))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"weight": self.weight, "scale": self.scale}, {}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Fp8Weight:
        return cls(tensors["weight"], tensors["scale"])


def quantize_fp8(weight: torch.Tensor) -> Fp8Weight:
    """e4m3 codes of ``weight`` [out, in] with scale = row absmax * (1 / 448) (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax * INV_FP8_MAX, torch.ones_like(amax))
    codes = torch.clamp(w / scale[:, None], -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(codes, scale)


def quantize_activations_fp8(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic e4m3 codes of ``x`` [M, K] and their float32 scales ([M, 1] per token, [] per tensor)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
    scale = amax.clamp(min=1e-12) * INV_FP8_MAX
    return torch.clamp(xf / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def reference(
    x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None, activations: str | None = "token"
) -> torch.Tensor:
    """What an fp8 kernel computes, in fp32: activations fake-quantized to e4m3 per ``"token"`` (row)
    or per ``"tensor"`` (None: left as they are, the CPU's weight-only fp8), times the dequantized weight."""
    xf = x.float()
    if activations is not None:
        codes, scale = quantize_activations_fp8(xf.reshape(-1, x.shape[-1]), per_token=activations == "token")
        xf = (codes.float() * scale).reshape(x.shape)
    b = bias.float() if bias is not None else None
    return torch.nn.functional.linear(xf, weight.dequantize(torch.float32), b).to(x.dtype)
