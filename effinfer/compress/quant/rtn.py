"""Round-to-nearest (RTN) weight-only quantization: the baseline every other method is measured against.

Paper: none needed; it is the "naive" quantizer of every quantization paper (e.g. GPTQ, Frantar
et al. 2022, Table 1). Idea: split each output row into groups of ``group_size`` input columns,
map each group's range onto the integer grid with one scale (and zero point, if asymmetric) and
round every weight to the nearest level (the arithmetic is ``quant/integer.py``'s, shared with
quantize-on-load). Switch on: ``effinfer quantize --method rtn --bits 4``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from effinfer.quant.integer import quantize_rtn


def quantize_model_rtn(
    model: torch.nn.Module, bits: int, group_size: int | None, symmetric: bool, show_progress: bool = True
) -> None:
    """Quantize every decoder Linear in place (no calibration data needed)."""
    for _, linear in tqdm(model.compressible_linears(), desc="rtn", unit="layer", disable=not show_progress):
        linear.set_quantized(quantize_rtn(linear.weight.data, bits, group_size, symmetric))
