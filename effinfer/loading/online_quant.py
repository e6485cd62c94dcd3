"""Quantize while loading: ``LLM(model, quantization="int4")`` runs a float checkpoint quantized.

No calibration and no checkpoint to write: each decoder weight is rounded to the nearest level
(RTN, ``compress/quant/rtn.py``) as it is loaded, before the kernels pack it. int8 is symmetric
per output channel; int4 is asymmetric with groups of 128 input columns (the output projection
is int8 per channel in both, as llama.cpp keeps its output at 6-8 bits); fp8 is e4m3 with one
scale per output channel (fast on GPUs with fp8 tensor cores, dequantized elsewhere); nf4 and
llm_int8 are bitsandbytes' schemes (``compress/quant/nf4.py``, ``llm_int8.py``). For better
int4 quality, quantize offline with GPTQ or AWQ (``effinfer quantize``) and load the result.
"""

from __future__ import annotations

import torch

from effinfer.config import ConfigError

# scheme -> (bits, group size, symmetric)
RTN_SCHEMES = {"int8": (8, None, True), "int4": (4, 128, False)}
NF4_SETTINGS = ("nf4", 64, False)  # bitsandbytes' default: blocks of 64, no double quantization


def quantize_weight(weight: torch.Tensor, scheme: str):
    """One float decoder weight [out, in] as ``scheme`` (int8, int4 or nf4) stores it when loading."""
    if scheme == "nf4":
        from effinfer.compress.quant.nf4 import quantize_codebook

        return quantize_codebook(weight, *NF4_SETTINGS)
    from effinfer.compress.quant.rtn import quantize_rtn

    return quantize_rtn(weight, *RTN_SCHEMES[scheme])


def quantize_on_load(model: torch.nn.Module, scheme: str, show_progress: bool = True) -> None:
    """Replace every decoder Linear's float weight by its quantized form (before ``finalize_model``)."""
    if scheme == "nf4":
        from effinfer.compress.quant.nf4 import quantize_model_nf4

        quantize_model_nf4(model, *NF4_SETTINGS)
        return
    if scheme == "llm_int8":
        from effinfer.compress.quant.llm_int8 import quantize_model_llm_int8

        quantize_model_llm_int8(model)
        return
    if scheme == "fp8":
        from effinfer.compress.quant.fp8 import quantize_model_fp8

        quantize_model_fp8(model)
        return
    if scheme not in RTN_SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; choose from int8, int4, fp8, nf4, llm_int8")
    from effinfer.compress.quant.rtn import quantize_model_rtn, quantize_rtn

    bits, group_size, symmetric = RTN_SCHEMES[scheme]
    quantize_model_rtn(model, bits, group_size, symmetric, show_progress=show_progress)
    # The output projection is one of the largest matrices (vocab x hidden): as llama.cpp does
    # (Q8_0 / Q6_K output), it is quantized too, but never below 8 bits, since every logit goes
    # through it. A tied embedding keeps its float table; only the projection gets a copy.
    lm_head = model.lm_head
    lm_head.set_quantized(quantize_rtn(lm_head.weight.data.float(), 8, None, True))
