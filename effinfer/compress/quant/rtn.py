"""Round-to-nearest (RTN) weight-only quantization: the baseline every other method is measured against.

Paper: none needed; it is the "naive" quantizer of every quantization paper (e.g. GPTQ, Frantar
et al. 2022, Table 1). Idea: split each output row into groups of ``group_size`` input columns,
map each group's range onto the integer grid with one scale (and zero point, if asymmetric) and
round every weight to the nearest level. Switch on: ``effinfer quantize --method rtn --bits 4``.
"""

from __future__ import annotations

import torch

from effinfer.layers.quantized import QuantizedWeight


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` [rows, cols] (one group per row).

    Symmetric: ``scale = absmax / (2**(b-1) - 1)`` and ``zero = 2**(b-1)``, so +-absmax are
    representable exactly. Asymmetric: the range [min, max] (stretched to include 0, so that
    zero padding stays exact) is spread over all ``2**b`` levels.
    """
    w = w.float()
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / half
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        maxq = 2**bits - 1
        low = w.amin(dim=1).clamp(max=0)
        high = w.amax(dim=1).clamp(min=0)
        scale = (high - low) / maxq
        zero = torch.round(-low / torch.where(scale > 0, scale, 1)).clamp(0, maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` [rows, cols] with per-row ``scale`` / ``zero`` (shape [rows] or [rows, 1])."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> QuantizedWeight:
    """Quantize a float weight [out, in]. ``group_size=None`` means one group per output row.

    A width that is not a multiple of the group size (stories260K's 172-wide down projection)
    gets a shorter last group rather than being refused.
    """
    out_features, in_features = weight.shape
    group = group_size or in_features
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    num_groups = -(-in_features // group)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, num_groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(out_features, num_groups, dtype=torch.int32, device=weight.device)
    for g in range(num_groups):
        cols = slice(g * group, min((g + 1) * group, in_features))
        scale, zero = group_qparams(weight[:, cols], bits, symmetric)
        codes[:, cols] = quantize_codes(weight[:, cols], scale, zero, bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero.to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, bits, group)


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The decoder's Linear layers, in execution order: what every weight quantizer transforms.

    Embeddings and lm_head stay in floating point, as in GPTQ, AWQ and llama.cpp's defaults.
    """
    from effinfer.layers.linear import Linear

    return [(name, m) for name, m in model.model.layers.named_modules() if isinstance(m, Linear)]


def quantize_model_rtn(
    model: torch.nn.Module, bits: int, group_size: int | None, symmetric: bool, show_progress: bool = True
) -> None:
    """Quantize every decoder Linear in place (no calibration data needed)."""
    from tqdm.auto import tqdm

    for _, linear in tqdm(quantizable_linears(model), desc="rtn", unit="layer", disable=not show_progress):
        linear.set_quantized(quantize_rtn(linear.weight.data, bits, group_size, symmetric))
