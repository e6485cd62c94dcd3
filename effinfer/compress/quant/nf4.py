"""NF4 / FP4 for a whole model: every decoder Linear quantized the way bitsandbytes' 4-bit layers are.

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". Idea: blocks of 64
consecutive weights scaled by their absmax and rounded to the nearest of 16 levels (normal
quantiles for NF4); the weight type and its arithmetic are ``quant/codebook.py``.
Switch on: ``effinfer quantize --method nf4 | fp4 [--double-quant]`` or ``--quantization nf4``.
"""

from __future__ import annotations

import torch

from effinfer.quant.codebook import CodebookWeight, codebook, quantize_codebook


def quantize_model_nf4(
    model: torch.nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> None:
    """Quantize every decoder Linear in place (embeddings and lm_head stay in floating point).

    Fused layers are quantized per checkpoint tensor (q, k, v, ...), as bitsandbytes quantizes
    each HF Linear on its own, so the result is the one a bitsandbytes checkpoint would hold.
    """
    codebook(quant_type)  # fail on an unknown type before touching the model
    for _, linear in model.compressible_linears():
        weight = linear.dequantized_weight()
        parts, start = [], 0
        for rows in linear.shard_sizes:
            parts.append(quantize_codebook(weight[start : start + rows], quant_type, blocksize, double_quant))
            start += rows
        linear.set_quantized(parts[0] if len(parts) == 1 else CodebookWeight.cat_rows(parts))
