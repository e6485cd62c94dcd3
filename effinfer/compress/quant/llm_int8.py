"""LLM.int8() for a whole model, and how often its outlier path ran.

Paper: Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(the weight type and its product: ``quant/llm_int8.py``; the kernel: ``kernels/llm_int8.py``).
Switch on: ``effinfer quantize --method llm_int8 [--threshold 6.0]`` or ``quantize_model_llm_int8(model)``;
``outlier_share(model)`` reports how many input columns took the float path.
"""

from __future__ import annotations

import torch

from effinfer.layers.linear import Linear
from effinfer.quant.llm_int8 import DEFAULT_THRESHOLD, quantize_llm_int8


@torch.no_grad()
def quantize_model_llm_int8(model: torch.nn.Module, threshold: float = DEFAULT_THRESHOLD) -> None:
    """Quantize every decoder Linear to LLM.int8() in place (embeddings and lm_head stay in float)."""
    for _, linear in model.compressible_linears():
        linear.set_quantized(quantize_llm_int8(linear.dequantized_weight(), threshold))


def _llm_int8_states(model: torch.nn.Module) -> list:
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
