"""LLM.int8() weights: int8 codes with one absmax per output row, and their mixed-precision product.

Paper: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale".
Idea: weights are int8 with one absmax scale per output row and activations int8 with one absmax
scale per token ("vector-wise"); the few input columns where some token's |x| exceeds a threshold
(6.0) are taken out and multiplied in floating point, so one outlier cannot flatten a token's scale.
``LLMInt8Weight.reference_linear`` is that product in fp32; ``kernels/llm_int8.py`` the fast one.
Switch on: ``--quantization llm_int8`` or ``effinfer quantize --method llm_int8 [--threshold 6.0]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from effinfer.quant.activations import fake_quantize_activations
from effinfer.quant.base import CompressedWeight

DEFAULT_THRESHOLD = 6.0


@dataclass
class LLMInt8Weight(CompressedWeight):
    """W[n, k] ~= weight[n, k] * absmax[n] / 127.

    ``absmax`` is the row's largest |W| itself (bitsandbytes calls it ``SCB``), not the scale, so
    a bitsandbytes checkpoint's tensors map onto this class one to one.
    """

    weight: torch.Tensor  # int8 [out, in], in [-127, 127]
    absmax: torch.Tensor  # float32 [out]
    threshold: float = DEFAULT_THRESHOLD  # |x| above which an input column runs in floating point
    bits = 8
    kind = "llm_int8"
    dense_equivalent = False  # the product quantizes activations and takes outlier columns apart

    def __post_init__(self) -> None:
        if self.weight.dtype != torch.int8 or self.weight.dim() != 2:
            raise ValueError(
                f"expected a 2-D int8 weight, got {self.weight.dtype} {tuple(self.weight.shape)}"
            )
        if tuple(self.absmax.shape) != (self.weight.shape[0],):
            raise ValueError(
                f"absmax has shape {tuple(self.absmax.shape)}, expected {(self.weight.shape[0],)}"
            )
        if math.isnan(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (inf: no decomposition), got {self.threshold}")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def row_scale(self) -> torch.Tensor:
        """float32 [out]: the value of one int8 step in each row."""
        return self.absmax.float() / 127

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in]: what the outlier columns are multiplied with, and the reference."""
        return (self.weight.float() * self.row_scale()[:, None]).to(dtype)

    def to(self, device: torch.device | str) -> LLMInt8Weight:
        return LLMInt8Weight(self.weight.to(device), self.absmax.to(device), self.threshold)

    def nbytes(self) -> int:
        return self.weight.numel() + self.absmax.numel() * 4

    def rows(self, start: int, stop: int) -> LLMInt8Weight:
        return LLMInt8Weight(self.weight[start:stop], self.absmax[start:stop], self.threshold)

    @classmethod
    def cat_rows(cls, parts: list[LLMInt8Weight]) -> LLMInt8Weight:
        if len({p.in_features for p in parts}) != 1 or len({p.threshold for p in parts}) != 1:
            raise ValueError("cannot fuse LLM.int8() weights of different widths or thresholds")
        weight = torch.cat([p.weight for p in parts])
        return LLMInt8Weight(weight, torch.cat([p.absmax for p in parts]), parts[0].threshold)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"weight": self.weight, "absmax": self.absmax}, {"threshold": self.threshold}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> LLMInt8Weight:
        return cls(tensors["weight"], tensors["absmax"], float(metadata["threshold"]))

    def reference_linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, act_quant: str | None = None
    ) -> torch.Tensor:
        """The definition the kernel must match, in plain fp32: decompose, fake-quantize per token, matmul.

        ``act_quant`` is ignored: LLM.int8() always quantizes its non-outlier activations per token.
        """
        lead, in_features = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, in_features).float()
        is_outlier = xf.abs().amax(dim=0) > self.threshold  # [K]; never true for threshold inf
        regular = torch.where(is_outlier, torch.zeros_like(xf), xf)
        regular_q = fake_quantize_activations(regular, "int8")
        w = self.dequantize(torch.float32)
        y = F.linear(regular_q, w) + F.linear(torch.where(is_outlier, xf, torch.zeros_like(xf)), w)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)


def quantize_llm_int8(weight: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> LLMInt8Weight:
    """Row-wise absmax int8 codes of ``weight`` [out, in]: q = round(127 * W / absmax(row))."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero row: any scale works
    codes = torch.clamp(torch.round(w * (127 / absmax[:, None])), -127, 127).to(torch.int8)
    return LLMInt8Weight(codes, absmax, threshold)
