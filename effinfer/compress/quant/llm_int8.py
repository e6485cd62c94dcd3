"""LLM.int8(): int8 weights and activations with mixed-precision decomposition for outlier columns.

Paper: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale".
Idea: weights are int8 with one absmax scale per output row and activations int8 with one absmax
scale per token ("vector-wise"); the few input columns where some token's |x| exceeds a threshold
(6.0) are taken out and multiplied in floating point, so one outlier cannot flatten a token's scale.
Switch on: ``effinfer quantize --method llm_int8 [--threshold 6.0]`` or ``quantize_model_llm_int8(model)``;
the run-time product is ``kernels/llm_int8.py`` and ``outlier_share(model)`` reports how many
columns took the float path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_THRESHOLD = 6.0


@dataclass
class LLMInt8Weight:
    """W[n, k] ~= weight[n, k] * absmax[n] / 127; the duck type of ``layers/quantized.QuantizedWeight``.

    ``absmax`` is the row's largest |W| itself (bitsandbytes calls it ``SCB``), not the scale, so
    a bitsandbytes checkpoint's tensors map onto this class one to one.
    """

    weight: torch.Tensor  # int8 [out, in], in [-127, 127]
    absmax: torch.Tensor  # float32 [out]
    threshold: float = DEFAULT_THRESHOLD  # |x| above which an input column runs in floating point
    bits = 8
    scheme = "llm_int8"  # what kernels/quant_linear.prepare dispatches on (no import of compress/ there)

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

    @staticmethod
    def cat_rows(parts: list[LLMInt8Weight]) -> LLMInt8Weight:
        if len({p.in_features for p in parts}) != 1 or len({p.threshold for p in parts}) != 1:
            raise ValueError("cannot fuse LLM.int8() weights of different widths or thresholds")
        weight = torch.cat([p.weight for p in parts])
        return LLMInt8Weight(weight, torch.cat([p.absmax for p in parts]), parts[0].threshold)


def quantize_llm_int8(weight: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> LLMInt8Weight:
    """Row-wise absmax int8 codes of ``weight`` [out, in]: q = round(127 * W / absmax(row))."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero row: any scale works
    codes = torch.clamp(torch.round(w * (127 / absmax[:, None])), -127, 127).to(torch.int8)
    return LLMInt8Weight(codes, absmax, threshold)


@torch.no_grad()
def quantize_model_llm_int8(model: torch.nn.Module, threshold: float = DEFAULT_THRESHOLD) -> None:
    """Quantize every decoder Linear to LLM.int8() in place (embeddings and lm_head stay in float)."""
    from effinfer.compress.quant.rtn import quantizable_linears

    for _, linear in quantizable_linears(model):
        linear.set_quantized(quantize_llm_int8(linear.dequantized_weight(), threshold))


def _llm_int8_states(model: torch.nn.Module) -> list:
    from effinfer.layers.linear import Linear

    states = []
    for module in model.modules():
        state = getattr(module, "_kernel_state", None) if isinstance(module, Linear) else None
        if state is not None and getattr(state, "backend", None) == "llm_int8":
            states.append(state.data)
    return states


def outlier_share(model: torch.nn.Module) -> tuple[int, int]:
    """(outlier columns, columns) summed over every LLM.int8() layer's calls since the last reset.

    A column is counted once per layer call: a layer with 256 inputs called on one batch adds 256
    to the total and the number of those columns that went through the float product to the first.
    """
    states = _llm_int8_states(model)
    return sum(s.outlier_columns for s in states), sum(s.total_columns for s in states)


def reset_outlier_counts(model: torch.nn.Module) -> None:
    for state in _llm_int8_states(model):
        state.outlier_columns = state.total_columns = 0
