"""Run-time activation quantization shared by the W8A8 / LLM.int8() references and their kernels.

Kernels and references must quantize activations with the same arithmetic, so that the two
differ only by float rounding; this is that arithmetic, once.
"""

from __future__ import annotations

import torch

ACT_QUANT_MODES = ("int8", "int8-tensor")  # one scale per token (row), or one for the whole tensor


def int8_activation_scale(x: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 scale of ``x`` [M, K] in ``mode``: [M, 1] per token, [1, 1] per tensor."""
    xf = x.float()
    if mode == "int8":
        return xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    if mode == "int8-tensor":
        return (xf.abs().amax().clamp(min=1e-8) / 127).reshape(*([1] * xf.dim()))
    raise ValueError(f"unknown activation quantization {mode!r}; choose from {', '.join(ACT_QUANT_MODES)}")


def quantize_activations_int8(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x`` and their float32 scale, so that ``codes * scale`` is ``fake_quantize_activations``."""
    scale = int8_activation_scale(x, mode)
    return torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8), scale


def fake_quantize_activations(x: torch.Tensor, mode: str) -> torch.Tensor:
    """What int8 activation quantization does to ``x``: per token (row) or per tensor absmax scaling."""
    scale = int8_activation_scale(x, mode)
    return torch.clamp(torch.round(x.float() / scale), -127, 127) * scale
