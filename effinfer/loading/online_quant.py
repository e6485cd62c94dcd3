"""Quantize while loading: ``LLM(model, quantization="int4")`` runs a float checkpoint quantized.

No calibration and no checkpoint to write: each decoder weight is turned into the scheme's
compressed form as it is loaded, before the kernels pack it. The schemes and their settings
are ``quant/registry.SCHEMES`` (int8 per channel, int4 in asymmetric groups of 128, fp8, nf4 /
fp4, LLM.int8(), W8A8); the RTN schemes also store the output projection, at int8, as llama.cpp
keeps its output at 6-8 bits. For better int4 quality, quantize offline with GPTQ or AWQ
(``effinfer quantize``) and load the result.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from effinfer.config import ConfigError
from effinfer.layers.linear import Linear, quantizable_linears
from effinfer.layers.parallel import RowParallelLinear
from effinfer.models.stage import OtherStage
from effinfer.quant import registry
from effinfer.quant.base import CompressedWeight


def quantize_weight(weight: torch.Tensor, scheme: str) -> CompressedWeight:
    """One float decoder weight [out, in] as ``scheme`` stores it when loading."""
    return _scheme(scheme).quantize(weight)


def _scheme(name: str) -> registry.Scheme:
    try:
        return registry.scheme(name)
    except registry.UnknownScheme as e:
        raise ConfigError(str(e)) from None


def _quantize_linear(linear: Linear, quantize) -> CompressedWeight:
    """Each checkpoint tensor of a fused layer on its own (as bitsandbytes quantizes each HF Linear), then joined."""
    if isinstance(linear, RowParallelLinear):  # a tensor-parallel shard of whole rows' columns
        return linear.quantize_whole_rows(quantize)
    weight = linear.dequantized_weight()
    parts, start = [], 0
    for rows in linear.shard_sizes:
        parts.append(quantize(weight[start : start + rows]))
        start += rows
    return parts[0] if len(parts) == 1 else type(parts[0]).cat_rows(parts)


def quantize_on_load(model: torch.nn.Module, scheme: str, show_progress: bool = True) -> None:
    """Replace every decoder Linear's float weight by its quantized form (before ``finalize_model``)."""
    entry = _scheme(scheme)
    linears = quantizable_linears(model)
    compressed = [(name, linear.quantized) for name, linear in linears if linear.quantized is not None]
    if compressed:  # re-quantizing U @ V or GPTQ codes would undo the compression, not add to it
        name, weight = compressed[0]
        raise ConfigError(
            f"{name} is already stored as {weight.kind}; --quantization applies to float checkpoints only"
        )
    for _, linear in tqdm(linears, desc=scheme, unit="layer", disable=not show_progress):
        linear.set_quantized(_quantize_linear(linear, entry.quantize), entry.act_quant)
    if entry.quantize_lm_head is not None and not isinstance(model.lm_head, OtherStage):
        # A tied embedding keeps its float table; only the projection gets a quantized copy.
        model.lm_head.set_quantized(entry.quantize_lm_head(model.lm_head.weight.data.float()))
